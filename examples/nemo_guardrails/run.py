"""NeMo Guardrails with ETA's rails and ETAChatModel as the main LLM (offline, tiny models).

    pip install "eta-guard[nemo]"        # its own venv: see docs/nemo_guardrails.md
    python examples/nemo_guardrails/run.py

Tiny random checkpoints: this shows the wiring, never safety. For real use, load
ETAEvaluator / ETAChatModel with the paper's models (or a preset) instead.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import nemoguardrails_eta
from langchain_eta import ETAChatModel
from nemoguardrails import LLMRails, RailsConfig
from nemoguardrails.integrations.langchain.llm_adapter import LangChainLLMAdapter

from eta_guard import ETAConfig, ETAEvaluator
from eta_guard.testing import build_tiny_checkpoints, image_to_data_url, make_test_image


async def main() -> None:
    ckpt = build_tiny_checkpoints(Path(tempfile.mkdtemp()) / "tiny")
    config = ETAConfig(max_new_tokens=16)
    evaluator = ETAEvaluator.from_pretrained(ckpt.clip, ckpt.reward_model, config=config)
    llm = ETAChatModel(vlm=ckpt.vlm, clip=ckpt.clip, reward_model=ckpt.reward_model, config=config)
    rails_config = RailsConfig.from_content(
        yaml_content=(Path(__file__).parent / "config.yml").read_text(),
        colang_content=nemoguardrails_eta.colang(),
    )
    rails = nemoguardrails_eta.register(
        LLMRails(rails_config, llm=LangChainLLMAdapter(llm)), evaluator
    )
    image = image_to_data_url(make_test_image("noise"))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": image}},
            ],
        }
    ]
    response = await rails.generate_async(
        messages=messages, options={"log": {"activated_rails": True}}
    )
    print("answer:", response.response[-1]["content"])
    for rail in response.log.activated_rails:
        for executed in rail.executed_actions:
            if not executed.action_name.startswith("eta_"):
                continue
            outcome = executed.return_value
            verdict = outcome.metadata.get("eta_verdict") or {}
            print(
                executed.action_name,
                "blocked" if outcome.is_blocked else "allowed",
                {k: verdict.get(k) for k in ("pre_score", "post_score", "unsafe")},
            )


if __name__ == "__main__":
    asyncio.run(main())
