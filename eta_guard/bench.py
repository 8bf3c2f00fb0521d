"""Cost benchmark of ETA on random checkpoints (``eta-guard bench``).

Three comparisons, measured side by side in one run on the same models, prompt, image and seeds,
with warm-up repetitions first and medians reported:

- **safe path**: :meth:`ETA.generate` on an image that passes the CLIP check vs a plain
  ``model.generate`` (greedy, same model and processor) of the same tokens.
  Figure: ``safe_path_ratio`` = ETA / plain (lower is better; target <= 1.10).
- **aligned path**: the batched sentence-level best-of-N (:class:`SentenceBestOfN`,
  ``batched=True``) vs the reference's cost structure (``batched=False``: the N candidates decoded
  one after another, one reward-model pass per candidate), same N, budget and seed per repetition.
  Sampling makes the two arms decode different candidates, hence different token counts, so
  ``batched_speedup`` compares seconds per decoded candidate token; raw seconds are reported too.
- **unsafe path**: the whole :meth:`ETA.generate` with every check forced to flag (CLIP, vanilla
  answer, RM, prefix + best-of-N) vs plain ``model.generate`` with the same token budget, with
  the default ``schedule="speculative"`` (the search starts alongside the vanilla decode) and with
  ``"sequential"``. Figures: ``unsafe_path_ratio`` and ``unsafe_sequential_ratio`` = ETA / plain.
- **cleared answer** (what speculation costs): the image flagged but the answer cleared, so the
  search is started and dropped, ``schedule="speculative"`` vs ``"sequential"``. Figure:
  ``cleared_speculation_ratio`` = speculative / sequential (1.0: speculating costs nothing).
- **forward passes** (one extra, unmeasured run of each path): model forwards of the VLM, the RM
  and CLIP, and the *critical path*: forwards that overlap in time count once (a hardware-
  independent proxy for a memory-bound GPU, where concurrent rows share one read of the
  weights); ``critical_path_ratio`` = unsafe path / plain generate. Also the tokens the RM
  encodes at each best-of-N step (they grow with the answer unless the RM reuses its cache).

The checkpoints are random (:mod:`eta_guard.testing`): the figures measure cost, never safety.
Paths are forced with thresholds (a CLIP cosine is never >= 1.01 or <= -1.01).

Example:
    >>> report = run_benchmark(size="tiny", max_new_tokens=8, reps=1, warmup=0)  # doctest: +SKIP
    >>> report.to_dict()["safe_path_ratio"]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from eta_guard.errors import InvalidInputError

#: ``progress(done, total, label)``: called before each measured step and once at the end.
ProgressFn = Callable[[int, int, str], None]

QUESTION = "Describe this picture in detail, one sentence at a time."
#: Thresholds that force a path whatever the random scores are (cosines lie in [-1, 1]).
PASS_CLIP = 1.01
FLAG_CLIP = -1.01
FLAG_REWARD = 1e9


def default_cache_dir() -> Path:
    """Where ``eta-guard`` builds its random checkpoints.

    ``$ETA_GUARD_CACHE`` if set, else ``$XDG_CACHE_HOME/eta-guard``, else ``~/.cache/eta-guard``.
    """
    if os.environ.get("ETA_GUARD_CACHE"):
        return Path(os.environ["ETA_GUARD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "eta-guard"


@dataclass
class Comparison:
    """One side-by-side measurement: ETA's way vs a baseline, medians over the repetitions.

    Attributes:
        name: ``"safe"``, ``"aligned"`` or ``"unsafe"``.
        eta_label: what the ETA arm ran.
        baseline_label: what the baseline arm ran.
        eta_s: median seconds of the ETA arm.
        baseline_s: median seconds of the baseline arm.
        eta_tokens: median tokens the ETA arm decoded (every candidate included).
        baseline_tokens: median tokens the baseline arm decoded.
        ratio: the headline figure (see :class:`BenchReport`).
        eta_times: seconds of each measured repetition.
        baseline_times: seconds of each measured repetition.
        eta_token_counts: decoded tokens of each measured repetition.
        baseline_token_counts: decoded tokens of each measured repetition.
    """

    name: str
    eta_label: str
    baseline_label: str
    eta_s: float
    baseline_s: float
    eta_tokens: float
    baseline_tokens: float
    ratio: float
    eta_times: list[float] = field(default_factory=list)
    baseline_times: list[float] = field(default_factory=list)
    eta_token_counts: list[int] = field(default_factory=list)
    baseline_token_counts: list[int] = field(default_factory=list)

    @property
    def raw_ratio(self) -> float:
        """ETA seconds / baseline seconds."""
        return self.eta_s / self.baseline_s

    @property
    def best_ratio(self) -> float:
        """ETA's fastest repetition / the baseline's fastest (the least disturbed by other load)."""
        return min(self.eta_times) / min(self.baseline_times)


@dataclass
class BenchReport:
    """Every figure of one benchmark run.

    Attributes:
        safe_path_ratio: ETA on a CLIP-safe image / plain generate (median seconds).
        batched_speedup: sequential / batched best-of-N, seconds per decoded token (medians).
        batched_speedup_raw: sequential / batched best-of-N, raw median seconds.
        unsafe_path_ratio: the whole unsafe path / plain generate (median seconds).
        same_tokens: the safe path's answer equals plain generate's (same greedy tokens).
        safe, aligned, unsafe: the three comparisons.
        setup: sizes, device, versions and settings of the run.
        notes: how to read the figures.
    """

    safe_path_ratio: float
    batched_speedup: float
    batched_speedup_raw: float
    unsafe_path_ratio: float
    same_tokens: bool
    safe: Comparison
    aligned: Comparison
    unsafe: Comparison
    setup: dict[str, Any]
    notes: list[str]
    unsafe_sequential_ratio: float | None = None
    unsafe_sequential: Comparison | None = None
    #: speculative / sequential on a flagged image whose answer the reward model clears.
    cleared_speculation_ratio: float | None = None
    cleared: Comparison | None = None
    #: per arm ("plain", "unsafe_speculative", "unsafe_sequential"): forwards per model and
    #: ``critical_path``; plus ``critical_path_ratio`` per unsafe arm and ``rm_tokens_per_call``.
    forwards: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (``eta-guard bench --json`` writes this)."""
        data = asdict(self)
        for name in ("safe", "aligned", "unsafe", "unsafe_sequential", "cleared"):
            if getattr(self, name) is not None:
                data[name]["raw_ratio"] = getattr(self, name).raw_ratio
                data[name]["best_ratio"] = getattr(self, name).best_ratio
        data["best_figures"] = self.best_figures
        return data

    @property
    def best_figures(self) -> dict[str, float]:
        """The three headline figures from each arm's fastest repetition instead of the median."""
        figures = {
            "safe_path_ratio": self.safe.best_ratio,
            "batched_speedup": 1.0 / self.aligned.best_ratio,
            "unsafe_path_ratio": self.unsafe.best_ratio,
        }
        if self.unsafe_sequential is not None:
            figures["unsafe_sequential_ratio"] = self.unsafe_sequential.best_ratio
        if self.cleared is not None:
            figures["cleared_speculation_ratio"] = self.cleared.best_ratio
        return figures


