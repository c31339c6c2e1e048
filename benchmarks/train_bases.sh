#!/usr/bin/env bash
# Train (once) the CIFAR-10 base nets that every benchmark uses; skips nets already trained.
#   CIFAR=path/to/extracted/cifar10-parent  BENCH=path/to/bench-dir  benchmarks/train_bases.sh
# Regimes: "full" = 2000 training images per class (20k images), "small" = 100 per class (over-fits).
set -euo pipefail
: "${CIFAR:?set CIFAR to the folder that holds the extracted cifar10/}"
BENCH=${BENCH:-$HOME/.cache/refiner/bench}
REFINER=${REFINER:-refiner}
ARCH=${ARCH:-small_vgg}
EPOCHS=${EPOCHS:-12}
mkdir -p "$BENCH"
train() {  # name seed per_class epochs
  local out="$BENCH/$ARCH-$1.pt"
  [ -f "$out" ] && return 0
  /usr/bin/time -f "$1: %e s wall" "$REFINER" train --arch "$ARCH" --task cifar10 --data "$CIFAR" \
    --seed "$2" --train-per-class "$3" --epochs "$4" --out "$out"
}
for seed in 0 1 2; do train "full-s$seed" "$seed" 2000 "$EPOCHS"; done
for seed in 0 1; do train "small-s$seed" "$seed" 100 30; done
