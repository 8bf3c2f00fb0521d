"""VLMAdapter: chat templates, context guard, greedy decoding, streaming, continuation decoding."""

from __future__ import annotations

import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from eta_guard.decoding.vlm import VLMAdapter, decode_continuation
from eta_guard.errors import InvalidInputError
from eta_guard.messages import Conversation


def user(text: str, images: int = 0) -> dict:
    return {
        "role": "user",
        "content": [{"type": "image"}] * images + [{"type": "text", "text": text}],
    }


def conversation(images: list, *, system: str | None = None, turns: int = 1) -> Conversation:
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    for turn in range(turns - 1):
        messages += [
            user(f"Earlier question {turn}?"),
            {"role": "assistant", "content": [{"type": "text", "text": "An answer."}]},
        ]
    messages.append(user("What is in the picture?", images=len(images)))
    return Conversation(messages=messages, images=list(images))


def image_token_count(vlm: VLMAdapter, prepared) -> int:
    return int((prepared.input_ids == vlm.model.config.image_token_id).sum())


def greedy_by_hand(vlm: VLMAdapter, prepared, steps: int) -> list[int]:
    """Greedy tokens from full forwards without a cache (the reference for generate_greedy)."""
    inputs = dict(prepared.model_inputs)
    ids = prepared.input_ids
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
            if "mm_token_type_ids" in inputs:
                mm = prepared.model_inputs["mm_token_type_ids"]
                inputs["mm_token_type_ids"] = torch.cat(
                    [mm, mm.new_zeros(1, ids.shape[1] - mm.shape[1])], 1
                )
            token = int(vlm.model(**inputs).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


# ----- loading and properties -----
def test_properties(vlm: VLMAdapter):
    text_config = vlm.model.config.get_text_config(decoder=True)
    assert vlm.context_length == text_config.max_position_embeddings
    assert vlm.eos_token_ids and vlm.tokenizer.eos_token_id in vlm.eos_token_ids
    assert vlm.pad_token_id is not None
    assert vlm.device.type == "cpu"
    assert vlm.tokenizer is vlm.processor.tokenizer
    assert not vlm.model.training
    assert vlm.name == vlm.model.name_or_path


# ----- prepare -----
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_prepare_images_and_turns(vlm: VLMAdapter, test_images, num_images):
    conv = conversation(test_images[:num_images], turns=2)
    prepared = vlm.prepare(conv, assistant_prefix="As an AI assistant")
    assert prepared.input_ids.shape == (1, prepared.num_prompt_tokens)
    assert prepared.attention_mask.shape == prepared.input_ids.shape
    assert prepared.text.endswith("As an AI assistant")
    assert "Earlier question 0?" in prepared.text and "An answer." in prepared.text
    assert prepared.num_images == num_images
    assert ("pixel_values" in prepared.model_inputs) == (num_images > 0)
    assert (image_token_count(vlm, prepared) > 0) == (num_images > 0)
    assert all(t.device == vlm.device for t in prepared.model_inputs.values() if torch.is_tensor(t))
    if num_images == 2:
        singles = [vlm.prepare(conversation([image], turns=2)) for image in test_images[:2]]
        assert image_token_count(vlm, prepared) == sum(image_token_count(vlm, p) for p in singles)


def test_prepare_system_message(vlm: VLMAdapter, test_images):
    prepared = vlm.prepare(conversation(test_images[:1], system="Answer in French."))
    assert "Answer in French." in prepared.text


def test_template_rejecting_system_role_gets_it_folded(llava: VLMAdapter, test_images, monkeypatch):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    monkeypatch.setattr(llava.processor, "chat_template", strict)
    prepared = llava.prepare(conversation(test_images[:1], system="Be brief."))
    assert prepared.text.startswith("user: ") and "Be brief." in prepared.text
    assert "system" not in prepared.text


def test_template_error_without_system_is_invalid_input(llava: VLMAdapter, monkeypatch):
    monkeypatch.setattr(
        llava.processor, "chat_template", "{{ raise_exception('roles must alternate') }}"
    )
    with pytest.raises(InvalidInputError, match="roles must alternate"):
        llava.prepare(conversation([]))


def test_prompt_too_long_is_refused_before_any_forward(llava: VLMAdapter, monkeypatch):
    calls = []
    monkeypatch.setattr(llava.model, "forward", lambda *a, **k: calls.append(1))
    long_text = "hello world " * (llava.context_length + 10)
    with pytest.raises(
        InvalidInputError, match=r"prompt has \d+ tokens but the model's context is \d+; shorten"
    ):
        llava.prepare(Conversation(messages=[user(long_text)], images=[]))
    assert calls == []


def test_huge_prompt_is_refused_without_tokenizing_all_of_it(llava: VLMAdapter, monkeypatch):
    # Tokenizing megabytes takes seconds; the beginning of the prompt already proves it too long.
    tokenized: list[int] = []
    tokenizer_class = type(llava.tokenizer)
    original = tokenizer_class.__call__

    def spy(self, text=None, *args, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        tokenized.extend(len(t) for t in texts)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", spy)
    huge = "hello world " * 200_000  # 2.4 MB
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"prompt has at least \d+ tokens but the model's"):
        llava.prepare(Conversation(messages=[user(huge)], images=[]))
    assert time.perf_counter() - start < 1.0
    assert tokenized and max(tokenized) <= 16 * llava.context_length


# ----- greedy -----
def test_greedy_matches_argmax_of_full_forwards(vlm: VLMAdapter, test_images):
    prepared = vlm.prepare(conversation(test_images[:1]))
    out = vlm.generate_greedy(prepared, max_new_tokens=6)
    expected = greedy_by_hand(vlm, prepared, 6)
    # generation may stop early at EOS; what was produced must match the argmax tokens
    assert out.token_ids == expected[: len(out.token_ids)]
    assert out.num_prompt_tokens == prepared.num_prompt_tokens
    assert out.sequence_ids == prepared.input_ids[0].tolist() + out.token_ids
    assert out.cache.get_seq_length() == len(out.sequence_ids) - 1
    assert out.text == vlm.decode_continuation(prepared.input_ids[0], out.token_ids)


def test_greedy_ignores_sampling_in_checkpoint_config(llava: VLMAdapter, test_images, monkeypatch):
    prepared = llava.prepare(conversation(test_images[:1]))
    reference = llava.generate_greedy(prepared, max_new_tokens=8)
    config = llava.model.generation_config
    monkeypatch.setattr(config, "do_sample", True)
    monkeypatch.setattr(config, "temperature", 5.0)
    monkeypatch.setattr(config, "repetition_penalty", 3.0)
    torch.manual_seed(123)
    again = llava.generate_greedy(prepared, max_new_tokens=8)
    assert again.token_ids == reference.token_ids


def test_finish_reasons(llava: VLMAdapter, test_images, monkeypatch):
    prepared = llava.prepare(conversation(test_images[:1]))
    long = llava.generate_greedy(prepared, max_new_tokens=8)
    if len(long.token_ids) == 8:
        assert long.finish_reason == "length"
    # make the third greedy token an EOS: generation ends there with "stop"
    third = long.token_ids[2]
    monkeypatch.setattr(llava, "eos_token_ids", [*llava.eos_token_ids, third])
    short = llava.generate_greedy(prepared, max_new_tokens=8)
    assert short.token_ids == long.token_ids[: long.token_ids.index(third) + 1]
    assert short.finish_reason == "stop"


def test_budget_capped_by_context(llava: VLMAdapter, test_images):
    prepared = llava.prepare(conversation(test_images[:1]))
    room = llava.context_length - prepared.num_prompt_tokens
    assert llava.max_new_tokens_for(prepared, 10**6) == room
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        llava.max_new_tokens_for(prepared, 0)


def test_stop_string_cuts_text(vlm: VLMAdapter, test_images):
    prepared = vlm.prepare(conversation(test_images[:1]))
    full = vlm.generate_greedy(prepared, max_new_tokens=12)
    stop = _stable_stop(full.text)
    if stop is None:
        pytest.skip("greedy text too short to pick a stop string")
    out = vlm.generate_greedy(prepared, max_new_tokens=12, stop=[stop])
    assert out.text == full.text[: full.text.find(stop)]
    assert stop not in out.text
    assert out.finish_reason == "stop"
    assert len(out.token_ids) <= len(full.token_ids)


def _stable_stop(text: str) -> str | None:
    """A two-character stop string from the middle of ``text`` without replacement characters."""
    for i in range(len(text) // 2, len(text) - 1):
        piece = text[i : i + 2]
        if "\ufffd" not in piece and piece.strip():
            return piece
    return None


# ----- streaming -----
@pytest.mark.parametrize("use_stop", [False, True])
def test_stream_equals_generate(vlm: VLMAdapter, test_images, use_stop):
    prepared = vlm.prepare(conversation(test_images[:1]))
    stop = None
    if use_stop:
        stop = [_stable_stop(vlm.generate_greedy(prepared, max_new_tokens=12).text) or "\n"]
    reference = vlm.generate_greedy(prepared, max_new_tokens=12, stop=stop)
    stream = vlm.stream_greedy(prepared, max_new_tokens=12, stop=stop)
    deltas = list(stream)
    assert "".join(deltas) == reference.text
    assert all(deltas)
    assert stream.output.token_ids == reference.token_ids
    assert stream.output.finish_reason == reference.finish_reason
    for i in range(1, len(deltas) + 1):  # never text past a stop string, at any point
        assert not any(s in "".join(deltas[:i]) for s in stop or [])


def test_stream_reraises_worker_errors(llava: VLMAdapter, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device fell over")

    prepared = llava.prepare(conversation([]))
    monkeypatch.setattr(llava.model, "generate", broken)
    with pytest.raises(RuntimeError, match="device fell over"):
        list(llava.stream_greedy(prepared, max_new_tokens=4))


def test_stream_closed_early_stops_the_worker(llava: VLMAdapter, test_images):
    prepared = llava.prepare(conversation(test_images[:1]))
    stream = llava.stream_greedy(prepared, max_new_tokens=50)
    iterator = iter(stream)
    next(iterator)
    iterator.close()
    assert not stream.running


def test_stream_decodes_on_the_model_thread(llava: VLMAdapter, test_images, monkeypatch):
    import threading

    from eta_guard.model_thread import model_thread

    seen = []
    real = llava.model.generate
    monkeypatch.setattr(
        llava.model, "generate", lambda *a, **k: seen.append(threading.get_ident()) or real(*a, **k)
    )
    prepared = llava.prepare(conversation(test_images[:1]))
    list(llava.stream_greedy(prepared, max_new_tokens=3))
    assert seen == [model_thread(llava.device).ident]


# ----- decoding continuations -----
def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    pieces = ["<unk>", "</s>", "▁Hello", "▁world", "!", "▁How", "▁are", "▁you", "?"]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"</s>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize(
    ("context", "new", "expected"),
    [
        ("Hello", " world!", " world!"),  # the leading space survives (decoded alone it is dropped)
        ("Hello world!", " How are you?", " How are you?"),
        ("", "Hello", "Hello"),
    ],
)
def test_decode_continuation_metaspace(context, new, expected):
    tok = _metaspace_tokenizer()
    ctx = tok.encode(context, add_special_tokens=False) if context else []
    full = tok.encode(context + new, add_special_tokens=False)
    assert full[: len(ctx)] == ctx
    assert decode_continuation(tok, ctx, full[len(ctx) :]) == expected


def test_decode_continuation_keeps_the_space_a_plain_decode_drops():
    tok = _metaspace_tokenizer()
    ids = tok.encode("Hello world!", add_special_tokens=False)
    assert tok.decode(ids[1:]) == "world!"
    assert decode_continuation(tok, ids[:1], ids[1:]) == " world!"


def test_decode_continuation_skips_special_and_completes_split_characters():
    tok = _byte_tokenizer()
    ids = tok.encode("ok 你好", add_special_tokens=False)
    assert len(ids) == 3 + 6  # one byte per token
    # the context ends inside '好': the continuation completes it
    assert decode_continuation(tok, ids[:-2], ids[-2:]) == "好"
    eos = tok.eos_token_id
    assert decode_continuation(tok, ids[:2], ids[2:] + [eos]) == " 你好"
    assert decode_continuation(tok, ids, [eos]) == ""
    assert decode_continuation(tok, [], ids) == "ok 你好"


# ----- loading errors -----
def test_missing_checkpoint_is_invalid_input(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot load the VLM"):
        VLMAdapter.from_pretrained(str(tmp_path / "nowhere"), local_files_only=True)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"device": "gpu9"}, "device"), ({"dtype": "int3"}, "dtype")]
)
def test_bad_device_or_dtype_is_invalid_input(vlm_paths, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        VLMAdapter.from_pretrained(vlm_paths("llava"), local_files_only=True, **kwargs)


def test_dtype_is_applied(vlm_paths, test_images):
    adapter = VLMAdapter.from_pretrained(
        vlm_paths("llava"), dtype="bfloat16", local_files_only=True
    )
    assert adapter.model.dtype == torch.bfloat16
    prepared = adapter.prepare(conversation(test_images[:1]))
    assert prepared.model_inputs["pixel_values"].dtype == torch.bfloat16
    assert len(adapter.generate_greedy(prepared, max_new_tokens=3).token_ids) >= 1


# ----- docs -----
@pytest.mark.parametrize("obj", ["VLMAdapter", "SentenceBestOfN"])
def test_class_docstring_examples_run_offline(obj, tiny_checkpoints):
    """The examples run as written, with ``/tmp/eta-tiny`` pointed at the session's checkpoints."""
    import doctest
    from pathlib import Path

    import eta_guard.backends as backends
    import eta_guard.decoding as decoding

    cls = getattr(decoding if obj == "VLMAdapter" else backends, obj)
    doc = cls.__doc__.replace('"/tmp/eta-tiny"', repr(str(Path(tiny_checkpoints.vlm).parent)))
    test = doctest.DocTestParser().get_doctest(doc, {obj: cls}, obj, None, 0)
    assert len(test.examples) >= 5
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_missing_chat_template_is_invalid_input(llava, monkeypatch):
    monkeypatch.setattr(llava.processor, "chat_template", None)
    with pytest.raises(InvalidInputError, match="has no chat template"):
        llava.prepare(conversation([]))
