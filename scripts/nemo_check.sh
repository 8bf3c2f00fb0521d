#!/usr/bin/env bash
# Opt-in check of the NeMo Guardrails integration (integrations/nemoguardrails_eta).
#
# nemoguardrails 0.24 installs beside langchain-core 1.x, but it pulls fastembed, which pins
# huggingface-hub<2 (the project's venv has 2.x): so it gets a virtualenv of its own, built once
# with this checkout's `nemo` extra, and runs tests/test_nemoguardrails.py there (a real
# LLMRails with ETA's rails and ETAChatModel as its LLM, on tiny checkpoints built in code).
#
# Usage: scripts/nemo_check.sh [pytest args...]
# Env:   ETA_NEMO_VENV  venv path (default ~/.cache/eta-guard/nemo-venv)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${ETA_NEMO_VENV:-$HOME/.cache/eta-guard/nemo-venv}
if ! "$VENV/bin/python" -c "import nemoguardrails, langchain_core, torch, pytest" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$ROOT[nemo]" pytest pytest-asyncio
fi
"$VENV/bin/python" -c "import nemoguardrails, langchain_core, huggingface_hub as h; print('nemoguardrails', nemoguardrails.__version__, 'langchain-core', langchain_core.__version__, 'huggingface-hub', h.__version__)"
export PYTHONPATH=$ROOT:$ROOT/integrations HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
  tests/test_nemoguardrails.py "$@"
