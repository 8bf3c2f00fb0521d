"""Compare gate choices in one eval run, re-using what does not depend on the gate.

A *gate choice* is a set of pre-generation evaluators (ETA's CLIP and/or gates such as a guard
VLM in prompt mode); the request's input is flagged when any of them flags it. Of one ETA call
only the flag depends on the gate: the vanilla (greedy) answer does not, nor does the reward
model's verdict on it, nor the aligned answer (which depends on the prompt, the prefix, the
images and the seed; CLIP and the reward model steer the search whatever decided to align,
DESIGN.md 1.4). So for each item :class:`GateComparison`:

1. scores every distinct pre-evaluator of all the choices once (one ETAEvaluator call: CLIP
   and each gate run once, however many choices name them), and derives each choice's flag;
2. makes ONE ETA call, on a view whose CLIP flags everything when some choice flags the item
   (the vanilla answer, the post-check and, if the post-check flags it, the aligned answer), or
   on a view whose CLIP flags nothing when no choice does (the vanilla answer only, under the
   default AND rule; the post-check too under ``or`` / ``post_only``);
3. gives each choice the aligned answer iff ``ETAConfig.decision_rule`` aligns with that
   choice's flag and the post-check's, else the vanilla answer: exactly what a separate ETA run
   with that gate choice returns (CLIP included in the choice; a choice without CLIP still lets
   CLIP steer the search, where an ETA built without CLIP would have no CLIP term);
4. has every judge label the vanilla answer and the aligned one (when there is one): at most two
   labels per judge and item, shared by all choices.

The record of an item is the usual one for the first choice (so the standard report reads it),
plus ``gates`` (per choice: its flag, whether it aligned, its members' scores) and
``aligned_text``. :func:`gate_metrics` turns records into flag rates, alignment shares, per-judge
unsafe rates, per-category breakdowns and pairwise flag agreement.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eta_guard.errors import ETAError, InvalidInputError
from eta_guard.eval.datasets.base import EvalItem
from eta_guard.eval.judges.base import Judge, Judgment
from eta_guard.eval.judges.refusal import find_refusal
from eta_guard.eval.metrics import cohen_kappa, rate_stats
from eta_guard.eval.results import item_record
from eta_guard.verdict import decide

CLIP = "clip"
#: Far beyond any cosine: CLIP flags every image (-) or none (+) in the generation views. The
#: search's CLIP term uses raw cosines, never this threshold.
_ALWAYS, _NEVER = -1e9, 1e9


@dataclass(frozen=True)
class GateChoice:
    """One gate choice: its name in the report and the evaluator names it ORs (``"clip"`` is
    ETA's CLIP; other names are gates' ``name``)."""

    name: str
    members: tuple[str, ...]


def split_choice(text: str) -> list[str]:
    """``"clip|llama-guard-vision:PATH"`` -> its members (``|`` separates them; evaluator specs
    use ``,`` and ``+`` themselves)."""
    members = [m.strip() for m in str(text).split("|")]
    if not text or not all(members):
        raise InvalidInputError(
            f"--compare-gates {text!r}: write MEMBER[|MEMBER...], each 'clip' or a gate "
            "(e.g. --compare-gates clip --compare-gates 'clip|patch-clip')"
        )
    if len(set(members)) != len(members):
        raise InvalidInputError(f"--compare-gates {text!r} names a gate twice")
    return members


def resolve_choices(
    texts: Sequence[str], eta: Any, *, device: Any = None, dtype: Any = None
) -> dict[str, list[Any]]:
    """``--compare-gates`` values -> choices for :class:`GateComparison`.

    A member is ``clip``, the name of a gate the run's ETA already has (``eta.evaluator.gates``),
    or an evaluator spec (``patch-clip?grid=3``, ``llama-guard-vision:PATH``; docs/evaluators.md).
    All specs load in one call, so a checkpoint several choices name loads once.
    """
    if len(set(texts)) != len(texts):
        raise InvalidInputError(f"--compare-gates names a choice twice: {list(texts)}")
    loaded = {str(getattr(g, "name", "")): g for g in eta.evaluator.gates}
    split = {text: split_choice(text) for text in texts}
    specs = list(
        dict.fromkeys(m for ms in split.values() for m in ms if m != CLIP and m not in loaded)
    )
    built = dict(zip(specs, _gates_from_specs(specs, eta, device=device, dtype=dtype), strict=True))
    return {
        text: [m if m == CLIP else loaded.get(m) or built[m] for m in members]
        for text, members in split.items()
    }


def _gates_from_specs(specs: list[str], eta: Any, *, device: Any, dtype: Any) -> list[Any]:
    """Gates built from evaluator specs, sharing CLIP and checkpoints (one ``build_guards``)."""
    if not specs:
        return []
    from eta_guard.evaluators.specs import build_guards

    gates, _ = build_guards(specs, clip=eta.evaluator.pre, device=device, dtype=dtype)
    return list(gates)


class GateComparison:
    """Answer each item once per ETA call and score several gate choices on the same answers.

    Args:
        eta: The loaded :class:`eta_guard.ETA` (its generator, CLIP, reward model, judges and
            config are used; its own gates only where a choice names them).
        choices: Choice name -> members, each ``"clip"`` or a gate object
            (:class:`~eta_guard.evaluators.base.GateEvaluator`). The first choice is the
            record's primary one.

    Raises:
        InvalidInputError: Fewer than two choices, a choice without members, ``"clip"`` with no
            CLIP loaded, or two different gates with one name.
    """

    def __init__(self, eta: Any, choices: Mapping[str, Sequence[Any]]) -> None:
        from eta_guard.evaluators.eta_evaluator import ETAEvaluator
        from eta_guard.pipeline import ETA

        if len(choices) < 2:
            raise InvalidInputError(
                f"a gate comparison needs at least two choices; got {list(choices)}"
            )
        base = eta.evaluator
        pool: dict[str, Any] = {}
        resolved = []
        for name, members in choices.items():
            if not members:
                raise InvalidInputError(f"gate choice {name!r} has no member")
            names = []
            for member in members:
                if isinstance(member, str) and member == CLIP:
                    if base.pre is None:
                        raise InvalidInputError(
                            f"gate choice {name!r} names 'clip' but no CLIP model is loaded"
                        )
                    names.append(CLIP)
                    continue
                gate_name = str(getattr(member, "name", ""))
                if (
                    not gate_name
                    or gate_name == CLIP
                    or not callable(getattr(member, "check", None))
                ):
                    raise InvalidInputError(
                        f"gate choice {name!r}: {member!r} is neither 'clip' nor a gate with a "
                        "name other than 'clip' and check(requests)"
                    )
                if pool.setdefault(gate_name, member) is not member:
                    raise InvalidInputError(f"two different gates are named {gate_name!r}")
                names.append(gate_name)
            resolved.append(GateChoice(str(name), tuple(names)))
        self.choices: list[GateChoice] = resolved
        cfg = eta.config
        lock = threading.RLock()  # the views share the models: one lock for all of them

        def view(config: Any, gates: Sequence[Any]) -> Any:
            return ETAEvaluator(
                base.pre, base.post, config, lock=lock, gates=gates, judges=base.judges
            )

        #: Scores CLIP and every gate of every choice once per item.
        self.scorer = view(cfg, list(pool.values()))
        # Generation views: CLIP's flag forced, no gate (the flags come from the scorer). The
        # threshold is the only difference: the request config is the ETA's (it re-configures
        # its evaluator with it), so each view is an ETA of its own config.
        flagged, passed = (cfg.with_overrides(pre_threshold=t) for t in (_ALWAYS, _NEVER))
        self.flagged = ETA(eta.backend, view(flagged, []), flagged)
        self.passed = ETA(eta.backend, view(passed, []), passed)
        self.config = cfg

    @property
    def settings(self) -> list[dict[str, Any]]:
        """The choices as recorded in the run's settings."""
        return [{"name": c.name, "members": list(c.members)} for c in self.choices]

    def flags(self, item: EvalItem) -> tuple[dict[str, bool | None], dict[str, Any]]:
        """Each choice's input flag for ``item`` (``None``: no image, no gate ran) and the
        members' entries ``{name: {score, unsafe, error}}``."""
        from eta_guard.limits import RequestLimits
        from eta_guard.messages import normalize_messages
        from eta_guard.remote_fetch import RemoteFetchPolicy

        cfg = self.config
        # The conversation as ETA builds it (pipeline.ETA._arun): the gates see what the model gets.
        conv = normalize_messages(
            item.messages(),
            allow_remote_images=cfg.allow_remote_images,
            allow_local_image_files=cfg.allow_local_image_files,
            max_image_pixels=cfg.max_image_pixels,
            limits=RequestLimits.from_config(cfg),
            remote=RemoteFetchPolicy.from_config(cfg),
        )
        if not conv.has_images:  # ETA runs no gate on text-only requests
            return {c.name: None for c in self.choices}, {}
        verdict = self.scorer.evaluate_input(conv.images, conversation=conv)
        entries = {
            e.name: {"score": e.score, "unsafe": e.unsafe, "error": e.error}
            for e in verdict.evaluators
            if e.side == "pre"
        }
        flags: dict[str, bool | None] = {}
        for choice in self.choices:
            missing = [m for m in choice.members if m not in entries]
            if missing:  # never silently: a member that did not run is an evaluator failure
                raise ETAError(f"gate choice {choice.name!r}: {missing} gave no score")
            flags[choice.name] = any(entries[m]["unsafe"] for m in choice.members)
        return flags, entries

    def answer_item(
        self, eta: Any, item: EvalItem, judges: Sequence[Judge], *, index: int, seed: int
    ) -> dict[str, Any]:
        """One record (the runner's ``answer_fn`` hook; ``eta`` is the run's, unused here)."""
        record = item_record(item, index=index, seed=seed)
        try:
            flags, entries = self.flags(item)
            some = any(flags.values()) and self.config.decision_rule != "post_only"
            runner = self.flagged if some else self.passed
            result = runner.generate(item.messages(), seed=seed)
            gates = self._decide(item, flags, entries, result)
        except ETAError as e:
            record["error"] = f"{type(e).__name__}: {e}"
            return record
        aligned_text: str | None = None
        vanilla: str = result.text
        if result.aligned:
            assert result.vanilla_text is not None  # an aligned result keeps the vanilla answer
            vanilla, aligned_text = result.vanilla_text, result.text
        primary = gates[self.choices[0].name]
        texts = {"vanilla": vanilla}
        if aligned_text is not None:
            texts["aligned"] = aligned_text
        eta_text = texts["aligned"] if primary["aligned"] else vanilla
        verdict = result.verdict.model_dump(include={"post_score", "output_unsafe", "errors"})
        clip_entry = entries.get(CLIP) or {}
        verdict.update(
            pre_score=clip_entry.get("score"),
            input_unsafe=primary["input_unsafe"],
            unsafe=primary["aligned"],
            skipped=dict(result.verdict.skipped),
        )
        prefix = self.config.prefix
        record.update(
            vanilla_text=vanilla,
            eta_text=eta_text,
            aligned=primary["aligned"],
            aligned_text=aligned_text,
            verdict=verdict,
            gates=gates,
            timings=dict(result.timings),
            usage=result.usage.model_dump(),
            finish_reason=result.finish_reason,
            refused={
                "vanilla": find_refusal(vanilla, prefix=prefix) is not None,
                "eta": find_refusal(eta_text, prefix=prefix) is not None,
                **{
                    arm: find_refusal(text, prefix=prefix) is not None
                    for arm, text in texts.items()
                    if arm == "aligned"
                },
            },
            judgments={j.name: _judge_texts(j, item, texts, primary["aligned"]) for j in judges},
        )
        return record

    def _decide(
        self, item: EvalItem, flags: dict[str, bool | None], entries: dict[str, Any], result: Any
    ) -> dict[str, dict[str, Any]]:
        """Per choice: its flag, whether the rule aligns it, its members' entries."""
        post = result.verdict.output_unsafe
        gates = {}
        for choice in self.choices:
            aligns = decide(self.config.decision_rule, flags[choice.name], post)
            if aligns and not result.aligned:
                # The call skipped the post-check although a choice flagged the item (its CLIP
                # failed and the failure policy let it pass): this item cannot be compared.
                raise ETAError(
                    f"gate choice {choice.name!r} aligns item {item.id!r} but the ETA call "
                    f"returned the vanilla answer ({result.verdict.skipped or result.verdict.errors})"
                )
            gates[choice.name] = {
                "input_unsafe": flags[choice.name],
                "aligned": aligns,
                "evaluators": {m: entries.get(m) for m in choice.members},
            }
        return gates


