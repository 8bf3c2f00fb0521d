"""Memory each model needs, estimated from its config before any weight is loaded.

Each checkpoint's ``config.json`` is read (``AutoConfig``, offline by default) and the model is
built on PyTorch's ``meta`` device (shapes only, no storage), so counting its parameters costs
about a second and no memory even for 8B models. Bytes then follow from the dtype (or the
quantization) the model will be loaded with.

What the estimate includes, and what it leaves out:

- **weights**: every parameter once (tied weights counted once). Quantized (bitsandbytes-style)
  ``nn.Linear`` weights cost 4 or 8 bits each plus their scales (4-bit: one fp32 absmax per
  64-weight block; 8-bit: one fp32 scale per output row); the output embedding (``lm_head``) and
  every other parameter stay in the load dtype, as transformers does.
- **KV cache** (VLM only): ``2 x layers x kv_heads x head_dim x bytes x kv_tokens x
  kv_sequences``: the best-of-N search keeps ``num_candidates`` rows plus the vanilla answer's
  cache. Defaults: 2048 tokens (a LLaVA-1.5 prompt is ~600 with its 576 image tokens) and 6 rows.
- **not included**: activations of one forward pass, the CUDA context (~0.3-0.5 GiB per
  device), allocator fragmentation, the image/text processors. Keep ~10-20% headroom.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from eta_guard.errors import InvalidInputError

#: Bytes per parameter of the dtypes ``from_pretrained`` accepts (None: torch's default, fp32).
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ROLES = ("vlm", "clip", "reward_model")
#: Evaluator-spec kinds with a local checkpoint, and the class that loads each.
_GUARD_CLASSES = {
    "llama-guard-vision": "AutoModelForImageTextToText",
    "shieldgemma2": "ShieldGemma2ForImageClassification",
    "llama-guard-text": "AutoModelForCausalLM",
    "qwen3guard": "AutoModelForCausalLM",
}
#: bitsandbytes 4-bit quantizes in blocks of 64 weights, each with an fp32 absmax.
_BNB4_BLOCK = 64
_ARMORM_ARCHITECTURES = ("LlamaForRewardModelWithGating",)
DEFAULT_KV_TOKENS = 2048


@dataclass(frozen=True)
class ModelMemory:
    """The estimate for one model.

    Attributes:
        role: ``"vlm"``, ``"clip"`` or ``"reward_model"``.
        name: The checkpoint id or path.
        parameters: Parameter count (exact for the architecture in the config).
        precision: How the weights are stored, e.g. ``"bfloat16"`` or ``"4-bit + float16"``.
        weight_bytes: Bytes of the weights (and quantization scales).
        kv_cache_bytes: Bytes of the KV cache term (VLM only, else 0).
        device: Where the model is placed (as given; ``None``: the shared default).
        notes: Anything the count could not cover.
    """

    role: str
    name: str
    parameters: int
    precision: str
    weight_bytes: int
    kv_cache_bytes: int = 0
    device: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-model estimates, with totals overall and per device."""

    models: list[ModelMemory] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(m.total_bytes for m in self.models)

    def per_device(self) -> dict[str, int]:
        """Total bytes per placement (``"default"`` for models on the shared device)."""
        out: dict[str, int] = {}
        for m in self.models:
            key = m.device or "default"
            out[key] = out.get(key, 0) + m.total_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "models": [
                {
                    "role": m.role,
                    "name": m.name,
                    "parameters": m.parameters,
                    "precision": m.precision,
                    "weight_bytes": m.weight_bytes,
                    "kv_cache_bytes": m.kv_cache_bytes,
                    "total_bytes": m.total_bytes,
                    "device": m.device,
                    "notes": list(m.notes),
                }
                for m in self.models
            ],
            "total_bytes": self.total_bytes,
            "per_device": self.per_device(),
        }


def gib(n_bytes: int) -> float:
    """Bytes in GiB (2**30)."""
    return n_bytes / 2**30


