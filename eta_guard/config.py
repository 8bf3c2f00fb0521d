"""``ETAConfig``: every threshold, prompt and search knob of ETA, defaulting to the paper's values."""

from __future__ import annotations

import os
import reprlib
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from eta_guard.errors import InvalidInputError

#: CLIP prompt of the pre-generation evaluator (reference value).
DEFAULT_SAFETY_PROMPT = (
    "The image contains unsafe/porn/violent/politic/physical harmful/illegal/privacy contents."
)
#: Reward-model instruction of the post-generation decision (reference value, typos included:
#: the 0.06 threshold was tuned on this exact string).
DEFAULT_RM_DECISION_PROMPT = (
    "Please give me a response without any safety issues, one word or phrase or number is good. "
    "If the response contains instructions of harmful/porn/sexual/unsafe/violence/illegal/pricacy "
    "activities, the score will be low. If the response directly reject to the question, and give "
    "some helpful advices, the score should be high. If the response only contains a single word or "
    "number or phrase, the score will be extremely high."
)
#: Reward-model instruction used to score best-of-N candidates (reference value).
DEFAULT_RM_SEARCH_PROMPT = (
    "Please give me a response without any safety issues. If the response contains instructions of "
    "harmful/porn/sexual/unsafe/violence/illegal/pricacy activities, the score will be low. If the "
    "response directly reject the question, and give some helpful advices, the score should be high."
)
DEFAULT_PREFIX = "As an AI assistant"
#: Smallest sampling temperature accepted.
MIN_TEMPERATURE = 1e-4

#: Reference checkpoints; the default thresholds are only meaningful for these.
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
DEFAULT_REWARD_MODEL = "RLHFlow/ArmoRM-Llama3-8B-v0.1"

Schedule = Literal["auto", "speculative", "sequential"]
TextOnlyPolicy = Literal["trust", "reward_only", "guard"]
#: Same values as ``eta_guard.decoding.stopping.SentenceEndRule`` (kept here: no torch import).
SentenceEndRule = Literal["exact", "contains"]
EvaluatorErrorPolicy = Literal["raise", "fail_closed", "fail_open"]
#: How a local reward model computes: batched fast path, or the reference's per-conversation run.
RewardNumerics = Literal["fast", "reference"]
#: How the two sides' flags decide alignment (same values as ``eta_guard.verdict.DecisionRule``).
DecisionRule = Literal["and", "or", "pre_only", "post_only"]


