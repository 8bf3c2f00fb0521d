"""The model thread: every call runs on one thread, re-entry is inline, errors come back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from eta_guard.model_thread import device_key, model_thread


def test_calls_from_any_thread_run_on_the_same_thread():
    worker = model_thread("cpu")
    seen = {worker.call(threading.get_ident)}
    other = threading.Thread(target=lambda: seen.add(worker.call(threading.get_ident)))
    other.start()
    other.join()
    seen.add(asyncio.run(worker.acall(threading.get_ident)))
    assert seen == {worker.ident}
    assert worker.ident != threading.get_ident()


def test_reentry_runs_inline_and_errors_propagate():
    worker = model_thread()
    assert worker.call(lambda: worker.call(lambda: worker.is_current())) is True
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0)
    assert worker.call(lambda: "still alive") == "still alive"


def test_device_keys():
    assert device_key(None) == device_key("auto") == device_key("cpu") == "cpu"
    assert device_key("cuda") == "cuda:0" and device_key("cuda:1") == "cuda:1"
    assert model_thread("cpu") is model_thread(None)
    assert model_thread("cuda:3") is not model_thread("cpu")


def test_loading_runs_on_the_model_thread(tiny_checkpoints, monkeypatch):
    import transformers

    from eta_guard.decoding.vlm import VLMAdapter

    threads = []
    real = transformers.AutoModelForImageTextToText.from_pretrained

    def spy(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    VLMAdapter.from_pretrained(tiny_checkpoints.vlm, device="cpu")
    assert threads == [model_thread("cpu").ident]
