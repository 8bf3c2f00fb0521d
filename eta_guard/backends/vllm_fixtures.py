"""Tiny checkpoints for checking the remote backend against a real vLLM engine (offline, random).

``python -m eta_guard.backends.vllm_fixtures DIR`` writes:

- ``DIR/vlm``: a tiny LLaVA whose language model has attention heads of size 32 (vLLM's CPU
  attention refuses smaller ones), loaded locally by :meth:`eta_guard.ETA.from_pretrained` and
  served by vLLM as an image-text model (its weights in llava-hf's layout: :func:`engine_layout`);
- ``DIR/lm``: the same language model (same weights, tokenizer and chat template) as a plain
  ``LlamaForCausalLM``, served by vLLM for text requests on the +cpu torch (an image model needs
  the torch build with a torchvision: docs/scaling.md), so local and remote greedy answers can be
  compared token for token;
- ``DIR/rm``: a tiny Llama sequence-classification reward model (one label, heads of size 32,
  the Llama-3 chat template), served by vLLM's ``/classify`` and loaded locally alike;
- ``DIR/armorm``: the ArmoRM replica of :mod:`eta_guard.replicas.armorm` (same weights and
  tokenizer) with its attention regrouped into heads of size 32, served through the
  :mod:`eta_guard.vllm_plugin` and loaded locally by ``RewardPostEvaluator`` alike;
- ``DIR/clip``: the CLIP replica of :mod:`eta_guard.replicas.clip` with its two special tokens
  moved to the END of the vocabulary, as in ``openai/clip-vit-large-patch14-336`` (ids 49406 and
  49407 there; vLLM's CLIP uses id 0 as its image placeholder and refuses a tokenizer whose id 0
  is special); the embedding rows are permuted with the ids, and the attention is regrouped
  into one head of 32 (vLLM's CPU attention refuses heads of 16; the projections keep their
  shapes, so the weights load unchanged), and ``projection_dim`` the same in the sub-configs;
- the tiny CLIP and reward model of :func:`eta_guard.testing.build_tiny_checkpoints`.

Random weights: mechanics and cost, never safety.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def build(directory: str | Path, *, seed: int = 0) -> dict[str, str]:
    """Build (or reuse) the checkpoints under ``directory``; returns their paths by role."""
    import torch
    from transformers import (
        AutoConfig,
        AutoProcessor,
        AutoTokenizer,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlavaForConditionalGeneration,
    )

    from eta_guard.testing import LLAVA_TEMPLATE, build_tiny_checkpoints, save_vlm_checkpoint

    root = Path(directory)
    tiny = build_tiny_checkpoints(root / "base", seed=seed)
    vlm_dir, lm_dir, rm_dir = root / "vlm", root / "lm", root / "rm"
    armorm_dir, clip_dir = root / "armorm", root / "clip"
    paths = {
        "vlm": str(vlm_dir),
        "lm": str(lm_dir),
        "rm": str(rm_dir),
        "armorm": str(armorm_dir),
        "engine_clip": str(clip_dir),
        "clip": tiny.clip,
        "reward_model": tiny.reward_model,
    }
    if (lm_dir / "eta_ready.json").exists():
        engine_layout(vlm_dir)  # folders built before the vLLM layout (idempotent, tiny)
        return paths
    base = LlavaForConditionalGeneration.from_pretrained(tiny.vlm)
    processor = AutoProcessor.from_pretrained(tiny.vlm)
    config: Any = base.config
    text: Any = config.text_config
    text.num_attention_heads, text.num_key_value_heads = 2, 1  # head size 64 / 2 = 32
    text.head_dim = text.hidden_size // text.num_attention_heads
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    save_vlm_checkpoint(vlm_dir, model, processor, processor.tokenizer)
    engine_layout(vlm_dir)

    lm = LlamaForCausalLM(text).eval()
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.generation_config = model.generation_config
    lm.save_pretrained(lm_dir)
    tokenizer = processor.tokenizer
    tokenizer.chat_template = LLAVA_TEMPLATE
    tokenizer.save_pretrained(lm_dir)

    rm_config: Any = AutoConfig.from_pretrained(tiny.reward_model)
    rm_config.num_attention_heads, rm_config.num_key_value_heads = 2, 1
    rm_config.head_dim = rm_config.hidden_size // 2
    torch.manual_seed(seed + 1)
    rm = LlamaForSequenceClassification(rm_config).eval()
    with torch.no_grad():  # a wider head than the default init, so rewards spread around 0
        rm.score.weight.normal_(0.0, 1.0)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny.reward_model).save_pretrained(rm_dir)
    _armorm(armorm_dir, seed=seed)
    _clip(clip_dir, seed=seed)
    (lm_dir / "eta_ready.json").write_text(json.dumps(paths))
    return paths


def engine_layout(folder: str | Path, copy_to: str | Path | None = None) -> Path:
    """Rewrite a saved LLaVA's weights in llava-hf's layout, which vLLM's loader reads.

    In place, or into a copy of the folder at ``copy_to`` (which is returned; a shared
    checkpoint cache is never rewritten under another reader). One ``model.safetensors``
    (the tiny and bench-size LLaVAs are saved unsharded).

    transformers 5 saves the vision tower's weights as ``vision_tower.embeddings...``; vLLM 0.32
    maps checkpoint names onto its ``CLIPVisionModel``, which wants the published checkpoints'
    ``vision_tower.vision_model.embeddings...`` (otherwise: "There is no module or parameter
    named 'vision_tower.embeddings'" at start-up). transformers loads either layout to the same
    tensors, so the folder stays the local model too. Idempotent.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    target = Path(folder if copy_to is None else copy_to)
    if copy_to is not None:
        shutil.copytree(folder, target, dirs_exist_ok=True)
    if list(target.glob("*.safetensors.index.json")):
        raise ValueError(f"{target}: sharded checkpoints are not supported here")
    file = target / "model.safetensors"
    state = load_file(file)
    old, new = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        (new + k[len(old) :] if k.startswith(old) and not k.startswith(new) else k): v
        for k, v in state.items()
    }
    if renamed.keys() != state.keys():
        save_file(renamed, file, metadata={"format": "pt"})
    return target


