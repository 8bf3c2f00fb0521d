"""Stopping units of the search, on small tokenizers built in code and hand-made tensors."""

from __future__ import annotations

import threading

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, StoppingCriteriaList

from eta_guard.decoding.stopping import (
    CancelCriteria,
    SentenceEndCriteria,
    candidate_lengths,
    cut_at_stop,
    stop_holdback,
    vocabulary_masks,
)
from eta_guard.errors import InvalidInputError

TERMINATORS = (".", "!", "?", "。")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with a few merges: '。' stays three single-byte tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<eos>": 0}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = [("H", "i"), ("Ġ", "y"), ("Ġy", "o"), ("Ġyo", "u")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    words = [
        "[PAD]",
        "[UNK]",
        "[SEP]",
        "hello",
        "world",
        "i",
        "am",
        "fine",
        "ok",
        "##s",
        ".",
        "!",
        "?",
        "3",
        "##.",
        "##5",
    ]
    tok = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", sep_token="[SEP]"
    )


def unigram_tokenizer() -> PreTrainedTokenizerFast:
    pieces = [
        "<unk>",
        "</s>",
        "▁Hello",
        "▁world",
        "!",
        "▁How",
        "▁are",
        "▁you",
        "?",
        "▁fine",
        ".",
        "▁",
        "a",
    ]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def ends_table(tokenizer, ids: list[int], terminators=TERMINATORS) -> list[bool]:
    """The criterion's answer after each token of ``ids`` (one row, growing)."""
    criteria = SentenceEndCriteria(tokenizer, terminators)
    row = torch.tensor([ids])
    return [bool(criteria(row[:, : t + 1])[0]) for t in range(len(ids))]


def test_byte_level_table_with_multibyte_terminator():
    tok = byte_level_tokenizer()
    ids = tok.encode("Hi. 你好。 you!", add_special_tokens=False)
    pieces = [tok.decode(ids[: t + 1]) for t in range(len(ids))]
    expected = []
    for t, text in enumerate(pieces):
        before = pieces[t - 1] if t else ""
        expected.append(any(text.count(x) > before.count(x) for x in TERMINATORS))
    table = ends_table(tok, ids)
    assert table == expected
    # '.', '。' (completed by its third byte only) and '!'
    assert sum(table) == 3
    assert table[-1] and table[1]  # "Hi" is one token, "." the second
    # the first two bytes of '。' are partial UTF-8 and do not end a sentence
    idx_full_stop = max(i for i, e in enumerate(table[:-1]) if e)
    assert not table[idx_full_stop - 1] and not table[idx_full_stop - 2]


def test_wordpiece_table():
    tok = wordpiece_tokenizer()
    ids = tok.encode("hello world . i am fine ! ok ?", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "hello",
        "world",
        ".",
        "i",
        "am",
        "fine",
        "!",
        "ok",
        "?",
    ]
    assert ends_table(tok, ids) == [False, False, True, False, False, False, True, False, True]


def test_wordpiece_subword_containing_terminator_counts():
    tok = wordpiece_tokenizer()
    ids = [tok.convert_tokens_to_ids(t) for t in ["3", "##.", "##5"]]
    # decoded text is matched, so a subword holding '.' ends the sentence like the reference's '.' id
    assert ends_table(tok, ids) == [False, True, False]


def test_unigram_metaspace_table():
    tok = unigram_tokenizer()
    ids = tok.encode("Hello world! How are you? fine.", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "▁Hello",
        "▁world",
        "!",
        "▁How",
        "▁are",
        "▁you",
        "?",
        "▁fine",
        ".",
    ]
    assert ends_table(tok, ids) == [False, False, True, False, False, False, True, False, True]


def test_custom_terminators_and_special_tokens_never_end():
    tok = wordpiece_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<end.>"]})
    special = tok.convert_tokens_to_ids("<end.>")
    ids = [tok.convert_tokens_to_ids(t) for t in ["hello", "!", "."]] + [special]
    assert ends_table(tok, ids, terminators=("!",)) == [False, True, False, False]


def test_batch_rows_start_length_and_ids_outside_vocab():
    tok = wordpiece_tokenizer()
    dot, hello = tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids("hello")
    big = len(tok) + 5  # models often pad their embedding matrix past the tokenizer
    batch = torch.tensor([[hello, dot], [dot, hello], [hello, big]])
    criteria = SentenceEndCriteria(tok, TERMINATORS, start_length=1)
    assert criteria(batch).tolist() == [True, False, False]
    assert SentenceEndCriteria(tok, TERMINATORS, start_length=2)(batch).tolist() == [False] * 3


def test_input_not_mutated():
    tok = byte_level_tokenizer()
    ids = torch.tensor([tok.encode("你好。", add_special_tokens=False)] * 2)
    before = ids.clone()
    SentenceEndCriteria(tok, TERMINATORS)(ids)
    assert torch.equal(ids, before)


@pytest.mark.parametrize("bad", [(), ("",), (".", ""), [None]])
def test_terminators_validated(bad):
    with pytest.raises(InvalidInputError, match="terminators"):
        SentenceEndCriteria(wordpiece_tokenizer(), bad)


