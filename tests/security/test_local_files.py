"""Class 5 of issue 8: one local-file policy for every adapter, and one neutral message.

Written as an attacker would: image "sources" that name the server's own files, and probes
that try to learn from the error message whether a path exists, is a directory, a device or
a text file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

sys.path.insert(0, str(Path(__file__).parents[1]))
from langchain_eta import ETAInputGuard  # noqa: E402
from langchain_fixtures import lc_ckpt, lc_eta, lc_evaluator  # noqa: E402, F401
from llama_index_fixtures import li_ckpt, li_eta, png_bytes  # noqa: E402, F401

from eta_guard.errors import InvalidInputError  # noqa: E402
from eta_guard.media import load_image  # noqa: E402


@pytest.fixture
def probes(tmp_path: Path) -> dict[str, Path]:
    """Paths an attacker would probe: each kind must get the same answer."""
    text = tmp_path / "secret.txt"
    text.write_text("password=hunter2\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = {
        "missing": tmp_path / "no-such-file.png",
        "directory": tmp_path,
        "text-file": text,
        "empty-file": empty,
        "fifo": fifo,
    }
    if Path("/dev/zero").exists():
        out["device"] = Path("/dev/zero")
    return out


def _message(call) -> str:
    with pytest.raises(InvalidInputError) as caught:
        call()
    return str(caught.value)


@pytest.mark.parametrize("form", ["Path", "str", "file-url"])
def test_engine_message_does_not_tell_what_a_path_is(probes, form):
    make = {"Path": lambda p: p, "str": str, "file-url": lambda p: p.as_uri()}[form]
    messages = {kind: _message(lambda p=p: load_image(make(p))) for kind, p in probes.items()}
    assert len(set(messages.values())) == 1, messages
    assert "hunter2" not in next(iter(messages.values()))


def test_langchain_guard_message_does_not_tell_what_a_path_is(lc_evaluator, probes):  # noqa: F811
    guard = ETAInputGuard(evaluator=lc_evaluator, allow_local_image_files=True)

    def send(path: Path) -> None:
        guard.invoke([HumanMessage(content=[{"type": "image", "url": path.as_uri()}])])

    messages = {kind: _message(lambda p=p: send(p)) for kind, p in probes.items()}
    assert len(set(messages.values())) == 1, messages


def _png_file(tmp_path: Path) -> Path:
    path = tmp_path / "server-file.png"
    path.write_bytes(png_bytes())
    return path


@pytest.mark.parametrize("form", ["file-url", "complete-path", "complete-file-url"])
def test_llama_index_llm_reads_no_local_file_by_default(li_eta, tmp_path, form):  # noqa: F811
    # Strings (file: URLs, path strings) may come from message text: refused by default.
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.eta import ETAMultiModalLLM

    path = _png_file(tmp_path)  # a real, readable image: only the policy can refuse it
    llm = ETAMultiModalLLM(eta=li_eta)
    if form == "complete-path":
        call = lambda: llm.complete("What is it?", image_documents=[str(path)])  # noqa: E731
    elif form == "complete-file-url":
        call = lambda: llm.complete("What is it?", image_documents=[path.as_uri()])  # noqa: E731
    else:
        block = ImageBlock(url=path.as_uri())
        message = ChatMessage(role="user", blocks=[block, TextBlock(text="What is it?")])
        call = lambda: llm.chat([message])  # noqa: E731
    message = _message(call)  # a path string reads as "not data, and local files are disabled"
    assert "image path refused" in message or "local image files are disabled" in message


def test_llama_index_idiom_image_block_path_works_by_default(li_eta, tmp_path):  # noqa: F811
    # ImageBlock(path=...) is set by the application (LlamaIndex's own idiom): read it.
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.eta import ETAMultiModalLLM

    path = _png_file(tmp_path)
    llm = ETAMultiModalLLM(eta=li_eta, max_new_tokens=2)
    response = llm.chat(
        [ChatMessage(role="user", blocks=[ImageBlock(path=path), TextBlock(text="What is it?")])]
    )
    # CLIP scored the image: the file was read and the same pixels were checked
    verdict = response.additional_kwargs["eta_verdict"]
    assert verdict["pre_score"] == pytest.approx(li_eta.evaluator.score_images([path])[0], abs=1e-5)


@pytest.mark.parametrize("where", ["llm", "call"])
def test_llama_index_image_block_path_refused_when_local_files_off(li_eta, tmp_path, where):  # noqa: F811
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.eta import ETAMultiModalLLM

    path = _png_file(tmp_path)
    llm = ETAMultiModalLLM(eta=li_eta, allow_local_image_files=False if where == "llm" else None)
    kwargs = {"allow_local_image_files": False} if where == "call" else {}
    message = ChatMessage(role="user", blocks=[ImageBlock(path=path), TextBlock(text="q")])
    assert "image path refused" in _message(lambda: llm.chat([message], **kwargs))


def test_llama_index_animated_image_block_path_is_refused(li_eta, tmp_path):  # noqa: F811
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.eta import ETAMultiModalLLM
    from PIL import Image

    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    llm = ETAMultiModalLLM(eta=li_eta)
    message = ChatMessage(role="user", blocks=[ImageBlock(path=path), TextBlock(text="q")])
    assert "animated" in _message(lambda: llm.chat([message]))


def test_llama_index_llm_reads_local_files_when_allowed(li_eta, tmp_path):  # noqa: F811
    from llama_index.llms.eta import ETAMultiModalLLM

    path = _png_file(tmp_path)
    llm = ETAMultiModalLLM(eta=li_eta, allow_local_image_files=True)
    out = llm.complete("What is it?", image_documents=[str(path)])
    assert out.additional_kwargs["eta_verdict"]["pre_score"] is not None


def test_llama_index_block_building_does_not_tell_what_a_path_is(li_eta, probes):  # noqa: F811
    from llama_index.llms.eta import ETAMultiModalLLM

    llm = ETAMultiModalLLM(eta=li_eta, allow_local_image_files=True)
    messages = {
        kind: _message(lambda p=p: llm.complete("q", image_documents=[str(p)]))
        for kind, p in probes.items()
    }
    assert len(set(messages.values())) == 1, messages
