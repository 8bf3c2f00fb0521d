"""Small tokenizers of the real checkpoints' kinds, trained in code on a built-in corpus.

Each is built through the checkpoint's own tokenizer class (``LlamaTokenizer``: SentencePiece-style
BPE with ``▁`` pieces and byte fallback; ``Qwen2Tokenizer`` / ``GPT2Tokenizer``: byte-level BPE;
``CLIPTokenizer``: lower-cased byte-level BPE with ``</w>`` word ends), so the normaliser,
pre-tokeniser, decoder and post-processor are the class's own; only the vocabulary is small.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from eta_guard.testing import TOKENIZER_CORPUS

#: Added to the shared test corpus: the words of the chat templates, the system prompts and the
#: safety prefix, so that ``As an AI assistant`` is ``▁As ▁an ▁AI ▁assistant`` as in Llama's
#: vocabulary; and sentence ends that the reference's rule tells apart ('.', ' .', '...', '.)').
REPLICA_CORPUS: tuple[str, ...] = (
    *TOKENIZER_CORPUS,
    *("As an AI assistant, I cannot help with that." for _ in range(8)),
    "USER: What is in the picture? ASSISTANT: A cat.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "You are a helpful assistant. User: Hello! Assistant: Hi.",
    "Wait . Then go ... (see the note.) Done.",
    "system user assistant image picture photo",
)


def trained_vocab(
    tokenizer_class: type,
    *,
    vocab_size: int,
    special_tokens: list[str],
    byte_alphabet: bool = True,
    end_of_word_suffix: str | None = None,
    train_pre_tokenizer: Any = None,
    extra_corpus: tuple[str, ...] = (),
    **class_kwargs: Any,
) -> tuple[dict[str, int], list[Any]]:
    """Train a BPE vocabulary through ``tokenizer_class``'s own normaliser and pre-tokeniser.

    ``train_pre_tokenizer`` replaces the pre-tokeniser for training only (SentencePiece learns
    pieces within words, while LLaMA's tokenizer runs unsplit). ``extra_corpus`` is trained on
    besides :data:`REPLICA_CORPUS` (a replica's own template words).

    Returns:
        ``(vocab, merges)`` to pass back to ``tokenizer_class(vocab=..., merges=...)``.
    """
    from tokenizers import pre_tokenizers, trainers

    seed_vocab = {t: i for i, t in enumerate(special_tokens)}
    shell = tokenizer_class(vocab=dict(seed_vocab), merges=[], **class_kwargs)
    backend = shell.backend_tokenizer
    if train_pre_tokenizer is not None:
        backend.pre_tokenizer = train_pre_tokenizer
    options: dict[str, Any] = {
        "vocab_size": vocab_size,
        "special_tokens": list(special_tokens),
        "show_progress": False,
    }
    if byte_alphabet:
        options["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    if end_of_word_suffix:
        options["end_of_word_suffix"] = end_of_word_suffix
    backend.train_from_iterator(
        [*REPLICA_CORPUS, *extra_corpus], trainer=trainers.BpeTrainer(**options)
    )
    model = json.loads(backend.to_str())["model"]
    # the tokenizer classes take merges as (left, right) pairs (their str form is a file name)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab: dict[str, int] = dict(model["vocab"])
    return vocab, merges


def llama_sentencepiece_tokenizer(*, vocab_size: int = 1000) -> Any:
    """A ``LlamaTokenizer`` laid out like LLaMA-2's: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256
    byte-fallback pieces ``<0x00>``..``<0xFF>`` at 3..258, then ``▁``-prefixed BPE pieces."""
    from tokenizers import pre_tokenizers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    trained, merges = trained_vocab(
        LlamaTokenizer,
        vocab_size=vocab_size,
        special_tokens=specials,
        byte_alphabet=False,
        train_pre_tokenizer=pre_tokenizers.Metaspace(prepend_scheme="always", split=True),
        legacy=False,
    )
    vocab = {t: i for i, t in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    return LlamaTokenizer(
        vocab=vocab, merges=merges, legacy=False, add_prefix_space=True, add_bos_token=True
    )


def byte_level_bpe_tokenizer(
    special_tokens: Sequence[str],
    corpus: Sequence[str],
    *,
    bos_token: str,
    eos_token: str,
    pad_token: str,
    vocab_size: int = 700,
    **kwargs: Any,
) -> Any:
    """A ``PreTrainedTokenizerFast`` over a byte-level BPE (the Llama 3 / Llama 4 kind) trained
    on ``corpus``, with ``special_tokens`` first in the vocabulary; ``kwargs`` go to the class."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        **kwargs,
    )