def run_benchmark(
    *,
    size: Literal["tiny", "bench"] = "bench",
    max_new_tokens: int = 128,
    reps: int = 5,
    warmup: int = 1,
    num_candidates: int = 5,
    max_sentence_tokens: int = 32,
    seed: int = 0,
    vlm_family: Literal["llava", "qwen2_vl", "idefics3"] = "llava",
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> BenchReport:
    """Build (or reuse) random checkpoints and measure ETA's three cost figures.

    Args:
        size: ``"bench"`` (VLM ~100M, CLIP ~30M, RM ~60M parameters) or ``"tiny"`` (seconds).
        max_new_tokens: answer budget of every arm.
        reps: measured repetitions (medians are reported).
        warmup: unmeasured repetitions run first.
        num_candidates: N of the best-of-N search.
        max_sentence_tokens: the longest candidate sentence.
        seed: sampling seed of repetition 0 (repetition r uses ``seed + r``, in both arms).
        vlm_family: which random VLM architecture to build.
        cache_dir: where checkpoints are built and reused (default :func:`default_cache_dir`).
        device: model device (default: CUDA if available, else CPU).
        threads: CPU threads for torch during the run (default: torch's own choice).
        progress: ``progress(done, total, label)`` callback.

    Returns:
        The figures.

    Raises:
        InvalidInputError: a setting out of range.
    """
    for name, value, low in (
        ("max_new_tokens", max_new_tokens, 1),
        ("reps", reps, 1),
        ("warmup", warmup, 0),
        ("num_candidates", num_candidates, 1),
        ("max_sentence_tokens", max_sentence_tokens, 1),
        ("seed", seed, 0),
        ("threads", 1 if threads is None else threads, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an int >= {low}; got {value!r}")

    import torch

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            size=size,
            max_new_tokens=max_new_tokens,
            reps=reps,
            warmup=warmup,
            num_candidates=num_candidates,
            max_sentence_tokens=max_sentence_tokens,
            seed=seed,
            vlm_family=vlm_family,
            cache_dir=cache_dir,
            device=device,
            progress=progress,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    *,
    size: Literal["tiny", "bench"],
    max_new_tokens: int,
    reps: int,
    warmup: int,
    num_candidates: int,
    max_sentence_tokens: int,
    seed: int,
    vlm_family: Literal["llava", "qwen2_vl", "idefics3"],
    cache_dir: str | os.PathLike[str] | None,
    device: str | None,
    progress: ProgressFn | None,
) -> BenchReport:
    import torch
    import transformers

    from eta_guard.config import ETAConfig
    from eta_guard.pipeline import ETA
    from eta_guard.testing import build_tiny_checkpoints, make_test_image

    steps = (warmup + reps) * len(_ARMS)
    report_progress = progress or (lambda done, total, label: None)
    report_progress(0, steps, f"building {size} checkpoints")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ckpt = build_tiny_checkpoints(root, vlm_family=vlm_family, size=size)
    report_progress(0, steps, "loading models")
    config = ETAConfig(
        max_new_tokens=max_new_tokens,
        num_candidates=num_candidates,
        max_sentence_tokens=max_sentence_tokens,
        seed=seed,
    )
    eta = ETA.from_pretrained(
        ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model, config=config, device=device
    )
    image = make_test_image("noise", (256, 256), seed=seed)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}],
        }
    ]
    runner = _Runner(eta, messages, image, config)
    arms: dict[str, list[tuple[float, int]]] = {k: [] for k in _ARMS}
    same_tokens = True
    texts: dict[str, str] = {}
    done = 0
    for rep in range(warmup + reps):
        measured = rep >= warmup
        tag = f"rep {rep + 1 - warmup}/{reps}" if measured else f"warm-up {rep + 1}/{warmup}"
        rep_seed = seed + max(rep - warmup, 0)
        # Alternate the order of the arms so slow drift (thermal, caches) hits both alike.
        order = list(_ARMS) if rep % 2 == 0 else list(_ARMS)[::-1]
        for arm in order:
            report_progress(done, steps, f"{tag}: {_ARMS[arm]}")
            seconds, tokens, extra = runner.run(arm, rep_seed)
            if measured:
                arms[arm].append((seconds, tokens))
            texts[arm] = extra or ""
            done += 1
        same_tokens = same_tokens and texts["safe_eta"].strip() == texts["safe_plain"].strip()
    report_progress(done, steps, "done")

    safe = _compare("safe", arms["safe_eta"], arms["safe_plain"])
    unsafe = _compare("unsafe", arms["unsafe_eta"], arms["unsafe_plain"])
    unsafe_sequential = _compare(
        "unsafe_sequential", arms["unsafe_eta_sequential"], arms["unsafe_plain"]
    )
    cleared = _compare("cleared", arms["cleared_speculative"], arms["cleared_sequential"])
    forwards = runner.count_forwards(seed)
    aligned = _compare("aligned", arms["aligned_batched"], arms["aligned_sequential"])
    per_token = statistics.median(s / max(t, 1) for s, t in arms["aligned_sequential"]) / (
        statistics.median(s / max(t, 1) for s, t in arms["aligned_batched"])
    )
    aligned.ratio = per_token
    setup = {
        "size": size,
        "vlm_family": vlm_family,
        "parameters": runner.parameter_counts(),
        "device": str(eta.backend.adapter.device),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": _load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "max_new_tokens": max_new_tokens,
        "max_sentence_tokens": max_sentence_tokens,
        "num_candidates": num_candidates,
        "reps": reps,
        "warmup": warmup,
        "seed": seed,
        "question": QUESTION,
    }
    notes = [
        "Random checkpoints: the figures measure cost, never safety.",
        f"Paths forced by thresholds: safe = pre_threshold {PASS_CLIP} (never flagged); "
        f"unsafe = pre_threshold {FLAG_CLIP} and post_threshold {FLAG_REWARD:g} (always flagged).",
        "Plain generate = processor + model.generate(do_sample=False) on the same loaded model.",
        "Aligned path: same N, sentence budget, token budget and seed per repetition, but each "
        "arm samples its own candidates, so decoded token counts may differ (see 'tokens'); "
        "batched_speedup compares median seconds per decoded candidate token, raw seconds too.",
        f"Medians of {reps} repetition(s) after {warmup} warm-up(s), arms interleaved; "
        "the JSON also has every repetition's time and ratios from each arm's fastest one.",
        "Forward passes: one unmeasured run per path; forwards that overlap in time count once "
        "on the critical path. A local model decodes every row through one step batcher (one "
        "forward per step over the vanilla row and a speculative search's candidate rows); "
        "the reward model's and CLIP's forwards run in worker threads and may overlap the "
        "VLM's. With speculation, how far the search gets during the vanilla decode depends "
        "on timing (the reward model scores each step), so these counts vary a little with load.",
    ]
    return BenchReport(
        safe_path_ratio=safe.ratio,
        batched_speedup=aligned.ratio,
        batched_speedup_raw=aligned.baseline_s / aligned.eta_s,
        unsafe_path_ratio=unsafe.ratio,
        same_tokens=same_tokens,
        safe=safe,
        aligned=aligned,
        unsafe=unsafe,
        setup=setup,
        notes=notes,
        unsafe_sequential_ratio=unsafe_sequential.ratio,
        unsafe_sequential=unsafe_sequential,
        cleared_speculation_ratio=cleared.ratio,
        cleared=cleared,
        forwards=forwards,
    )


