#!/usr/bin/env bash
# Remakes model/demo_checkpoint, the small model that `python -m serve` loads by default:
# trains the `demo` preset (DeepSeek-V3's architecture: MLA, 1 dense + 4 MoE layers, 8 experts,
# one MTP module) on the Python standard library's own sources (byte-level), then writes it in
# bf16 without the optimizer state. Extra arguments go to `python -m pipeline.train`.
# docs/demo_checkpoint.md records the committed one's run: update it after a remake.
# Run from anywhere after `bash scripts/test.sh` or `bash scripts/demo.sh` made .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
run=${RUN_DIR:-$(mktemp -d /tmp/fireflyer-demo-run.XXXXXX)}  # the run's checkpoints and metrics.jsonl
"$python" -m pipeline.train --preset=demo --steps=1200 --warmup_steps=50 --lr=3e-3 --seq_len=128 \
    --micro_batch=8 --chunks=2 --checkpoint_dir="$run" --metrics_file="$run/metrics.jsonl" --log_every=100 "$@"
"$python" -m model.convert "$(ls -d "$run"/step_* | sort | tail -n 1)" model/demo_checkpoint --dtype=bfloat16 \
    --overwrite
