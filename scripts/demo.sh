#!/usr/bin/env bash
# The main job: set up, prepare Shakespeare (first run only), pre-train the tiny model, print samples.
# Extra arguments go to train.py, e.g. `bash scripts/demo.sh --trainer.max_steps 50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python train.py fit --config configs/tiny.yaml "$@"
