"""Named setups: ``preset="paper"`` reproduces the reference LLaVA-1.5 setup in one switch.

A :class:`Preset` holds two kinds of settings:

- **ETAConfig fields** (``config``): prompting and the seed; they travel with a saved config.
- **load settings** (``dtypes``, ``vlm_autocast_dtype``): device-specific, so they are not part
  of ``ETAConfig``; they apply when the models are loaded.

Explicit arguments win over a preset: a per-model or shared ``device``/``dtype`` overrides the
preset's dtypes, and every field of the given ``ETAConfig`` that differs from its default
overrides the preset's value for it.

Sources of the ``"paper"`` values (github DripNowhy/ETA, the paper's code, and
haotian-liu/LLaVA it vendors):

- system text: ``llava/conversation.py``, ``conv_llava_v1.system`` (the ``llava_v1`` conversation
  that ``eta_quick_use.py`` / ``eta_safetybench.py`` pass as ``conv_mode``);
- pad to square with the image processor's mean: ``llava/mm_utils.py`` ``process_images`` with
  ``image_aspect_ratio == "pad"`` (``expand2square(image, tuple(int(x*255) for x in
  image_processor.image_mean))``), the setting of ``liuhaotian/llava-v1.5-7b``;
- VLM: weights in float16 (``llava/model/builder.py`` loads ``torch_dtype=torch.float16``), run
  under ``torch.cuda.amp.autocast(dtype=torch.bfloat16)`` (``eta_quick_use.py``);
- CLIP: ``CLIPModel.from_pretrained`` without a dtype, i.e. float32 (``generate/eta_generation.py``);
- RM: ``ArmoRMPipeline(torch_dtype=torch.bfloat16)`` (``generate/eta_generation.py``), each
  conversation scored alone, under bfloat16 autocast with the flash and memory-efficient SDPA
  kernels off (``reward_numerics="reference"``);
- seed 1: ``--seed`` default of ``eta_quick_use.py`` / ``eta_safetybench.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from eta_guard.errors import InvalidInputError

if TYPE_CHECKING:
    from eta_guard.config import ETAConfig

#: The ``llava_v1`` conversation's system text (LLaVA-1.5; reference ``conv_llava_v1``).
LLAVA_V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Preset:
    """A named set of ETAConfig fields and load settings.

    Attributes:
        name: The name ``preset=`` / ``--preset`` takes.
        description: One line for ``--help`` and docs.
        config: ETAConfig fields to set.
        dtypes: Load dtype per role (``"vlm"``, ``"clip"``, ``"reward_model"``).
        cpu_dtypes: Per-role dtypes that replace ``dtypes`` for a model placed on the CPU.
        vlm_autocast_dtype: Run the VLM's forward under ``torch.autocast`` with this dtype.
        vlm_image_mean: The VLM image processor's mean, used to pad images to a square when the
            VLM runs on an engine and its processor config is not at hand.
        vlm: The VLM checkpoint the preset was written for (a suggestion, never enforced).
        clip: The CLIP checkpoint it was written for.
        reward_model: The reward model it was written for.
        gates: Evaluator specs added as gates (:mod:`eta_guard.evaluators.specs`) when the
            caller gives none.
        judges: Evaluator specs added as judges when the caller gives none.
    """

    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    cpu_dtypes: dict[str, str] = field(default_factory=dict)
    vlm_autocast_dtype: str | None = None
    vlm_image_mean: tuple[float, float, float] | None = None
    vlm: str | None = None
    clip: str | None = None
    reward_model: str | None = None
    gates: tuple[str, ...] = ()
    judges: tuple[str, ...] = ()

    def apply_to_config(self, config: ETAConfig | None = None) -> ETAConfig:
        """The preset's fields, then every field of ``config`` that differs from the default."""
        from eta_guard.config import ETAConfig

        base = ETAConfig()
        explicit = {}
        if config is not None:
            explicit = {
                k: v for k, v in config.model_dump().items() if v != getattr(base, k, object())
            }
        return ETAConfig(**{**self.config, **explicit})


PAPER = Preset(
    name="paper",
    description="The paper's LLaVA-1.5 setup: llava_v1 system text, pad-to-square images, "
    "VLM fp16 under bf16 autocast, CLIP fp32, RM bf16 scored alone under bf16 autocast, seed 1.",
    config={
        "system_prompt": LLAVA_V1_SYSTEM_PROMPT,
        "pad_images_to_square": True,
        "seed": 1,
        "reward_numerics": "reference",
    },
    dtypes={"vlm": "float16", "clip": "float32", "reward_model": "bfloat16"},
    # torch's CPU autocast cannot mix float16 weights with bfloat16 compute (torch.cat raises
    # "Unexpected floating ScalarType"), so on the CPU the VLM's weights are bfloat16 too.
    cpu_dtypes={"vlm": "bfloat16"},
    vlm_autocast_dtype="bfloat16",
    # LLaVA-1.5's image processor is CLIP ViT-L/14-336's: OpenAI CLIP's mean
    # (openai/clip-vit-large-patch14-336 preprocessor_config.json), padded as (122, 116, 104).
    vlm_image_mean=(0.48145466, 0.4578275, 0.40821073),
    vlm="llava-hf/llava-1.5-7b-hf",
    clip="openai/clip-vit-large-patch14-336",
    reward_model="RLHFlow/ArmoRM-Llama3-8B-v0.1",
)

#: Llama Guard 3 Vision, the guard both cross-modal evaluators of :data:`CROSS_MODAL` load (once).
LLAMA_GUARD_3_VISION = "meta-llama/Llama-Guard-3-11B-Vision"

CROSS_MODAL = Preset(
    name="cross-modal",
    description="Harm in the image+question combination (SIUO-style): CLIP and a Llama Guard 3 "
    "Vision prompt-mode gate on the input, the RM and the same guard in response mode on the "
    "answer, rule 'and'. One copy of the guard (11B, bf16) serves both.",
    config={"decision_rule": "and"},
    dtypes={"clip": "float32", "reward_model": "bfloat16"},
    clip="openai/clip-vit-large-patch14-336",
    reward_model="RLHFlow/ArmoRM-Llama3-8B-v0.1",
    # Why these: CLIP sees the image alone and the RM the answer alone, so an innocent image with
    # a harmful question (a balcony photo, "give me some encouragement") passes both. The guard
    # reads image and question together (gate) and the answer with them (judge). Why 'and': the
    # answer to a flagged input is kept when the RM and the guard both clear it (the paper's
    # guard against over-refusal: CLIP at 0.16 flags many benign images); 'or' / 'pre_only'
    # would align every flagged input. The judge is what catches an encouraging answer the RM
    # scores as safe, since only the guard sees the question it answers.
    gates=(f"llama-guard-vision:{LLAMA_GUARD_3_VISION}?dtype=bfloat16",),
    judges=(f"llama-guard-vision:{LLAMA_GUARD_3_VISION}?dtype=bfloat16",),
)

PRESETS: dict[str, Preset] = {PAPER.name: PAPER, CROSS_MODAL.name: CROSS_MODAL}


def get_preset(preset: str | Preset) -> Preset:
    """The :class:`Preset` named ``preset`` (a ``Preset`` is returned as is).

    Raises:
        InvalidInputError: Unknown name.
    """
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str) and preset.strip().lower() in PRESETS:
        return PRESETS[preset.strip().lower()]
    raise InvalidInputError(f"preset={preset!r} is not known; use one of {sorted(PRESETS)}")