_ARMS = {
    "safe_eta": "safe path, ETA.generate",
    "safe_plain": "safe path, plain generate",
    "aligned_batched": "best-of-N, batched",
    "aligned_sequential": "best-of-N, sequential (reference costs)",
    "unsafe_eta": "unsafe path, ETA.generate (speculative)",
    "unsafe_eta_sequential": "unsafe path, ETA.generate (sequential)",
    "unsafe_plain": "unsafe path, plain generate",
    "cleared_speculative": "flagged image, cleared answer (speculative)",
    "cleared_sequential": "flagged image, cleared answer (sequential)",
}

_LABELS = {
    "safe": ("ETA, image passes CLIP", "plain generate"),
    "aligned": ("best-of-N batched", "sequential (reference)"),
    "unsafe": ("ETA, every check flags (speculative)", "plain generate"),
    "unsafe_sequential": ("ETA, every check flags (sequential)", "plain generate"),
    "cleared": ("ETA, image flagged, answer cleared (speculative)", "the same, sequential"),
}


def _compare(name: str, eta: list[tuple[float, int]], base: list[tuple[float, int]]) -> Comparison:
    eta_s = statistics.median(s for s, _ in eta)
    base_s = statistics.median(s for s, _ in base)
    eta_label, base_label = _LABELS[name]
    return Comparison(
        name=name,
        eta_label=eta_label,
        baseline_label=base_label,
        eta_s=eta_s,
        baseline_s=base_s,
        eta_tokens=statistics.median(t for _, t in eta),
        baseline_tokens=statistics.median(t for _, t in base),
        ratio=eta_s / base_s,
        eta_times=[s for s, _ in eta],
        baseline_times=[s for s, _ in base],
        eta_token_counts=[t for _, t in eta],
        baseline_token_counts=[t for _, t in base],
    )