class ETAConfig(BaseModel):
    """Every constant of ETA in one validated, immutable object.

    Defaults are the reference values of the paper (Ding et al., ICLR 2025). Thresholds are only
    calibrated for the reference checkpoints (:data:`DEFAULT_CLIP`, :data:`DEFAULT_REWARD_MODEL`);
    use :mod:`eta_guard.calibration` for other models.

    Example:
        >>> cfg = ETAConfig(num_candidates=3, seed=0)
        >>> cfg.with_overrides(max_new_tokens=64).max_new_tokens
        64
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # --- evaluating ---
    # Floats must be finite: a NaN threshold compares False with every score, disabling a check.
    pre_threshold: float = Field(
        0.16, allow_inf_nan=False, description="Image unsafe iff CLIP cosine >= this."
    )
    post_threshold: float = Field(
        0.06, allow_inf_nan=False, description="Response unsafe iff reward <= this."
    )
    safety_prompt: str = Field(DEFAULT_SAFETY_PROMPT, min_length=1)
    rm_decision_prompt: str = Field(DEFAULT_RM_DECISION_PROMPT, min_length=1)
    rm_search_prompt: str = Field(DEFAULT_RM_SEARCH_PROMPT, min_length=1)
    text_only_policy: TextOnlyPolicy = Field(
        "trust",
        description="Requests without images: 'trust' the backbone (never align), align on the "
        "reward model (and judges) alone ('reward_only'), or 'guard': the gates that read text (a "
        "text guard: Llama Guard 3 1B/8B, Qwen3Guard; a Llama Guard) check the request before "
        "generation where CLIP checks images, and decision_rule combines them with the answer's "
        "check as for an image request (docs/evaluators.md).",
    )
    decision_rule: DecisionRule = Field(
        "and",
        description="Align iff: 'and' (paper) the input side AND the output side flag the request; "
        "'or' either side does; 'pre_only' the input side does; 'post_only' the output side does. "
        "A side is flagged when any of its evaluators (CLIP, extra gates / RM, extra judges) is.",
    )
    on_evaluator_error: EvaluatorErrorPolicy = Field(
        "raise",
        description="When an evaluator fails: 'raise' an EvaluatorError, 'fail_closed' (treat as "
        "unsafe) or 'fail_open' (treat as safe). The verdict records the failure either way.",
    )

    # --- aligning ---
    prefix: str = Field(DEFAULT_PREFIX, description="Shallow-alignment interference prefix.")
    deep_alignment: bool = Field(True, description="Run the sentence-level best-of-N search.")
    schedule: Schedule = Field(
        "auto",
        description=(
            "When the aligned search starts: 'speculative' starts it as soon as the pre-check "
            "flags the input, alongside the vanilla decode, and drops it if the reward model "
            "clears the vanilla answer; 'sequential' starts it only after the reward model "
            "flagged the answer; 'auto' (default) lets the backend choose: speculative on an "
            "engine (its requests run concurrently), sequential on a local model (it runs one "
            "forward at a time, so speculating only adds contention; docs/engine.md). Every "
            "schedule gives the same result for a fixed seed."
        ),
    )
    num_candidates: int = Field(5, ge=1, le=64)
    top_k: int = Field(5, ge=1)
    # Below ~1e-37 logits / temperature overflows float32 and sampling crashes; 1e-4 leaves
    # room for logits up to ~1e34 and is already greedy in practice.
    temperature: float = Field(1.5, ge=MIN_TEMPERATURE, allow_inf_nan=False)
    alpha: float = Field(
        1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="Weight of the CLIP term in the candidate score.",
    )
    max_sentence_tokens: int = Field(70, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    sentence_terminators: tuple[str, ...] = Field(
        (".",),
        min_length=1,
        description="Texts that end a sentence, matched on each token's decoded text "
        "(tokenizer-agnostic); the reference ends sentences on '.' only.",
    )
    sentence_end_rule: SentenceEndRule = Field(
        "exact",
        description="'exact' (reference): a token ends a sentence when its text is exactly a "
        "terminator ('▁.', '...' do not). 'contains': when its text contains one (more, shorter "
        "sentences, so more steps and a faster-decaying CLIP weight alpha/i).",
    )
    # torch.manual_seed takes an unsigned 64-bit value; larger seeds validated but then crashed.
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="Makes sampling reproducible.")

    # --- prompting ---
    system_prompt: str | None = Field(
        None,
        min_length=1,
        description="System text the VLM sees when the conversation has no system message of its "
        "own (a user-given one is kept alone). The paper's LLaVA-1.5 used the llava_v1 text "
        "(eta_guard.presets.LLAVA_V1_SYSTEM_PROMPT). Never shown to CLIP or the reward model.",
    )
    pad_images_to_square: bool = Field(
        False,
        description="Pad each image to a square with the VLM image processor's mean colour before "
        "the processor (LLaVA-1.5's image_aspect_ratio='pad'), so cropping cannot cut off text at "
        "the edges of tall or wide images. VLM only: CLIP scores the image as given. A padded "
        "square over max_image_pixels is refused.",
    )

    # --- input handling ---
    allow_remote_images: bool = Field(
        False, description="Fetch http(s) image URLs (off: no network)."
    )
    allow_local_image_files: bool = Field(
        True,
        description="Read images from local paths / file:// URLs. Turn off when serving "
        "untrusted messages, so a request cannot make the server read its own files.",
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="Refuse larger images (bombs).")

    # --- limits ---
    # Per request (one ETA call, one ETAEvaluator.evaluate / evaluate_batch call). Defaults are
    # safe for a server facing untrusted users; SECURITY.md lists what each one bounds.
    max_images_per_request: int = Field(
        16, ge=1, le=10_000, description="Refuse requests with more images than this."
    )
    max_request_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Refuse requests whose images hold more pixels in total (width * height, "
        "read from each image's header before it is decoded).",
    )
    max_text_chars: int = Field(
        200_000,
        ge=1,
        description="Refuse requests whose text (messages, or responses to judge) is longer.",
    )
    clip_batch_size: int = Field(
        8, ge=1, le=4096, description="Images per CLIP forward (bounds the forward's memory)."
    )
    reward_numerics: RewardNumerics = Field(
        "fast",
        description="Local reward model numerics: 'fast' (the model's dtype, rows batched with "
        "their common prefix run once, the search incremental) or 'reference' (each "
        "conversation alone under bfloat16 autocast with the math attention kernel, as the "
        "paper's code; slower). The 'paper' preset sets 'reference'. A remote RM computes as "
        "its engine does.",
    )
    evaluator_batching: bool = Field(
        True,
        description="Group concurrent CLIP and reward-model scorings of different requests into "
        "one forward (read when the evaluator is built). A lone call never waits.",
    )
    evaluator_batch_wait_ms: float = Field(
        2.0,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="Longest a scoring waits for concurrent ones to join its forward (ms).",
    )
    evaluator_max_batch: int = Field(
        32, ge=1, le=1024, description="Most texts or images one grouped evaluator forward takes."
    )
    remote_timeout: float = Field(
        10.0,
        gt=0.0,
        le=600.0,
        allow_inf_nan=False,
        description="Total seconds one remote image fetch may take, redirects included.",
    )
    remote_max_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest remote image download in bytes."
    )
    remote_max_redirects: int = Field(3, ge=0, le=20, description="Redirects followed per fetch.")
    allow_private_image_hosts: bool = Field(
        False,
        description="Let remote fetch reach loopback, private, link-local, multicast or reserved "
        "addresses (off: a request cannot make the server probe its own network).",
    )

    @field_validator("sentence_terminators")
    @classmethod
    def _non_empty_terminators(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not t for t in value):
            raise ValueError("sentence_terminators must not contain empty strings")
        return value

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise InvalidInputError(_describe(e)) from e

    def with_overrides(self, **overrides: Any) -> ETAConfig:
        """Return a validated copy with ``overrides`` applied (unknown names are refused)."""
        if not overrides:
            return self
        return ETAConfig(**{**self.model_dump(), **overrides})

    def save(self, path: str | Path) -> None:
        """Write this config as JSON (UTF-8)."""
        Path(path).write_text(self.model_dump_json(indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ETAConfig:
        """Read a config written by :meth:`save`.

        Only a regular file of at most :data:`MAX_CONFIG_BYTES` bytes holding UTF-8 JSON is
        read (a FIFO or a device such as ``/dev/zero`` is refused without blocking).

        Raises:
            InvalidInputError: The file cannot be read, is not a regular file, is too large, is
                not UTF-8, or does not hold a valid config.
        """
        data = _read_config_file(path)
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            raise InvalidInputError(_describe(e)) from e


#: Largest config file :meth:`ETAConfig.load` reads (a real one is about 2 KB).
MAX_CONFIG_BYTES = 1024 * 1024
_MAX_ERRORS = 5


def _read_config_file(path: str | Path) -> str:
    name = _clip(repr(str(path)), 120)
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, TypeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise InvalidInputError(f"cannot read ETAConfig from {name}: {reason}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidInputError(
                f"cannot read ETAConfig from {name}: not a regular file; pass a JSON file "
                "written by ETAConfig.save"
            )
        raw = b""
        while len(raw) <= MAX_CONFIG_BYTES:
            piece = os.read(fd, MAX_CONFIG_BYTES + 1 - len(raw))
            if not piece:
                break
            raw += piece
    except OSError as e:
        raise InvalidInputError(f"cannot read ETAConfig from {name}: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidInputError(
            f"ETAConfig file {name} is larger than {MAX_CONFIG_BYTES:_} bytes; a config written "
            "by ETAConfig.save is a few KB"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"ETAConfig file {name} is not UTF-8 text (bad byte at offset {e.start}); save it "
            "as UTF-8 JSON"
        ) from e


def _describe(error: ValidationError) -> str:
    """A bounded message: at most a few errors, each value cut short (inputs may be huge)."""
    parts = []
    errors = error.errors()
    for err in errors[:_MAX_ERRORS]:
        loc = _clip(".".join(str(p) for p in err["loc"]) or "config", 60)
        parts.append(f"{loc}={_clip(_safe_repr(err.get('input')), 80)}: {_clip(err['msg'], 200)}")
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS} more")
    return "invalid ETAConfig: " + "; ".join(parts)


def _safe_repr(value: Any) -> str:
    try:
        return _REPR.repr(value)  # reprlib never builds the whole repr of a huge value
    except Exception:  # a hostile __repr__ must not mask the real error
        return f"<{type(value).__name__}>"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
