#!/usr/bin/env bash
# The cost benchmark on one GPU in bf16 (issue 13, item 3): ZeRO-2 and ZeRO-3 at world size 1, a Llama of
# SmolLM2-135M's layers and one of Llama-3.2-1B's, from scratch; ours (`none`, `migu`) against HF Trainer
# + DeepSpeed and the bare DeepSpeed loop. One round, 30 measured steps. The whole script keeps within
# ${GPU_COST_SECONDS:-540} seconds (the device tool's calls last at most ten minutes): the 135M model must
# end by 40% of it, the 1B model by its end. Each table is rewritten after every run, and each model
# runs `none` and the reference stacks at both stages before `migu`, so a model cut short keeps the
# comparison of stacks. Run from the repository's root in the installed environment:
#   bash benchmarks/gpu_cost.sh [OUT_DIR [CORPUS_DIR]]
# OUT_DIR defaults to benchmarks/ (the device tool passes "$OUT"); CORPUS_DIR is a demo corpus built
# beforehand (`python -m pretrain.demo_corpora DIR`), for a machine without the demo's data packages.
# On an H200 each launch took 50-65 s (start-up, phase 1, evaluations, checkpoints), so the whole set is
# some 15 minutes: GPU_COST_MODELS (default "135m 1b") and GPU_COST_ARGS (more stack_cost.py options,
# which override the ones below, e.g. "--stacks --stages 2") split it over calls. benchmarks/gpu_cost.md
# says what has run.
set -euo pipefail
out="${1:-benchmarks}"
data="${2:-}"
budget="${GPU_COST_SECONDS:-540}"
start=$SECONDS
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu_cost_device.csv"
python3 -c "import deepspeed, datasets, transformers, pretrain.train"  # a missing package fails in seconds
declare -A end_percent=([135m]=40 [1b]=100)
models=(${GPU_COST_MODELS:-135m 1b})
[ "${#models[@]}" -eq 1 ] && end_percent[${models[0]}]=100
for model in "${models[@]}"; do
  left=$((start + budget * ${end_percent[$model]} / 100 - SECONDS))
  timeout --kill-after=10 "$left" python3 benchmarks/stack_cost.py --gpu --ranks 1 --bf16 --model "$model" \
    --rounds 1 --steps 30 --stages 2 3 --methods none migu ${data:+--data "$data"} \
    --out "$out/gpu_cost_$model.md" ${GPU_COST_ARGS:-} || echo "model $model: exit $? after $((SECONDS - start)) s"
done
