#!/usr/bin/env bash
# Evaluation on two GPUs with accelerate (run on a machine with >= 2 CUDA GPUs, attnpatch[eval] installed):
#   1. one model spread over both GPUs (lm-eval's parallelize=True → accelerate device_map="auto"),
#      checked against the same run on one GPU;
#   2. data parallel: `accelerate launch` runs one process per GPU, lm-eval shards the samples.
# Usage: bench/multi_gpu.sh OUT_DIR [LIMIT]
set -euo pipefail
out=${1:?output folder}; limit=${2:-8}
mkdir -p "$out"
task=(--tasks niah_single_1 --metadata '{"max_seq_lengths":[4096]}' --limit "$limit" --batch_size 1)
args=pretrained=smollm2,method=blasst,dtype=bfloat16
python3 -m attnpatch.cli lm-eval --model attnpatch --model_args "$args" "${task[@]}" \
  --output_path "$out/one_gpu" 2>&1 | tee "$out/one_gpu.log"
# 200MB per GPU cannot hold the bf16 model and its buffers on one GPU: accelerate places layers on both.
python3 -m attnpatch.cli lm-eval --model attnpatch \
  --model_args "$args,parallelize=True,max_memory_per_gpu=200MB" "${task[@]}" \
  --output_path "$out/device_map" 2>&1 | tee "$out/device_map.log"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m attnpatch.cli lm-eval --model attnpatch --model_args "$args" "${task[@]}" \
  --output_path "$out/data_parallel" 2>&1 | tee "$out/data_parallel.log"
