"""ETAChatModel: adapter behaviour on a fake engine, then end to end on tiny checkpoints."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

sys.path.insert(0, str(Path(__file__).parent))
from langchain_eta import DEFAULT_LOCKED_SETTINGS, ETAChatModel  # noqa: E402
from langchain_fixtures import FLAG_ALL, FLAG_NONE, FakeETA, lc_ckpt, lc_eta, png_b64  # noqa: E402, F401

from eta_guard.config import ETAConfig  # noqa: E402
from eta_guard.errors import InvalidInputError  # noqa: E402

# ---------------------------------------------------------------- adapter (fake engine)


def test_constructor_folds_eta_fields_into_config_and_loads_nothing(monkeypatch):
    loads = []
    monkeypatch.setattr(ETAChatModel, "_load_engine", lambda self: loads.append(1))
    llm = ETAChatModel(
        vlm="some/vlm", num_candidates=3, pre_threshold=0.2, search_temperature=0.7, temperature=0
    )
    assert (llm.config.num_candidates, llm.config.pre_threshold, llm.config.temperature) == (
        3,
        0.2,
        0.7,
    )
    assert llm.temperature == 0 and loads == []


def test_model_is_an_alias_of_vlm():
    assert ETAChatModel(model="org/vlm").vlm == "org/vlm"


def test_constructor_errors():
    # pydantic reports them as ValidationError, a ValueError like InvalidInputError
    with pytest.raises(ValueError, match="vlm="):
        ETAChatModel(clip="c")
    with pytest.raises(ValueError, match="num_candidates"):
        ETAChatModel(vlm="v", num_candidates=0)


def test_weights_load_once_from_many_threads(monkeypatch):
    loads = []

    def slow_load(self):
        loads.append(1)
        time.sleep(0.05)
        return FakeETA()

    monkeypatch.setattr(ETAChatModel, "_load_engine", slow_load)
    llm = ETAChatModel(vlm="some/vlm")
    threads = [threading.Thread(target=llm.invoke, args=("hi",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1


def test_metadata_usage_and_stream_aggregate():
    llm = ETAChatModel(eta=FakeETA("One. Two."))
    msg = llm.invoke("hi")
    assert msg.content == "One. Two."
    assert msg.usage_metadata == {"input_tokens": 7, "output_tokens": 5, "total_tokens": 12}
    meta = msg.response_metadata
    assert (meta["model_name"], meta["finish_reason"], meta["eta_aligned"]) == (
        "fake-vlm",
        "stop",
        False,
    )
    assert meta["eta_verdict"]["pre_score"] == 0.3 and meta["eta_verdict"]["unsafe"] is True
    chunks = list(llm.stream("hi"))
    assert [c.chunk_position for c in chunks].count("last") == 1 and chunks[
        -1
    ].chunk_position == "last"
    assert "".join(c.text for c in chunks) == msg.content


def test_per_call_overrides_reach_the_engine():
    fake = FakeETA()
    llm = ETAChatModel(eta=fake, max_tokens=20, stop=["END"])
    llm.bind(num_candidates=3, search_temperature=0.9, seed=4).invoke("hi")
    llm.invoke("hi", max_tokens=5, stop=["x"], temperature=0.2)
    first, second = fake.calls
    assert first["overrides"] == {
        "allow_local_image_files": False,
        "max_new_tokens": 20,
        "num_candidates": 3,
        "temperature": 0.9,
        "seed": 4,
    }
    assert first["stop"] == ["END"]
    assert second["overrides"] == {"allow_local_image_files": False, "max_new_tokens": 5}
    assert second["stop"] == ["x"]


def test_a_given_config_applies_over_a_ready_engine():
    fake = FakeETA()
    ETAChatModel(eta=fake, num_candidates=2).invoke("hi")
    assert fake.calls[0]["overrides"]["num_candidates"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"frobnicate": 1}, "unknown keyword argument 'frobnicate'"), ({"model": "other"}, "serves")],
)
def test_bad_per_call_arguments_are_refused(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        ETAChatModel(eta=FakeETA()).invoke("hi", **kwargs)


def test_messages_reach_the_engine_converted_and_merged():
    fake = FakeETA()
    image = {"type": "image", "base64": png_b64(), "mime_type": "image/png"}
    ETAChatModel(eta=fake).invoke(
        [
            SystemMessage("Be brief."),
            HumanMessage("Look:"),
            HumanMessage(content=[image, {"type": "text", "text": "What?"}]),
        ]
    )
    sent = fake.calls[0]["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert [p["type"] for p in sent[1]["content"]] == ["text", "image", "text"]
    assert sent[1]["content"][1]["image"].startswith("data:image/png;base64,")


def test_ls_params():
    llm = ETAChatModel(vlm="org/vlm", temperature=0.0, max_tokens=9, stop=["a"])
    assert llm._get_ls_params() == {
        "ls_provider": "eta_guard",
        "ls_model_name": "org/vlm",
        "ls_model_type": "chat",
        "ls_temperature": 0.0,
        "ls_max_tokens": 9,
        "ls_stop": ["a"],
    }


# ---------------------------------------------------------------- end to end (tiny checkpoints)


@pytest.fixture(scope="module")
def llm(lc_eta):  # noqa: F811
    # These tests force both outcomes per call (FLAG_ALL / FLAG_NONE), so the thresholds are
    # unlocked here; the lock itself is tested in tests/security/test_locked_settings.py.
    unlocked = DEFAULT_LOCKED_SETTINGS - {"pre_threshold", "post_threshold"}
    return ETAChatModel(eta=lc_eta, config=lc_eta.config, locked_settings=unlocked)


def _ask(block):
    return [HumanMessage(content=[{"type": "text", "text": "What is in this picture?"}, block])]


IMAGE_BLOCKS = {
    "v1-base64": lambda b: {"type": "image", "base64": b, "mime_type": "image/png"},
    "v1-data-url": lambda b: {"type": "image", "url": f"data:image/png;base64,{b}"},
    "openai-image_url": lambda b: {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{b}"},
    },
    "v0-base64": lambda b: {
        "type": "image",
        "source_type": "base64",
        "data": b,
        "mime_type": "image/png",
    },
}


@pytest.mark.parametrize("fmt", IMAGE_BLOCKS)
def test_each_image_format_is_seen_by_clip(llm, fmt):
    msg = llm.invoke(_ask(IMAGE_BLOCKS[fmt](png_b64("noise"))))
    verdict = msg.response_metadata["eta_verdict"]
    assert verdict["pre_score"] is not None and len(verdict["image_scores"]) == 1


def test_all_formats_give_the_same_clip_score(llm):
    scores = {
        fmt: llm.invoke(_ask(make(png_b64("checker")))).response_metadata["eta_verdict"][
            "pre_score"
        ]
        for fmt, make in IMAGE_BLOCKS.items()
    }
    assert len({round(s, 6) for s in scores.values()}) == 1, scores


def test_remote_urls_are_refused_by_default(llm):
    with pytest.raises(InvalidInputError, match="(?i)remote|allow_remote_images"):
        llm.invoke(_ask({"type": "image", "url": "https://example.com/cat.png"}))


def test_forced_thresholds_align_per_call(llm):
    image = IMAGE_BLOCKS["v1-base64"](png_b64())
    aligned = llm.bind(**FLAG_ALL).invoke(_ask(image))
    assert aligned.response_metadata["eta_aligned"] is True
    assert aligned.text.startswith(llm.config.prefix)
    assert aligned.response_metadata["eta_verdict"]["unsafe"] is True
    plain = llm.bind(**FLAG_NONE).invoke(_ask(image))
    assert plain.response_metadata["eta_aligned"] is False


@pytest.mark.parametrize("overrides", [FLAG_NONE, FLAG_ALL], ids=["vanilla", "aligned"])
async def test_sync_async_batch_stream_agree_for_a_fixed_seed(llm, overrides):
    model = llm.bind(seed=3, **overrides)
    request = _ask(IMAGE_BLOCKS["openai-image_url"](png_b64("gradient")))
    expected = model.invoke(request).text
    assert (await model.ainvoke(request)).text == expected
    assert [m.text for m in model.batch([request, request])] == [expected, expected]
    assert [m.text for m in await model.abatch([request])] == [expected]
    assert "".join(c.text for c in model.stream(request)) == expected
    assert "".join([c.text async for c in model.astream(request)]) == expected


def test_lcel_chain_with_an_image(llm):
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You describe pictures."),
            (
                "human",
                [
                    {"type": "text", "text": "{question}"},
                    {"type": "image", "base64": "{image}", "mime_type": "image/png"},
                ],
            ),
        ]
    )
    chain = prompt | llm | StrOutputParser()
    inputs = {"question": "What is this?", "image": png_b64()}
    answer = chain.invoke(inputs)
    assert isinstance(answer, str) and answer == llm.invoke(prompt.invoke(inputs)).text


def test_multi_turn_conversation(llm):
    msg = llm.invoke([HumanMessage("hello"), AIMessage("hi"), HumanMessage("how are you")])
    assert msg.usage_metadata["input_tokens"] > 0 and isinstance(msg.text, str)


def test_local_image_files_are_refused_unless_allowed(llm, tmp_path):
    from eta_guard.testing import make_test_image

    path = tmp_path / "pic.png"
    make_test_image().save(path)
    for url in (str(path), path.as_uri()):
        with pytest.raises(InvalidInputError, match="allow_local_image_files=True"):
            llm.invoke(_ask({"type": "image", "url": url}))
    allowed = llm.model_copy(update={"allow_local_image_files": True})
    assert allowed.invoke(_ask({"type": "image", "url": str(path)})).response_metadata[
        "eta_verdict"
    ]["pre_score"]
    # Per call it is locked by default (tests/security/test_locked_settings.py); unlocked:
    unlocked = llm.model_copy(update={"locked_settings": frozenset()})
    per_call = unlocked.bind(allow_local_image_files=True).invoke(
        _ask({"type": "image", "url": path.as_uri()})
    )
    assert per_call.response_metadata["eta_verdict"]["pre_score"] is not None
    assert ETAChatModel(
        vlm="v", config=ETAConfig(allow_local_image_files=True)
    ).allow_local_image_files


def test_config_type_check():
    assert isinstance(ETAChatModel(vlm="v", config={"num_candidates": 2}).config, ETAConfig)


def test_stream_yields_only_final_text(llm):
    request = _ask(IMAGE_BLOCKS["v1-base64"](png_b64("noise")))
    vanilla = llm.bind(**FLAG_NONE).invoke(request).text
    safe_chunks = [c.text for c in llm.bind(**FLAG_NONE).stream(request) if c.text]
    assert len(safe_chunks) > 1  # a passing image streams token by token
    aligned_chunks = [c.text for c in llm.bind(**FLAG_ALL).stream(request) if c.text]
    aligned = "".join(aligned_chunks)
    # the flagged vanilla answer is never streamed: the first text is ETA's prefix
    assert aligned.startswith(llm.config.prefix) and llm.config.prefix.startswith(
        aligned_chunks[0][:5]
    )
    assert vanilla and not aligned.startswith(vanilla)


@pytest.mark.parametrize("overrides", [FLAG_NONE, FLAG_ALL], ids=["vanilla", "aligned"])
async def test_real_stream_has_exactly_one_last_chunk(llm, overrides):
    """On the real engine too: one chunk_position="last", the final one, with usage and verdict."""
    request = _ask(IMAGE_BLOCKS["v1-base64"](png_b64("noise")))
    for chunks in (
        list(llm.bind(**overrides).stream(request)),
        [c async for c in llm.bind(**overrides).astream(request)],
    ):
        assert [c.chunk_position for c in chunks].count("last") == 1
        assert chunks[-1].chunk_position == "last"
        assert chunks[-1].usage_metadata["output_tokens"] > 0
        assert all(c.usage_metadata is None for c in chunks[:-1])
        assert "eta_verdict" in chunks[-1].response_metadata
