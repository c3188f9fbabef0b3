#!/usr/bin/env bash
# The cost benchmark on one GPU in bf16 (issue 13, item 3): ZeRO-2 and ZeRO-3 at world size 1, a Llama of
# SmolLM2-135M's layers and one of Llama-3.2-1B's, from scratch; ours (`none`, `migu`) against HF Trainer
# + DeepSpeed and the bare DeepSpeed loop. One round, 30 measured steps; each model gets at most
# ${SECONDS_PER_MODEL:-270} seconds (the device tool's calls last at most ten minutes), and each table is
# rewritten after every run, so a model cut short keeps what it measured. Run from the repository's
# root in the installed environment:
#   bash benchmarks/gpu_cost.sh [OUT_DIR]      (default benchmarks/; the device tool passes "$OUT")
set -euo pipefail
out="${1:-benchmarks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu_cost_device.csv"
for model in 135m 1b; do
  timeout "${SECONDS_PER_MODEL:-270}" python benchmarks/stack_cost.py --gpu --ranks 1 --bf16 --model "$model" --rounds 1 --steps 30 \
    --stages 2 3 --methods none migu --out "$out/gpu_cost_$model.md" || echo "model $model: exit $?"
done