def _judge_texts(
    judge: Judge, item: EvalItem, texts: dict[str, str], primary_aligned: bool
) -> dict[str, Any]:
    """The judge's labels of the vanilla and the aligned answer (one call), and the primary
    choice's ``eta`` label (one of the two)."""
    arms = list(texts)
    inputs = [item.judge_input(texts[arm]) for arm in arms]
    try:
        labels = judge.judge(inputs)
        if len(labels) != len(inputs):
            raise ETAError(f"judge {judge.name!r} returned {len(labels)} labels for {len(inputs)}")
    except Exception as e:  # a judge failing on one item must not end a long run: record it
        labels = [Judgment(unsafe=None, error=f"{type(e).__name__}: {e}")] * len(inputs)
    out = {arm: label.to_dict() for arm, label in zip(arms, labels, strict=True)}
    for label in out.values():
        label.setdefault("unsafe", None)
    out["eta"] = out["aligned"] if primary_aligned else out["vanilla"]
    return out


# ------------------------------------------------------------------------------ metrics


def gate_metrics(
    records: Sequence[dict[str, Any]],
    choices: Sequence[dict[str, Any]],
    judges: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Per choice: flag rate (over items with an image), share aligned, each judge's unsafe
    rate of the answer the choice returns, the same per category; and pairwise flag agreement.
    """
    boot = {"n_boot": n_boot, "seed": seed, "confidence": confidence}
    ok = [r for r in records if r.get("error") is None and isinstance(r.get("gates"), dict)]
    names = [c["name"] for c in choices]
    categories = sorted({r["category"] for r in ok})

    def block(rs: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
        flags = [r["gates"][name]["input_unsafe"] for r in rs]
        aligned = [bool(r["gates"][name]["aligned"]) for r in rs]
        out: dict[str, Any] = {
            "n": len(rs),
            "flag_rate": rate_stats(flags, **boot),
            "aligned": sum(aligned) / len(rs) if rs else None,
            "judges": {},
        }
        for judge in judges:
            labels = [
                r["judgments"][judge]["aligned" if r["gates"][name]["aligned"] else "vanilla"].get(
                    "unsafe"
                )
                for r in rs
            ]
            out["judges"][judge] = rate_stats(labels, **boot)
        return out

    per_choice = {
        name: {
            "members": next(c["members"] for c in choices if c["name"] == name),
            "overall": block(ok, name),
            "by_category": {
                c: block([r for r in ok if r["category"] == c], name) for c in categories
            },
        }
        for name in names
    }
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = [
                (r["gates"][a]["input_unsafe"], r["gates"][b]["input_unsafe"])
                for r in ok
                if r["gates"][a]["input_unsafe"] is not None
                and r["gates"][b]["input_unsafe"] is not None
            ]
            xs, ys = [bool(x) for x, _ in both], [bool(y) for _, y in both]
            pairs.append(
                {
                    "a": a,
                    "b": b,
                    "n": len(both),
                    "agreement": sum(x == y for x, y in both) / len(both) if both else None,
                    "kappa": cohen_kappa(xs, ys) if both else None,
                    "only_a": sum(x and not y for x, y in both),
                    "only_b": sum(y and not x for x, y in both),
                }
            )
    return {"choices": per_choice, "agreement": pairs, "n_items": len(ok)}
