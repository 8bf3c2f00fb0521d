"""Issue 18, hardening item 7: per-call arguments of the adapters overrode their safe settings.

``invoke(..., allow_local_image_files=True)``, ``.bind(pre_threshold=2.0)`` or LlamaIndex's
``chat(msgs, post_threshold=-1e9)`` come from code that user input may reach (agent frameworks
forward options). What could switch a check off (thresholds, decision rule, text-only policy,
prompts, prefix, deep search), the file and network switches, every limit and the failure policy
are locked by default on ``ETAChatModel`` and ``ETAMultiModalLLM``: a call may tighten them,
never loosen them; ``locked_settings`` pins more ("all") or unlocks (``frozenset()``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

sys.path.insert(0, str(Path(__file__).parents[1]))
from langchain_eta import DEFAULT_LOCKED_SETTINGS, ETAChatModel  # noqa: E402
from langchain_fixtures import FakeETA  # noqa: E402
from llama_index_fixtures import li_ckpt, li_eta  # noqa: E402, F401

from eta_guard.config import ETAConfig  # noqa: E402
from eta_guard.errors import InvalidInputError  # noqa: E402


def _ask(url: str) -> list[HumanMessage]:
    return [HumanMessage(content=[{"type": "text", "text": "?"}, {"type": "image", "url": url}])]


@pytest.fixture
def secret(tmp_path) -> Path:
    from eta_guard.testing import make_test_image

    path = tmp_path / "secret.png"
    make_test_image().save(path)
    return path


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allow_local_image_files": True},
        {"allow_remote_images": True},
        {"allow_private_image_hosts": True},
        {"max_text_chars": 10**9},
        {"max_images_per_request": 10_000},
        {"max_request_pixels": 10**12},
        {"max_image_pixels": 10**12},
        {"remote_max_bytes": 10**12},
        {"on_evaluator_error": "fail_open"},
        # Each of these switches a check off or weakens it (the guard stays in place otherwise).
        {"pre_threshold": 2.0},
        {"post_threshold": -1e9},
        {"decision_rule": "pre_only"},
        {"text_only_policy": "trust"},
        {"deep_alignment": False},
        {"prefix": "Sure, here is"},
        {"rm_decision_prompt": "Rate this poem."},
        {"safety_prompt": "a photo of a cat"},
        {"max_new_tokens": 10**6},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_per_call_arguments_cannot_loosen_locked_settings(kwargs):
    config = ETAConfig(text_only_policy="reward_only", decision_rule="post_only")
    llm = ETAChatModel(eta=FakeETA("One."), config=config)
    with pytest.raises(InvalidInputError, match=f"{next(iter(kwargs))}.*locked"):
        llm.invoke("hi", **kwargs)
    with pytest.raises(InvalidInputError, match="locked"):
        llm.bind(**kwargs).invoke("hi")


def test_a_bound_local_file_switch_never_reads_the_file(secret):
    llm = ETAChatModel(eta=FakeETA("One."))
    with pytest.raises(InvalidInputError, match="locked"):
        llm.bind(allow_local_image_files=True).invoke(_ask(secret.as_uri()))


def test_tightening_is_allowed_and_the_default_lock_is_exported():
    llm = ETAChatModel(eta=FakeETA("One."))
    assert llm.invoke("hi", max_text_chars=100, allow_remote_images=False).text
    assert "allow_local_image_files" in DEFAULT_LOCKED_SETTINGS
    assert llm.bind(num_candidates=2, seed=3).invoke("hi").text  # search knobs: not locked
    stricter = {
        "pre_threshold": 0.05,
        "post_threshold": 0.5,
        "decision_rule": "or",
        "text_only_policy": "reward_only",
        "deep_alignment": True,
        "max_tokens": 8,
    }
    assert llm.invoke("hi", **stricter).text


def test_applications_can_lock_everything_or_unlock():
    strict = ETAChatModel(eta=FakeETA("One."), locked_settings="all")
    with pytest.raises(InvalidInputError, match="pre_threshold.*locked"):
        strict.invoke("hi", pre_threshold=2.0)  # would switch the image check off
    with pytest.raises(InvalidInputError, match="temperature.*locked"):
        strict.invoke("hi", search_temperature=5.0)
    with pytest.raises(InvalidInputError, match="num_candidates.*locked"):
        strict.invoke("hi", num_candidates=1)
    extra = ETAChatModel(eta=FakeETA("One."), locked_settings=DEFAULT_LOCKED_SETTINGS | {"seed"})
    with pytest.raises(InvalidInputError, match="seed"):
        extra.invoke("hi", seed=5)
    open_model = ETAChatModel(eta=FakeETA("One."), locked_settings=frozenset())
    assert open_model.invoke("hi", max_text_chars=10**6).text


def test_the_model_itself_may_set_them():
    llm = ETAChatModel(eta=FakeETA("One."), allow_local_image_files=True, max_text_chars=10**6)
    assert llm.invoke("hi", allow_local_image_files=True, max_text_chars=10**6).text


# --------------------------------------------------------------------------- LlamaIndex
# The same lock on ETAMultiModalLLM: ``chat(msgs, **kw)`` applied any ETAConfig field, and a
# per-call ``allow_local_image_files=True`` read path strings taken from message text.
@pytest.mark.parametrize(
    "kwargs",
    [
        {"allow_local_image_files": True},
        {"pre_threshold": 2.0},
        {"post_threshold": -1e9},
        {"prefix": "Sure, here is"},
        {"deep_alignment": False},
        {"max_text_chars": 10**9},
        {"max_new_tokens": 10**6},
        {"on_evaluator_error": "fail_open"},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_llama_index_per_call_arguments_cannot_loosen(li_eta, kwargs):  # noqa: F811
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.llms.eta import ETAMultiModalLLM

    llm = ETAMultiModalLLM(eta=li_eta)
    ask = [ChatMessage(role="user", content="hi")]
    with pytest.raises(InvalidInputError, match=f"{next(iter(kwargs))}.*locked"):
        llm.chat(ask, **kwargs)
    with pytest.raises(InvalidInputError, match="locked"):
        llm.complete("hi", **kwargs)


def test_llama_index_a_per_call_file_switch_never_reads_the_file(li_eta, secret):  # noqa: F811
    from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
    from llama_index.llms.eta import ETAMultiModalLLM

    llm = ETAMultiModalLLM(eta=li_eta)
    ask = [ChatMessage(role="user", blocks=[ImageBlock(url=secret.as_uri()), TextBlock(text="?")])]
    with pytest.raises(InvalidInputError, match="allow_local_image_files.*locked"):
        llm.chat(ask, allow_local_image_files=True)


def test_llama_index_tightening_is_allowed_and_all_locks_everything(li_eta):  # noqa: F811
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.llms.eta import ETAMultiModalLLM

    ask = [ChatMessage(role="user", content="hi")]
    llm = ETAMultiModalLLM(eta=li_eta, max_new_tokens=3)
    out = llm.chat(ask, pre_threshold=0.05, post_threshold=0.5, max_new_tokens=2, num_candidates=2)
    assert out.additional_kwargs["completion_tokens"] <= 2
    with pytest.raises(InvalidInputError, match="max_new_tokens.*locked"):
        llm.chat(ask, max_new_tokens=4)  # above the LLM's own limit
    with pytest.raises(InvalidInputError, match="seed.*locked"):
        ETAMultiModalLLM(eta=li_eta, locked_settings="all").chat(ask, seed=1)
