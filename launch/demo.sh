#!/usr/bin/env bash
# The demo: build the corpora, then the same continual pre-training three times -- plain sequential
# training (none), the random-mask ablation, and MIGU -- each on 2 CPU ranks under the deepspeed launcher
# with ZeRO-2, then the report of each run and the side-by-side comparison.
#   DEMO_OUT=DIR (default runs/demo-<timestamp>), DEMO_METHODS="none migu", MASTER_PORT=29501 (a port of its
#   own beside another launch); arguments go to every run: bash launch/demo.sh --set phases.0.steps=8
set -euo pipefail
cd "$(dirname "$0")/.."

export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${DEMO_OUT:-runs/demo-$(date +%Y%m%d-%H%M%S)}"  # a new directory each time: nothing is overwritten
read -r -a methods <<< "${DEMO_METHODS:-none random migu}"

python -m pretrain.demo_corpora .demo-data  # the paths configs/demo.yaml reads
python -m pretrain tokenizer --config configs/demo.yaml --set "tokenizer.path=$out/tokenizer"
for method in "${methods[@]}"; do
  deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" --module pretrain train --config configs/demo.yaml \
    --set "output_dir=$out/$method" --set "method.name=$method" --set "tokenizer.path=$out/tokenizer" "$@"
  python -m pretrain report --run "$out/$method"
done
runs=()
for method in "${methods[@]}"; do runs+=("$out/$method"); done
python -m pretrain compare "${runs[@]}" --out "$out"
