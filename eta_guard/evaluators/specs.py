"""Evaluator specs: one short string names a gate or judge, the same everywhere (torch-free).

Grammar (docs/evaluators.md, "Evaluator specs")::

    SPEC    := KIND [":" TARGET] ["?" OPTION ("," OPTION)*]
    TARGET  := a checkpoint (Hub id or folder)   |   MODEL "@" URL   (a served guard)
    OPTION  := KEY "=" VALUE                      (a list VALUE joins items with "+")

Examples: ``patch-clip?grid=3``, ``llama-guard-vision:meta-llama/Llama-Guard-3-11B-Vision``,
``shieldgemma2:google/shieldgemma-2-4b-it?policies=dangerous+violence,threshold=0.3``,
``remote-llama-guard:meta-llama/Llama-Guard-3-11B-Vision@http://guard:8000?tokenizer=...``,
``llama-guard-text:meta-llama/Llama-Guard-3-1B``, ``qwen3guard:Qwen/Qwen3Guard-Gen-0.6B``.

Where a spec is given decides its role: in ``gates=`` (``--gate``) it checks the request before
generation (a guard model in prompt mode), in ``judges=`` (``--post-judge``) the answer (response
mode). :func:`parse_spec` only reads the string; :func:`build_guards` loads what specs name
(through :mod:`eta_guard.evaluators.guard_loading`), sharing one copy of a checkpoint between a
gate and a judge. A bad spec raises :class:`SpecError` naming the part that is wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from eta_guard.errors import InvalidInputError
from eta_guard.evaluators.guard_turns import GuardMode

Role = Literal["gate", "judge"]
Target = Literal["none", "checkpoint", "served"]


class SpecError(InvalidInputError):
    """A malformed or inapplicable evaluator spec; ``spec`` is the string, ``part`` the bad piece."""

    def __init__(self, spec: str, part: str, problem: str) -> None:
        self.spec, self.part = spec, part
        super().__init__(f"evaluator spec {_short(spec)!r}: {problem}")


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ option values
def _float(value: str) -> float:
    import math

    number = float(value)
    if not math.isfinite(number):
        raise ValueError("not finite")
    return number


def _int(value: str) -> int:
    return int(value)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean (use true or false)")


def _list(value: str) -> list[str]:
    items = [v.strip() for v in value.split("+")]
    if not all(items):
        raise ValueError("an empty item (items are joined with '+')")
    return items


def _str(value: str) -> str:
    return value


_PLACEMENT = {"device": _str, "dtype": _str}
_NAME = {"name": _str}


@dataclass(frozen=True)
class Kind:
    """One evaluator kind a spec can name.

    Attributes:
        name: The spec's KIND.
        roles: Where it may be used (``"gate"``, ``"judge"``).
        target: What follows ``:``: nothing, a checkpoint, or ``MODEL@URL``.
        options: Accepted option keys and their value parsers.
        summary: One line for docs and errors.
    """

    name: str
    roles: frozenset[str]
    target: Target
    options: dict[str, Callable[[str], Any]]
    summary: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "patch-clip",
            frozenset({"gate"}),
            "none",
            {"grid": _int, "whole": _bool, "threshold": _float, "batch_size": _int, **_NAME},
            "ETA's CLIP (shared) scored on a grid of crops and the whole image, max",
        ),
        Kind(
            "llama-guard-vision",
            frozenset({"gate", "judge"}),
            "checkpoint",
            {
                "threshold": _float,
                "exclude": _list,
                "max_new_tokens": _int,
                **_PLACEMENT,
                **_NAME,
            },
            "Llama Guard 3 Vision / 4 through transformers (image + text)",
        ),
        Kind(
            "shieldgemma2",
            frozenset({"gate"}),
            "checkpoint",
            {"policies": _list, "threshold": _float, "batch_size": _int, **_PLACEMENT, **_NAME},
            "ShieldGemma 2 image policies, P(Yes)",
        ),
        Kind(
            "remote-llama-guard",
            frozenset({"gate", "judge"}),
            "served",
            {
                "threshold": _float,
                "exclude": _list,
                "tokenizer": _str,
                "api_key_env": _str,
                "max_tokens": _int,
                **_NAME,
            },
            "a Llama Guard served behind an OpenAI-compatible endpoint (vLLM)",
        ),
        Kind(
            "llama-guard-text",
            frozenset({"gate", "judge"}),
            "checkpoint",
            {"threshold": _float, "max_new_tokens": _int, **_PLACEMENT, **_NAME},
            "Llama Guard 3 1B / 8B (text): gates text-only requests, judges answers",
        ),
        Kind(
            "qwen3guard",
            frozenset({"gate", "judge"}),
            "checkpoint",
            {
                "threshold": _float,
                "controversial": _str,
                "max_new_tokens": _int,
                **_PLACEMENT,
                **_NAME,
            },
            "Qwen3Guard-Gen (text): gates text-only requests, judges answers",
        ),
    )
}


@dataclass(frozen=True)
class EvaluatorSpec:
    """A parsed spec.

    Attributes:
        kind: The evaluator kind (a key of :data:`KINDS`).
        target: The checkpoint, or the served model name (``MODEL`` of ``MODEL@URL``).
        url: The engine's URL of a served guard.
        options: Parsed option values.
        text: The spec as written.
    """

    kind: str
    target: str | None = None
    url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def parse_spec(text: str, *, role: Role | None = None) -> EvaluatorSpec:
    """Read one spec (no loading). ``role``: also check the kind may be used there.

    Raises:
        SpecError: Unknown kind or option, a missing / unexpected target, a bad value, or a kind
            that cannot take ``role``.
    """
    if not isinstance(text, str):
        raise InvalidInputError(
            f"an evaluator spec must be a string like 'llama-guard-vision:PATH', got "
            f"{type(text).__name__}"
        )
    spec = text.strip()
    if not spec:
        raise SpecError(text, "", "empty; write KIND[:TARGET][?KEY=VALUE,...]")
    head, _, query = spec.partition("?")
    name, colon, target = head.partition(":")
    name = name.strip().lower()
    kind = KINDS.get(name)
    if kind is None:
        raise SpecError(spec, name, f"unknown kind {name!r}; known: {', '.join(sorted(KINDS))}")
    if role is not None:
        check_role(EvaluatorSpec(name, text=spec), role)
    target = target.strip()
    url = None
    if kind.target == "none" and colon:
        raise SpecError(
            spec, target, f"{name} takes no checkpoint (it shares ETA's CLIP); options go after '?'"
        )
    if kind.target != "none" and not target:
        form = "MODEL@URL" if kind.target == "served" else "CHECKPOINT"
        raise SpecError(spec, name, f"{name} needs a target: {name}:{form}")
    if kind.target == "served":
        target, at, url = target.partition("@")
        target, url = target.strip(), url.strip()
        if not at or not target or not url.startswith(("http://", "https://")):
            raise SpecError(spec, target + at + url, f"{name} needs MODEL@URL with an http(s) URL")
    options = _parse_options(spec, kind, query) if query or "?" in spec else {}
    return EvaluatorSpec(name, target or None, url, options, spec)


def _parse_options(spec: str, kind: Kind, query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in query.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise SpecError(spec, item, f"option {item!r} is not KEY=VALUE")
        parser = kind.options.get(key)
        if parser is None:
            raise SpecError(
                spec, key, f"{kind.name} has no option {key!r}; it takes {sorted(kind.options)}"
            )
        if key in out:
            raise SpecError(spec, key, f"option {key!r} is given twice")
        try:
            out[key] = parser(value)
        except ValueError as e:
            raise SpecError(spec, item, f"option {key}={value!r}: {e}") from e
    return out


def check_role(spec: EvaluatorSpec, role: Role) -> None:
    """Raise :class:`SpecError` when ``spec``'s kind cannot be used as ``role``."""
    kind = KINDS.get(spec.kind)
    if kind is None:
        raise SpecError(spec.text, spec.kind, f"unknown kind {spec.kind!r}")
    if role not in kind.roles:
        where = "--gate / gates=" if role == "gate" else "--post-judge / judges="
        can = " or ".join(sorted(kind.roles))
        raise SpecError(
            spec.text or spec.kind,
            spec.kind,
            f"{spec.kind} cannot be used in {where}; it is a {can} only",
        )


