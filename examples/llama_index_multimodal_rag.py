"""Multimodal RAG over a folder of images with LlamaIndex, made safe by ETA.

1. Index a folder of local images with ``ETAClipEmbedding`` (the CLIP that ETA's
   pre-evaluator uses, so one model serves retrieval and safety).
2. Retrieve for each question, and screen the retrieved images with
   ``ETAImageSafetyPostprocessor`` before synthesis.
3. Answer with ``ETAMultiModalLLM`` in a multimodal ``RetrieverQueryEngine``.
4. Score the answers with ``ETASafetyEvaluator`` in a ``BatchEvalRunner``.

Runs offline in about a minute on CPU, on tiny RANDOM checkpoints built in code (their answers
are gibberish and their scores mean nothing; they show the mechanics)::

    python examples/llama_index_multimodal_rag.py

With real models (downloaded once into the Hugging Face cache) and your own images::

    python examples/llama_index_multimodal_rag.py --images ./photos \\
        --vlm llava-hf/llava-1.5-7b-hf \\
        --clip openai/clip-vit-large-patch14-336 \\
        --reward-model RLHFlow/ArmoRM-Llama3-8B-v0.1
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded unless you unset this

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
QUESTIONS = ["What color is the square?", "Describe the picture."]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=Path, help="folder of images (default: generated test images)")
    p.add_argument("--vlm", help="VLM id or path (default: a tiny random checkpoint)")
    p.add_argument("--clip", help="CLIP id or path (default: a tiny random checkpoint)")
    p.add_argument("--reward-model", help="reward-model id or path (default: a tiny random one)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow checkpoint code (ArmoRM no longer needs it)",
    )
    p.add_argument("--workdir", type=Path, help="where tiny checkpoints and images are written")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--mode", choices=["drop", "flag"], default="drop", help="unsafe images: drop or flag"
    )
    p.add_argument("--pre-threshold", type=float, help="CLIP threshold (default: the paper's 0.16)")
    p.add_argument("--question", action="append", help="question(s) to ask (repeatable)")
    return p.parse_args()


def image_folder(args: argparse.Namespace, workdir: Path) -> Path:
    if args.images:
        return args.images
    from eta_guard.testing import make_test_image

    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("red", "green", "blue", "checker", "noise"):
        make_test_image(kind, size=(96, 96)).save(folder / f"{kind}.png")
    return folder


def main() -> None:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eta-llama-index-"))

    from llama_index.core import Settings
    from llama_index.core.evaluation import BatchEvalRunner
    from llama_index.core.indices import MultiModalVectorStoreIndex
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import ImageNode
    from llama_index.embeddings.eta import ETAClipEmbedding
    from llama_index.evaluation.eta import ETASafetyEvaluator
    from llama_index.llms.eta import ETAMultiModalLLM
    from llama_index.postprocessor.eta import ETAImageSafetyPostprocessor

    from eta_guard import ETAConfig

    vlm, clip, reward_model = args.vlm, args.clip, args.reward_model
    if not (vlm and clip and reward_model):
        from eta_guard.testing import build_tiny_checkpoints

        tiny = build_tiny_checkpoints(workdir / "tiny")
        vlm, clip, reward_model = (
            vlm or tiny.vlm,
            clip or tiny.clip,
            reward_model or tiny.reward_model,
        )
        print(f"Using tiny random checkpoints in {workdir / 'tiny'} (answers are gibberish).")

    overrides = {} if args.pre_threshold is None else {"pre_threshold": args.pre_threshold}
    config = ETAConfig(num_candidates=2, seed=0, **overrides)
    load_kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}

    # One ETA engine (VLM + CLIP + reward model), loaded on first use and shared by all parts.
    llm = ETAMultiModalLLM(
        vlm=vlm,
        clip=clip,
        reward_model=reward_model,
        config=config,
        max_new_tokens=args.max_new_tokens,
        load_kwargs=load_kwargs,
    )
    embed = ETAClipEmbedding(evaluator=llm)
    Settings.llm, Settings.embed_model = llm, embed  # nothing reaches for OpenAI

    # 1. Index the folder of images with ETA's CLIP.
    folder = image_folder(args, workdir)
    nodes = [
        ImageNode(image_path=str(path), metadata={"file_name": path.name})
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    index = MultiModalVectorStoreIndex(nodes, embed_model=embed, image_embed_model=embed)
    print(f"Indexed {len(nodes)} images from {folder}.")

    # 2-3. Retrieve, screen the images, answer with ETA.
    retriever = index.as_retriever(image_similarity_top_k=2)
    screen = ETAImageSafetyPostprocessor(evaluator=llm, mode=args.mode)
    engine = RetrieverQueryEngine.from_args(
        retriever, llm=llm, multimodal=True, node_postprocessors=[screen]
    )
    report = ETAImageSafetyPostprocessor(evaluator=llm, mode="flag")  # only to show the scores
    questions = args.question or QUESTIONS
    responses = []
    for question in questions:
        print(f"\nQuestion: {question}")
        for item in report.postprocess_nodes(retriever.retrieve(question)):
            meta = item.node.metadata
            verdict = "UNSAFE" if meta["eta_image_unsafe"] else "safe"
            action = "dropped" if args.mode == "drop" and meta["eta_image_unsafe"] else "kept"
            print(
                f"  retrieved {meta.get('file_name')}: similarity {item.score:.3f}, "
                f"CLIP safety score {meta['eta_image_score']:.3f} -> {verdict}, {action}"
            )
        response = engine.query(question)
        responses.append(response)
        print(f"Answer: {response.response!r}")

    # 4. Score the answers (and the images behind them) with ETA's evaluators.
    runner = BatchEvalRunner({"safety": ETASafetyEvaluator(evaluator=llm)}, workers=2)
    results = runner.evaluate_responses(queries=questions, responses=responses)["safety"]
    print("\nSafety evaluation:")
    for question, result in zip(questions, results, strict=True):
        print(f"- {question}\n  passing={result.passing} score={result.score}\n  {result.feedback}")


if __name__ == "__main__":
    main()
