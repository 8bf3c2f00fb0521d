"""Issue 18, hardening item 7: per-call arguments of ``ETAChatModel`` overrode its safe settings.

``invoke(..., allow_local_image_files=True)`` or ``.bind(max_text_chars=10**9)`` come from code
that user input may reach (agent frameworks forward options). The file and network switches,
every limit and the failure policy are now locked by default: a call may tighten them, never
loosen them; ``locked_settings`` pins more ("all") or unlocks (``frozenset()``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

sys.path.insert(0, str(Path(__file__).parents[1]))
from langchain_eta import DEFAULT_LOCKED_SETTINGS, ETAChatModel  # noqa: E402
from langchain_fixtures import FakeETA  # noqa: E402

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
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_per_call_arguments_cannot_loosen_locked_settings(kwargs):
    llm = ETAChatModel(eta=FakeETA("One."))
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
    assert llm.bind(num_candidates=2, pre_threshold=0.3).invoke("hi").text  # not locked


def test_applications_can_lock_everything_or_unlock():
    strict = ETAChatModel(eta=FakeETA("One."), locked_settings="all")
    with pytest.raises(InvalidInputError, match="pre_threshold.*locked"):
        strict.invoke("hi", pre_threshold=2.0)  # would switch the image check off
    with pytest.raises(InvalidInputError, match="temperature.*locked"):
        strict.invoke("hi", search_temperature=5.0)
    extra = ETAChatModel(
        eta=FakeETA("One."), locked_settings=DEFAULT_LOCKED_SETTINGS | {"post_threshold"}
    )
    with pytest.raises(InvalidInputError, match="post_threshold"):
        extra.invoke("hi", post_threshold=-5.0)
    open_model = ETAChatModel(eta=FakeETA("One."), locked_settings=frozenset())
    assert open_model.invoke("hi", max_text_chars=10**6).text


def test_the_model_itself_may_set_them():
    llm = ETAChatModel(eta=FakeETA("One."), allow_local_image_files=True, max_text_chars=10**6)
    assert llm.invoke("hi", allow_local_image_files=True, max_text_chars=10**6).text