# ------------------------------------------------------------------ building
@dataclass
class _Loaded:
    """Checkpoints loaded for one :func:`build_guards` call: one copy per (kind, target, place)."""

    items: dict[tuple[Any, ...], Any] = field(default_factory=dict)


def build_guards(
    gates: Sequence[Any] = (),
    judges: Sequence[Any] = (),
    *,
    clip: Any = None,
    device: Any = None,
    dtype: Any = None,
    local_files_only: bool = False,
    http: Any = None,
) -> tuple[list[Any], list[Any]]:
    """Gates and judges from specs (strings or :class:`EvaluatorSpec`); objects pass through.

    Args:
        gates: Specs or gate objects, in order.
        judges: Specs or judge objects, in order.
        clip: The loaded CLIP pre-evaluator (``patch-clip`` shares it).
        device: Default device of local guard checkpoints (a spec's ``device=`` wins).
        dtype: Default dtype of local guard checkpoints (a spec's ``dtype=`` wins).
        local_files_only: Resolve Hub ids through the local cache only.
        http: :class:`eta_guard.backends.HTTPSettings` for served guards.

    Returns:
        ``(gates, judges)``; a checkpoint named by a gate and a judge is loaded once.

    Raises:
        SpecError: A bad spec, or one that needs CLIP when none is loaded.
        InvalidInputError: A checkpoint that cannot load.
    """
    loaded = _Loaded()
    context = {
        "clip": clip,
        "device": device,
        "dtype": dtype,
        "local_files_only": local_files_only,
        "http": http,
    }
    out: dict[str, list[Any]] = {"gate": [], "judge": []}
    names: set[tuple[str, str]] = set()
    roles: tuple[tuple[Role, Any], ...] = (("gate", gates), ("judge", judges))
    for role, items in roles:
        if isinstance(items, (str, EvaluatorSpec)):
            items = [items]
        for item in items:
            if isinstance(item, (str, EvaluatorSpec)):
                spec = parse_spec(item, role=role) if isinstance(item, str) else item
                check_role(spec, role)
                evaluator = _build(spec, role, context, loaded)
                base, n = evaluator.name, 1
                while (role, evaluator.name) in names:
                    n += 1
                    evaluator.name = f"{base}#{n}"
            else:
                evaluator = item
            names.add((role, str(getattr(evaluator, "name", type(evaluator).__name__))))
            out[role].append(evaluator)
    return out["gate"], out["judge"]


