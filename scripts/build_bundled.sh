#!/usr/bin/env bash
# Rebuilds the bundled offline models in checkpoints/ from scratch on the embedded digits dataset
# (CPU is fine). Each run goes to runs/bundled-<name>/; the chosen checkpoint is copied over.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--dataset digits --arch smallcnn --lr 0.05 --eval-samples 359 --probe-size 128 --seed 0)
build() {  # name method epochs which-checkpoint
  python -m core.train "${common[@]}" --method "$2" --epochs "$3" --out-dir "runs/bundled-$1" --name "$1"
  cp "runs/bundled-$1/$4.safetensors" "checkpoints/$1.safetensors"
}
build digits-plain plain 15 last        # non-robust: the final epoch
build digits-sat sat 30 best            # robust: best PGD accuracy on held-out digits
build digits-trades trades 8 best
build digits-weat-adv weat-adv 8 best