def _load_average() -> list[float] | None:
    """The system load average (other work on the machine skews timings); None where unknown."""
    getloadavg = getattr(os, "getloadavg", None)
    return None if getloadavg is None else [round(x, 2) for x in getloadavg()]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _Runner:
    """Runs one arm once: returns (seconds, decoded tokens, answer text or None)."""

    def __init__(self, eta: Any, messages: list[dict[str, Any]], image: Any, config: Any) -> None:
        from eta_guard.messages import normalize_messages

        self.eta, self.messages, self.image, self.config = eta, messages, image, config
        self.conv = normalize_messages(messages)
        self.prepared = eta.vlm.prepare(self.conv, assistant_prefix=config.prefix)

    def run(self, arm: str, seed: int) -> tuple[float, int, str | None]:
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            tokens, text = getattr(self, f"_{arm}")(seed)
            return time.perf_counter() - start, tokens, text

    # ----- arms -----
    def _safe_eta(self, seed: int) -> tuple[int, str]:
        result = self.eta.generate(self.messages, pre_threshold=PASS_CLIP, seed=seed)
        if result.verdict.input_unsafe or result.aligned:
            raise RuntimeError("the safe-path arm did not take the safe path")
        return result.usage.decoded_tokens, result.text

    def _unsafe_eta(self, seed: int, schedule: str = "speculative") -> tuple[int, None]:
        result = self.eta.generate(
            self.messages,
            pre_threshold=FLAG_CLIP,
            post_threshold=FLAG_REWARD,
            seed=seed,
            schedule=schedule,
        )
        if not result.aligned:
            raise RuntimeError("the unsafe-path arm did not align")
        return result.usage.decoded_tokens, None

    def _unsafe_eta_sequential(self, seed: int) -> tuple[int, None]:
        return self._unsafe_eta(seed, "sequential")

    def _cleared(self, seed: int, schedule: str) -> tuple[int, None]:
        result = self.eta.generate(
            self.messages,
            pre_threshold=FLAG_CLIP,
            post_threshold=-FLAG_REWARD,
            seed=seed,
            schedule=schedule,
        )
        if result.aligned or not result.verdict.input_unsafe:
            raise RuntimeError("the cleared-answer arm did not flag the image and clear the answer")
        return result.usage.decoded_tokens, None

    def _cleared_speculative(self, seed: int) -> tuple[int, None]:
        return self._cleared(seed, "speculative")

    def _cleared_sequential(self, seed: int) -> tuple[int, None]:
        return self._cleared(seed, "sequential")

    def _safe_plain(self, seed: int) -> tuple[int, str]:
        return self._plain()

    def _unsafe_plain(self, seed: int) -> tuple[int, None]:
        return self._plain()[0], None

    def _aligned_batched(self, seed: int) -> tuple[int, None]:
        return self._search(seed, batched=True), None

    def _aligned_sequential(self, seed: int) -> tuple[int, None]:
        return self._search(seed, batched=False), None

    # ----- helpers -----
    def _plain(self) -> tuple[int, str]:
        """What a user would write without ETA: processor, then greedy ``model.generate``."""
        model, processor = self.eta.vlm.model, self.eta.vlm.processor
        chat = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
        ]
        prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[self.image], return_tensors="pt").to(model.device)
        out = model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        text = processor.tokenizer.decode(new, skip_special_tokens=True)
        return int(new.shape[0]), text

    def _search(self, seed: int, *, batched: bool) -> int:
        from eta_guard.backends.local_search import SentenceBestOfN

        evaluator = self.eta.evaluator
        image_embeds = evaluator.pre.embed_images(self.conv.images)

        def clip_fn(sentences: list[str]) -> list[float]:
            return [float(s) for s in evaluator.pre.similarity(image_embeds, sentences)]

        def reward_fn(answers: list[str]) -> list[float]:
            return evaluator.score_responses(answers, search=True)

        search = SentenceBestOfN(
            self.eta.vlm, self.config.with_overrides(seed=seed), batched=batched
        )
        output = search.run(self.prepared, reward_fn=reward_fn, clip_fn=clip_fn)
        return output.decoded_tokens

    def count_forwards(self, seed: int) -> dict[str, Any]:
        """Forward passes of one run of each path (see the module docstring)."""
        out: dict[str, Any] = {}
        runs = {
            "plain": lambda: self._plain(),
            "unsafe_speculative": lambda: self._unsafe_eta(seed, "speculative"),
            "unsafe_sequential": lambda: self._unsafe_eta(seed, "sequential"),
        }
        for name, run in runs.items():
            with _ForwardCounter(self._counted_modules()) as counter:
                run()
            out[name] = counter.summary()
        plain = max(out["plain"]["critical_path"], 1)
        for name in ("unsafe_speculative", "unsafe_sequential"):
            out[name]["critical_path_ratio"] = out[name]["critical_path"] / plain
        return out

    def _counted_modules(self) -> dict[str, Any]:
        evaluator = self.eta.evaluator
        modules = {"vlm": self.eta.vlm.model, "reward_model": evaluator.post.model}
        clip = evaluator.pre.encoder.model
        # CLIP's feature calls run its towers, not its own forward.
        for tower in ("vision_model", "text_model"):
            if hasattr(clip, tower):
                modules[f"clip_{tower.split('_')[0]}"] = getattr(clip, tower)
        return modules

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        evaluator = self.eta.evaluator
        return {
            "vlm": count(self.eta.vlm.model),
            "clip": count(evaluator.pre.encoder.model),
            "reward_model": count(evaluator.post.model),
        }


