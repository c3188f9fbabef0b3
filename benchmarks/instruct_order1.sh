#!/usr/bin/env bash
# The literature's order-1 continual instruction fine-tuning (dbpedia -> amazon -> agnews) with
# SmolLM2-135M-Instruct, `none` against `migu` (configs/instruct_order1.yaml as shipped), both runs at once
# on 2 CPU ranks each, then `pretrain compare` writes both matrices to benchmarks/instruct_order1/.
# Needs ../shared/data/cl_benchmark beside the checkout; about an hour on two cores. Run from the
# repository's root in the installed environment (make install puts both on PATH in .venv/bin).
set -euo pipefail
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
gguf=$(python -m pretrain.demo_model)
mkdir -p runs
port=29611
pids=()
for method in none migu; do
  deepspeed --master_port "$port" --num_gpus 2 --module pretrain train --config configs/instruct_order1.yaml \
    --set model.path="$gguf" --set method.name="$method" --set output_dir="runs/instruct-order1-$method" \
    > "runs/instruct-order1-$method.log" 2>&1 &
  pids+=($!)
  port=$((port + 11))
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run stops the script here
python -m pretrain compare runs/instruct-order1-none runs/instruct-order1-migu --out benchmarks/instruct_order1