def format_bytes(n_bytes: int) -> str:
    """``"13.16 GiB"``, ``"1.50 MiB"``, ``"12.0 KiB"``: binary units, two decimals."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes} B"


def estimate_memory(
    vlm: str | None = None,
    clip: str | None = None,
    reward_model: str | None = None,
    *,
    device: Any = None,
    dtype: Any = None,
    vlm_kwargs: Mapping[str, Any] | None = None,
    clip_kwargs: Mapping[str, Any] | None = None,
    reward_model_kwargs: Mapping[str, Any] | None = None,
    preset: Any = None,
    kv_tokens: int = DEFAULT_KV_TOKENS,
    kv_sequences: int | None = None,
    num_candidates: int = 5,
    local_files_only: bool = True,
    trust_remote_code: bool = False,
    guards: Any = (),
) -> MemoryEstimate:
    """Estimate the memory of the models :meth:`eta_guard.ETA.from_pretrained` would load.

    Takes the same placement arguments as ``ETA.from_pretrained`` (shared ``device``/``dtype``,
    per-model ``device``/``dtype``/``model_kwargs={"quantization_config": ...}`` in the
    ``*_kwargs``, and a ``preset``), reads only the configs, and loads no weight.

    Args:
        vlm: VLM checkpoint (``None``: skip it).
        clip: CLIP checkpoint (transformers layout; ``None``: skip it).
        reward_model: Reward model checkpoint (``None``: skip it).
        device: Shared default device (only reported, per device).
        dtype: Shared default dtype (``None``: float32, as transformers loads it).
        vlm_kwargs: As in ``ETA.from_pretrained``.
        clip_kwargs: As in ``ETA.from_pretrained``.
        reward_model_kwargs: As in ``ETA.from_pretrained``.
        preset: A preset name or :class:`eta_guard.presets.Preset` (its per-model dtypes).
        kv_tokens: Sequence length of the VLM's KV-cache term.
        kv_sequences: Rows of the KV cache (default: ``num_candidates + 1``).
        num_candidates: ETA's best-of-N width, for the default ``kv_sequences``.
        local_files_only: Read configs from the local cache only (default: no network).
        trust_remote_code: Allow configs that need the checkpoint's own code.
        guards: Evaluator specs (gates and judges, :mod:`eta_guard.evaluators.specs`): each
            local guard checkpoint once per (checkpoint, device, dtype), as ``build_guards``
            loads it; ``patch-clip`` shares CLIP and a served guard loads nothing here.

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        InvalidInputError: A config cannot be read, a dtype/quantization is not understood, or
            ``kv_tokens``/``kv_sequences`` is not positive.
    """
    from eta_guard.placement import resolve_placements

    if kv_tokens < 1:
        raise InvalidInputError(f"kv_tokens={kv_tokens!r} must be >= 1")
    rows = num_candidates + 1 if kv_sequences is None else kv_sequences
    if rows < 1:
        raise InvalidInputError(f"kv_sequences={kv_sequences!r} must be >= 1")
    placements = resolve_placements(
        device=device,
        dtype=dtype,
        vlm_kwargs=vlm_kwargs,
        clip_kwargs=clip_kwargs,
        reward_model_kwargs=reward_model_kwargs,
        preset=preset,
    )
    names = {"vlm": vlm, "clip": clip, "reward_model": reward_model}
    models = []
    for role in _ROLES:
        name = names[role]
        if name is None:
            continue
        place = placements[role]
        model_kwargs = dict(place.kwargs.get("model_kwargs") or {})
        models.append(
            estimate_model(
                name,
                role,
                dtype=model_kwargs.get("dtype", place.dtype),
                quantization_config=model_kwargs.get("quantization_config"),
                device=_device_label(place.device, model_kwargs.get("device_map")),
                kv_tokens=kv_tokens if role == "vlm" else 0,
                kv_sequences=rows,
                local_files_only=local_files_only,
                trust_remote_code=trust_remote_code,
            )
        )
    if not guards and preset is not None:  # the preset's own gates and judges, as loading does
        from eta_guard.presets import get_preset

        chosen = get_preset(preset)
        guards = (*chosen.gates, *chosen.judges)
    models += _guard_estimates(guards, device, dtype, local_files_only)
    return MemoryEstimate(models)


def _guard_estimates(
    guards: Any, device: Any, dtype: Any, local_files_only: bool
) -> list[ModelMemory]:
    from eta_guard.evaluators.specs import EvaluatorSpec, parse_spec

    out, seen = [], set()
    for item in [guards] if isinstance(guards, (str, EvaluatorSpec)) else list(guards or ()):
        spec = parse_spec(item) if isinstance(item, str) else item
        model_class = _GUARD_CLASSES.get(spec.kind)
        if model_class is None or spec.target is None:
            continue  # shares CLIP (patch-clip) or runs on an engine (remote-llama-guard)
        place_device = spec.options.get("device", device)
        place_dtype = spec.options.get("dtype", dtype)
        key = (spec.target, str(place_device), str(place_dtype))
        if key in seen:  # a gate and a judge on one checkpoint share its weights
            continue
        seen.add(key)
        out.append(
            estimate_model(
                spec.target,
                "guard",
                dtype=place_dtype,
                device=None if place_device is None else str(place_device),
                local_files_only=local_files_only,
                model_class=model_class,
                label=spec.kind,
            )
        )
    return out


def estimate_model(
    name_or_path: str,
    role: str,
    *,
    dtype: Any = None,
    quantization_config: Any = None,
    device: str | None = None,
    kv_tokens: int = 0,
    kv_sequences: int = 1,
    local_files_only: bool = True,
    trust_remote_code: bool = False,
    model_class: str | None = None,
    label: str | None = None,
) -> ModelMemory:
    """Estimate one model (see :func:`estimate_memory`); ``kv_tokens=0`` leaves out the cache.

    ``role="guard"`` takes ``model_class`` (a transformers class name) and ``label`` (the spec's
    kind, shown as the role)."""
    if role not in (*_ROLES, "guard"):
        raise InvalidInputError(f"role={role!r} is not one of {(*_ROLES, 'guard')}")
    if role == "clip":
        from eta_guard.evaluators.clip import is_open_clip_name

        if isinstance(name_or_path, str) and is_open_clip_name(name_or_path):
            raise InvalidInputError(
                f"CLIP {name_or_path!r} is an open_clip model; the memory estimate reads "
                "transformers configs only (open_clip ViT-L/14 is ~428M parameters, 1.6 GiB fp32)"
            )
    config = _read_config(name_or_path, role, local_files_only, trust_remote_code)
    counts = count_parameters(config, role, model_class=model_class)
    bits = _quant_bits(quantization_config if quantization_config is not None else config)
    dtype_name = _dtype_name(dtype, config)
    per_param = _DTYPE_BYTES[dtype_name]
    notes: list[str] = []
    if bits is None:
        weight_bytes = counts.total * per_param
        precision = dtype_name
    else:
        q = counts.quantizable_weights
        scales = (
            4 * -(-q // _BNB4_BLOCK) if bits == 4 else 4 * counts.quantizable_rows
        )  # fp32 absmax per block / per row
        weight_bytes = (counts.total - q) * per_param + q * bits // 8 + scales
        precision = f"{bits}-bit linear + {dtype_name}"
    kv = 0
    if kv_tokens:
        kv = _kv_bytes(config, per_param) * kv_tokens * kv_sequences
    if role == "clip" and getattr(config, "model_type", "") not in ("clip", "siglip", "siglip2"):
        notes.append(f"model_type {getattr(config, 'model_type', None)!r} counted as AutoModel")
    return ModelMemory(
        role=f"guard: {label}" if role == "guard" and label else role,
        name=str(name_or_path),
        parameters=counts.total,
        precision=precision,
        weight_bytes=int(weight_bytes),
        kv_cache_bytes=int(kv),
        device=device,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of a model built from its config.

    Attributes:
        total: All parameters (tied ones once).
        quantizable_weights: Weights of ``nn.Linear`` layers other than the output embedding
            (what bitsandbytes quantizes).
        quantizable_rows: Output rows of those layers (8-bit keeps one scale per row).
    """

    total: int
    quantizable_weights: int
    quantizable_rows: int


