#!/usr/bin/env bash
# The H200 decode-speed run of issue 12 (one device call, ~7 min): GPU decode tests (TESTS=1), then HF-path decode
# at 128K batch 4 and 32K batch 4 / 1, compiled (inductor, reduce-overhead: CUDA-graph trees), with each row's top GPU kernels.
#   OUT=DIR bash bench/scripts/gpu_decode_speed.sh
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
[ -n "${TESTS:-}" ] && timeout 120 python -m pytest -q tests/gpu/test_decode_compile_cuda.py tests/gpu/test_quest_recycled_cuda.py 2>&1 | tail -3 > $OUT/gpu_tests.log
[ -n "${TESTS:-}" ] && cat $OUT/gpu_tests.log
timeout ${T128:-300} python -m attnpatch.bench.hf_decode --out $OUT/d128 --layers 32 --lengths 131072 --batches 4 --methods quest \
  --decode-options quest:budget=8192 --modes compiled \
  --baselines unpatched,triton --steps 8 --repeats 3 --profile --budget-s ${B128:-170} 2>&1 | grep "^L=" 
timeout ${T32:-300} python -m attnpatch.bench.hf_decode --out $OUT/d32 --layers 32 --lengths 32768 --batches 4,1 --methods quest \
  --decode-options quest:budget=2048 --modes compiled \
  --baselines unpatched,triton --steps 8 --repeats 3 --profile --budget-s ${B32:-150} 2>&1 | grep "^L="
