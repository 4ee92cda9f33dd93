#!/usr/bin/env bash
# Installs fireflyer into .venv and runs the main job: the bundled demo model (a small
# DeepSeek-V3 trained by `python -m pipeline.train`) completes a prompt, streamed as it is served.
# Extra arguments go to `python -m serve` (e.g. --prompt "import os" --max_tokens 100).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
exec .venv/bin/python -m serve --prompt "def fibonacci(n):" --max_tokens 80 --temperature 0.6 --top_p 0.95 \
  --max_num_seqs 1 --num_kv_pages 8 --max_model_len 256 "$@"