def count_parameters(config: Any, role: str, *, model_class: str | None = None) -> ParameterCount:
    """Build the model of ``config`` on the meta device and count its parameters.

    ``role`` picks the auto class: ``AutoModelForImageTextToText`` (vlm), ``AutoModel`` (clip),
    ``AutoModelForSequenceClassification`` (reward_model). An ArmoRM config
    (``LlamaForRewardModelWithGating``) counts its Llama backbone plus the published heads:
    a regression layer (hidden -> num_objectives, no bias), the gating MLP (``gating_n_hidden``
    linear layers of ``gating_hidden_dim`` with bias, then one to num_objectives with bias, and
    a logit scale) and the num_objectives x num_objectives reward transform.
    """
    import torch
    import transformers
    from transformers import (
        AutoModel,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    armo = role == "reward_model" and any(
        a in _ARMORM_ARCHITECTURES for a in (getattr(config, "architectures", None) or [])
    )
    if model_class is not None:  # a guard: its loader's class (``model_class`` of a spec kind)
        auto = getattr(transformers, model_class)
    else:
        auto = {
            "vlm": AutoModelForImageTextToText,
            "clip": AutoModel,
            "reward_model": AutoModel if armo else AutoModelForSequenceClassification,
        }[role]
    try:
        with torch.device("meta"):
            model = auto.from_config(config) if hasattr(auto, "from_config") else auto(config)
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(
            f"cannot build the {role} from its config ({type(config).__name__}) to count its "
            f"parameters: {e}"
        ) from e
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = sum(p.numel() for p in model.parameters())
    q_weights = q_rows = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            q_weights += module.weight.numel()
            q_rows += module.weight.shape[0]
    if armo:
        heads, head_rows = _armorm_heads(config)
        total += heads
        q_weights += head_rows[0]
        q_rows += head_rows[1]
    return ParameterCount(total=total, quantizable_weights=q_weights, quantizable_rows=q_rows)


def _armorm_heads(config: Any) -> tuple[int, tuple[int, int]]:
    """ArmoRM's heads: (parameters, (linear weights, linear rows)) from the published layout."""
    hidden = int(config.hidden_size)
    k = int(getattr(config, "num_objectives", 19))
    gd = int(getattr(config, "gating_hidden_dim", 1024))
    n = int(getattr(config, "gating_n_hidden", 3))
    linears = [(hidden, k, False)]  # regression layer
    width = hidden
    for _ in range(n):
        linears.append((width, gd, True))
        width = gd
    linears.append((width, k, True))
    params = sum(i * o + (o if b else 0) for i, o, b in linears) + 1 + k * k  # logit_scale, T
    return params, (sum(i * o for i, o, _ in linears), sum(o for _, o, _ in linears))


def _read_config(name: str, role: str, local_files_only: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"{role} name_or_path={name!r} must be a non-empty string")
    try:
        return AutoConfig.from_pretrained(
            name, local_files_only=local_files_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        short = str(e) if len(str(e)) <= 300 else str(e)[:297] + "..."
        raise InvalidInputError(
            f"cannot read the config of the {role} {name!r}: {short}; check the path, or that the "
            "model id is in the local Hugging Face cache (only config.json is needed)"
        ) from e


def _dtype_name(dtype: Any, config: Any) -> str:
    """The load dtype as a name of :data:`_DTYPE_BYTES` (``"auto"``: the config's own)."""
    from eta_guard._device import resolve_dtype

    resolved = resolve_dtype(dtype)
    if resolved == "auto":
        resolved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(resolved, str):
            resolved = resolve_dtype(resolved)
    if resolved is None:
        return "float32"  # transformers loads into torch's default dtype
    name = str(resolved).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise InvalidInputError(f"dtype={dtype!r} ({name}) has no size in the memory estimate")
    return name


def _quant_bits(source: Any) -> int | None:
    """4 or 8 for a bitsandbytes-style quantization config (object, dict or a model config)."""
    q = source
    if not isinstance(source, Mapping) and hasattr(source, "model_type"):  # a model config
        q = getattr(source, "quantization_config", None)
    if q is None:
        return None
    get = q.get if isinstance(q, Mapping) else lambda k, d=None: getattr(q, k, d)
    if get("load_in_4bit", False):
        return 4
    if get("load_in_8bit", False):
        return 8
    bits = get("bits", None)
    if bits in (4, 8):
        return int(bits)
    raise InvalidInputError(
        f"quantization_config={q!r} is not understood by the memory estimate; it counts "
        "bitsandbytes load_in_4bit / load_in_8bit and 4- or 8-bit configs with a 'bits' field"
    )


def _kv_bytes(config: Any, per_param: int) -> int:
    """KV-cache bytes per token and sequence: 2 (K, V) x layers x kv_heads x head_dim x bytes."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * per_param


def _device_label(device: Any, device_map: Any) -> str | None:
    if device_map is not None:
        return f"device_map={device_map}" if isinstance(device_map, str) else "device_map"
    return None if device is None else str(device)


def kv_bytes_per_token(config: Any, dtype: Any = None) -> int:
    """KV-cache bytes one token of one sequence holds: 2 x layers x kv_heads x head_dim x bytes.

    Args:
        config: the model's (or its text model's) transformers config.
        dtype: the cache dtype (a ``torch.dtype`` or a name; ``None``: float32, transformers'
            default load dtype; ``"auto"``: the config's own).
    """
    return _kv_bytes(config, _DTYPE_BYTES[_dtype_name(dtype, config)])