def _build(spec: EvaluatorSpec, role: Role, context: dict[str, Any], loaded: _Loaded) -> Any:
    options = dict(spec.options)
    name = options.pop("name", None) or (spec.kind if role == "gate" else f"{spec.kind}-response")
    mode: GuardMode = "prompt" if role == "gate" else "response"
    place = {
        "device": options.pop("device", None) or context["device"],
        "dtype": options.pop("dtype", None) or context["dtype"],
        "local_files_only": context["local_files_only"],
    }
    if spec.kind == "patch-clip":
        from eta_guard.evaluators.patch_clip import PatchCLIPGate

        if context["clip"] is None:
            raise SpecError(
                spec.text, spec.kind, "patch-clip scans with ETA's CLIP, and none is loaded"
            )
        if "whole" in options:
            options["include_whole"] = options.pop("whole")
        return PatchCLIPGate(context["clip"], name=name, **options)
    if spec.kind == "remote-llama-guard":
        import os

        from eta_guard.backends.remote_guard import RemoteLlamaGuard

        env = options.pop("api_key_env", None)
        if "exclude" in options:
            options["excluded_categories"] = options.pop("exclude")
        assert spec.url is not None and spec.target is not None
        return RemoteLlamaGuard(
            spec.url,
            spec.target,
            mode=mode,
            api_key=os.environ.get(env) if env else None,
            http=context["http"],
            name=name,
            **options,
        )
    if "exclude" in options:
        options["excluded_categories"] = options.pop("exclude")
    cls = _local_class(spec.kind)
    key = (cls, spec.target, str(place["device"]), str(place["dtype"]))
    first = loaded.items.get(key)
    if first is not None:  # one copy of the weights for a gate and a judge
        return cls(first.model, first.processor, name=name, **_mode(spec.kind, mode), **options)
    assert spec.target is not None
    evaluator = cls.from_pretrained(
        spec.target, name=name, **_mode(spec.kind, mode), **place, **options
    )
    loaded.items[key] = evaluator
    return evaluator


def _mode(kind: str, mode: str) -> dict[str, str]:
    return {} if kind == "shieldgemma2" else {"mode": mode}


def _local_class(kind: str) -> Any:
    if kind == "llama-guard-vision":
        from eta_guard.evaluators.llama_guard import LlamaGuardEvaluator

        return LlamaGuardEvaluator
    if kind == "shieldgemma2":
        from eta_guard.evaluators.shieldgemma2 import ShieldGemma2Gate

        return ShieldGemma2Gate
    if kind == "llama-guard-text":
        from eta_guard.evaluators.text_guards import LlamaGuardTextEvaluator

        return LlamaGuardTextEvaluator
    from eta_guard.evaluators.text_guards import Qwen3GuardEvaluator

    return Qwen3GuardEvaluator