def _armorm(out: Path, *, seed: int) -> None:
    """The ArmoRM replica with 2 query heads of 32 and 1 KV head (4x16 and 2x16 there).

    The projections keep their shapes (64 = 2 x 32, 32 = 1 x 32), so the replica's weights
    load unchanged; only the head grouping differs.
    """
    from transformers import AutoTokenizer

    from eta_guard.evaluators.armorm import LlamaForRewardModelWithGating
    from eta_guard.replicas.armorm import build_armorm_replica

    replica = build_armorm_replica(out.with_name("armorm-replica"), seed=seed)
    model = LlamaForRewardModelWithGating.from_pretrained(
        replica, num_attention_heads=2, num_key_value_heads=1, head_dim=32
    ).eval()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(replica).save_pretrained(out)
    config_file = out / "config.json"
    data = json.loads(config_file.read_text())
    data["architectures"] = ["LlamaForRewardModelWithGating"]
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _clip(out: Path, *, seed: int) -> None:
    """The CLIP replica with its special tokens last (the real CLIP's id layout), heads of 32."""
    import torch
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    from eta_guard.replicas.clip import build_clip_replica

    source = out.with_name("clip-replica")
    build_clip_replica(source, seed=seed)
    replica = CLIPModel.from_pretrained(source)
    config: Any = replica.config
    for part in (config.text_config, config.vision_config):
        part.num_attention_heads = part.hidden_size // 32
        # As in the real config (768 in all three); vLLM sizes its input buffer from the text
        # config's, which the replica leaves at transformers' default (512).
        part.projection_dim = config.projection_dim
    model = CLIPModel(config).eval()
    model.load_state_dict(replica.state_dict())
    processor = CLIPProcessor.from_pretrained(source)
    tokenizer = processor.tokenizer
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    old = state["model"]["vocab"]
    specials = [t for t in old if t in tokenizer.all_special_tokens]
    order = sorted((t for t in old if t not in specials), key=old.__getitem__) + sorted(
        specials, key=old.__getitem__
    )
    vocab = {token: i for i, token in enumerate(order)}
    # Pairs, as the tokenizers backend takes them (the class's annotation says list[str]).
    merges: Any = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]
    ]
    new_tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    new_tokenizer.model_max_length = tokenizer.model_max_length
    embedding = model.text_model.embeddings.token_embedding.weight
    with torch.no_grad():
        embedding.copy_(embedding[torch.tensor([old[t] for t in order])].clone())
    text = model.config.text_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = tokenizer.convert_ids_to_tokens(getattr(text, name))
        setattr(text, name, vocab[token])
    model.text_model.eos_token_id = text.eos_token_id
    model.save_pretrained(out)
    CLIPProcessor(
        image_processor=processor.image_processor, tokenizer=new_tokenizer
    ).save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--engine-copy":  # e.g. the bench-size LLaVA
        print(engine_layout(sys.argv[2], copy_to=sys.argv[3]))
    elif len(sys.argv) == 2:
        print(json.dumps(build(sys.argv[1])))
    else:
        sys.exit(
            "usage: python -m eta_guard.backends.vllm_fixtures DIR\n"
            "       python -m eta_guard.backends.vllm_fixtures --engine-copy LLAVA_DIR OUT_DIR"
        )