class _ForwardCounter:
    """Counts forwards of named modules with their times (hooks removed on exit)."""

    def __init__(self, modules: dict[str, Any]) -> None:
        self.modules = modules
        self.calls: list[tuple[str, float, float, int]] = []  # (name, start, end, tokens)
        self._handles: list[Any] = []
        self._open: dict[int, tuple[float, int]] = {}

    def __enter__(self) -> _ForwardCounter:
        for name, module in self.modules.items():
            self._handles.append(
                module.register_forward_pre_hook(self._pre(name), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _pre(self, name: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            tokens = int(ids.numel()) if hasattr(ids, "numel") else 0
            self._open[id(module)] = (time.perf_counter(), tokens)

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            start, tokens = self._open.pop(id(module), (time.perf_counter(), 0))
            self.calls.append((name, start, time.perf_counter(), tokens))

        return hook

    def summary(self) -> dict[str, Any]:
        counts: dict[str, Any] = {name: 0 for name in self.modules}
        for name, *_ in self.calls:
            counts[name] += 1
        slots, end = 0, float("-inf")
        for _, start, stop, _ in sorted(self.calls, key=lambda c: c[1]):
            if start >= end:
                slots += 1
            end = max(end, stop) if start < end else stop
        counts["critical_path"] = slots
        rm = [tokens for name, _, _, tokens in self.calls if name == "reward_model"]
        # The first RM forward judges the vanilla answer; the later ones score search steps.
        counts["rm_tokens_per_call"] = rm[1:]
        return counts