def test_vocabulary_mask_computed_once_per_tokenizer_and_terminators():
    tok = unigram_tokenizer()
    first = vocabulary_masks(tok, (".",))
    assert vocabulary_masks(tok, (".",)) is first
    assert vocabulary_masks(tok, ("!",)) is not first
    ends, partial = first
    assert ends.shape == (len(tok),) and ends.dtype == torch.bool
    assert ends.nonzero().flatten().tolist() == [tok.convert_tokens_to_ids(".")]
    assert not partial.any()


def test_list_equals_applying_each_unit():
    tok = wordpiece_tokenizer()
    dot, hello = tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids("hello")
    batch = torch.tensor([[hello, dot], [dot, hello]])
    event = threading.Event()
    units = [SentenceEndCriteria(tok, TERMINATORS), CancelCriteria(event)]
    for state in (False, True):
        if state:
            event.set()
        combined = StoppingCriteriaList(units)(batch, None)
        expected = units[0](batch) | units[1](batch)
        assert combined.tolist() == expected.tolist()
    assert CancelCriteria(event)(batch).tolist() == [True, True]


def test_candidate_lengths_table():
    eos, dot, w = 0, 1, 2
    tok_ends = _FakeEnds(dot)
    context = [7, 7, 7]
    sequences = torch.tensor(
        [
            context + [w, w, dot, w],  # sentence end at 3
            context + [w, eos, eos, eos],  # EOS at 2 (padding after is ignored)
            context + [w, w, w, w],  # budget exhausted
            context + [dot, eos, w, w],  # sentence end first
            context + [eos, dot, w, w],  # EOS first
        ]
    )
    lengths, ended = candidate_lengths(sequences, 3, eos_token_ids=[eos], sentence_end=tok_ends)
    assert lengths == [3, 2, 4, 1, 1]
    assert ended == [False, True, False, False, True]
    lengths, ended = candidate_lengths(sequences, 3, eos_token_ids=[eos], sentence_end=None)
    assert lengths == [4, 2, 4, 2, 1]
    with pytest.raises(InvalidInputError):
        candidate_lengths(sequences[:, :3], 3, eos_token_ids=[eos], sentence_end=None)


class _FakeEnds:
    """A stand-in sentence end: the last token equals ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores=None):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("Hello. World", ["."], ("Hello", True)),
        ("Hello. World", ["World", "."], ("Hello", True)),
        ("Hello", ["x"], ("Hello", False)),
        ("Hello", None, ("Hello", False)),
        ("Hello", [""], ("Hello", False)),
        ("ab\nUser: hi", ["\nUser:"], ("ab", True)),
    ],
)
def test_cut_at_stop(text, stop, expected):
    assert cut_at_stop(text, stop) == expected


@pytest.mark.parametrize(
    ("text", "stop", "hold"),
    [
        ("Hello", ["\nUser:"], 0),
        ("Hello\n", ["\nUser:"], 1),
        ("Hello\nUs", ["\nUser:"], 3),
        ("Hello\nUs", ["\nUser:", "s"], 3),
        ("abc\ufffd", None, 1),
        ("abc", ["c!", "bc!"], 2),
    ],
)
def test_stop_holdback(text, stop, hold):
    assert stop_holdback(text, stop) == hold


def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """Metaspace unigram holding the pieces that tell the two rules apart: '.', '▁.', '...', '.)'."""
    pieces = ["<unk>", "</s>", "▁a", "▁b", ".", "▁.", "...", ".)", "!", "▁", "a", "b"]
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        # reference: only the bare '.' piece ends a sentence
        ("exact", [False, True, False, False, False, False, False]),
        ("contains", [False, True, False, True, True, True, False]),
    ],
)
def test_exact_rule_ends_only_on_the_bare_terminator(rule, expected):
    tok = sentencepiece_like_tokenizer()
    pieces = ["▁a", ".", "▁b", "▁.", "...", ".)", "!"]
    ids = [tok.convert_tokens_to_ids(p) for p in pieces]
    criteria = SentenceEndCriteria(tok, (".",), rule=rule)
    row = torch.tensor([ids])
    assert [bool(criteria(row[:, : t + 1])[0]) for t in range(len(ids))] == expected


def test_exact_rule_multibyte_terminator_completed_by_its_last_byte():
    tok = byte_level_tokenizer()
    ids = tok.encode("Hi。", add_special_tokens=False)  # 'Hi' + three byte tokens
    criteria = SentenceEndCriteria(tok, ("。",), rule="exact")
    row = torch.tensor([ids])
    assert [bool(criteria(row[:, : t + 1])[0]) for t in range(len(ids))] == [False] * (
        len(ids) - 1
    ) + [True]


def test_rule_validated_and_cached_per_rule():
    tok = sentencepiece_like_tokenizer()
    with pytest.raises(InvalidInputError, match="sentence_end_rule"):
        SentenceEndCriteria(tok, (".",), rule="prefix")
    assert vocabulary_masks(tok, (".",), "exact") is vocabulary_masks(tok, (".",), "exact")
    assert vocabulary_masks(tok, (".",), "exact") is not vocabulary_masks(tok, (".",), "contains")


def test_config_defaults_are_the_reference_rule():
    from eta_guard.config import ETAConfig

    cfg = ETAConfig()
    assert cfg.sentence_terminators == (".",) and cfg.sentence_end_rule == "exact"
    assert ETAConfig(sentence_end_rule="contains").sentence_end_rule == "contains"
    with pytest.raises(InvalidInputError, match="sentence_end_rule"):
        ETAConfig(sentence_end_rule="sometimes")
