#!/usr/bin/env bash
# The H200 decode-speed run of issue 12 (one device call, ~9 min): GPU decode tests (TESTS=1), then HF-path decode,
# compiled (inductor, reduce-overhead: CUDA-graph trees), each row with its top GPU kernels:
#   128K batch 4: Triton all pages, quest at 1/16 (defaults: page 64, 2 dense layers, torch.topk; the Triton top-k;
#                 the Triton top-k without dense layers; the earlier default of 16-token pages)
#   128K batch 1 and 64K batch 8: Triton all pages, quest at 1/16 (torch.topk, the Triton top-k).
# PARTS (default "d128b4 d128b1 d64b8") picks the parts, so that the run can be split over back-to-back calls.
# Part "tune": the decode, page-bound and top-k kernels' launch sweep (decode_layer.py --kernel-sweep, ~3 min;
# KERNELS picks kernels) at 128K batch 4 (TL, TB: another length, batch; the H100 cannot hold 128K batch 4 of
# this model), then that step with quest dense_layers=0 twice: the default launches (next to Triton all pages;
# SKIP_DEFAULT=1 leaves it out) and, in a second process, the sweep's fastest (ATTNPATCH_DECODE_CONFIG /
# _BOUNDS_CONFIG / _TOPK_CONFIG; baselines TUNED_BASE, more quest settings TUNED_EXTRA).
# Part "others" (~8 min, H200: 128K batch 4 does not fit an H100): `recycled` (defaults: stride 32; stride 16; 128-token
# pages) and `infiniretri`; `recycled`'s stride-32 rows time runs of 32 steps (whole strides: `DecodeMethod.period`).
# Part "generate" (~7 min, H200): the same 128K batch-4 rows through `model.generate` (transformers compiles the static
# cache's decode steps itself; hf_decode's mode `generate`): Triton all pages, cuDNN, quest (defaults; 128-token pages
# without dense layers), recycled (defaults), each with its top GPU kernels and host functions (GL, GB: another
# length, batch, e.g. 65536 / 4 on an H100; GMETHODS, GSPECS, GBASE: other methods, settings, baselines). By default
# in mode generate-deferred: each row times generate under transformers' deferred stop check and, on the same
# compiled graphs, with its default synchronous check (GMODES=generate: the synchronous check alone).
# Part "bound" (~5 min; ~9 with BOUND_LAYER=1): the one-launch Quest kernel (attnpatch/backends/triton/bound_decode.py;
# by default, =auto, up to 8 batch × KV head rows): its GPU tests (also the compiled reduce-overhead quest steps, one
# of which checks that the kernel is traced), with BOUND_LAYER=1 the per-layer rows at 128K batch 1 / 4
# (decode_layer.py --per-call: "quest one launch" next to the separate path's "quest compiled") and its launch sweep
# at 128K batch 1 / 8, then the compiled HF step at 128K
# batch 1 (quest, 128-token pages, no dense layers) with the separate kernels and, in a second process, one launch.
# The unpatched compiled model (193 ms a step at 128K, batch 4: bench/results/hf_decode_h200/inductor_2026-12-04)
# is left out to save device time; add UNPATCHED=1 for it.
#   OUT=DIR bash bench/scripts/gpu_decode_speed.sh
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
BASE=triton${UNPATCHED:+,unpatched}
[ -n "${TESTS:-}" ] && timeout 150 python -m pytest -q tests/gpu/test_decode_compile_cuda.py tests/gpu/test_quest_recycled_cuda.py 2>&1 | tail -3 > $OUT/gpu_tests.log
[ -n "${TESTS:-}" ] && cat $OUT/gpu_tests.log
run() {  # label length batch time-limit options...
  local label=$1 length=$2 batch=$3 limit=$4; shift 4
  timeout $limit python -m attnpatch.bench.hf_decode --out $OUT/$label --layers 32 --lengths $length --batches $batch \
    --methods quest --decode-options "$@" --modes compiled --baselines $BASE --steps 8 --repeats 3 --profile \
    --budget-s $((limit - 60)) 2>&1 | grep "^L=\|Error\|error"
}
PARTS=${PARTS:-d128b4 d128b1 d64b8}
case " $PARTS " in *" d128b4 "*) run d128b4 131072 4 ${T128:-400} quest:budget=8192 quest:budget=8192,topk=triton \
  quest:budget=8192,topk=triton,dense_layers=0 quest:budget=8192,page_size=16;; esac
case " $PARTS " in *" d128b1 "*) run d128b1 131072 1 ${T128B1:-200} quest:budget=8192 quest:budget=8192,topk=triton;; esac
case " $PARTS " in *" d64b8 "*) run d64b8 65536 8 ${T64:-200} quest:budget=4096 quest:budget=4096,topk=triton;; esac
case " $PARTS " in *" bound "*)
  ATTNPATCH_BOUND_DECODE_CONFIG=auto timeout 150 python -m pytest -q tests/gpu/test_bound_decode_cuda.py \
    tests/gpu/test_decode_compile_cuda.py -k "bound or quest" 2>&1 | tail -3 > $OUT/bound_tests.log
  cat $OUT/bound_tests.log
  [ -n "${BOUND_LAYER:-}" ] && timeout 300 python bench/scripts/decode_layer.py --per-call --cases 131072x1,131072x4 \
    --page-sizes 128,64 --out $OUT/bound_per_call 2>&1 | grep "quest\|cudnn"
  [ -n "${BOUND_LAYER:-}" ] && timeout 60 python bench/scripts/decode_layer.py --kernel-sweep \
    --cases 131072x1,131072x8 --kernels bound --out $OUT/bound_sweep 2>&1 | tail -1
  Q=quest:budget=8192,page_size=128,dense_layers=0
  ATTNPATCH_BOUND_DECODE_CONFIG=off run d128b1_separate 131072 1 ${TB1:-100} $Q
  BASE=none ATTNPATCH_BOUND_DECODE_CONFIG=auto run d128b1_one_launch 131072 1 ${TB1:-100} $Q;;
esac
case " $PARTS " in *" others "*)  # recycled (defaults: stride 32; and stride 16) and infiniretri at 128K batch 4 (H200 only)
  timeout ${TO:-480} python -m attnpatch.bench.hf_decode --out $OUT/d128b4_others --layers 32 --lengths 131072 \
    --batches 4 --methods recycled,infiniretri --decode-options recycled:budget=8192 recycled:budget=8192,stride=16 \
    recycled:budget=8192,page_size=128 \
    --modes compiled --baselines triton,cudnn --steps 16 --repeats 3 --profile --budget-s $((${TO:-480} - 40)) 2>&1 \
    | grep "^L=\|Error\|error";;
esac
case " $PARTS " in *" generate "*)  # the user's path: model.generate from the filled static cache (H200: 128K batch 4)
  L=${GL:-131072} B=${GB:-4}
  timeout ${TG:-480} python -m attnpatch.bench.hf_decode --out $OUT/d${L}b${B}_generate --layers 32 --lengths $L \
    --batches $B --methods ${GMETHODS:-quest,recycled} --decode-options ${GSPECS:-quest:budget=$((L / 16)) \
    quest:budget=$((L / 16)),page_size=128,dense_layers=0 recycled:budget=$((L / 16))} --modes ${GMODES:-generate-deferred} \
    --baselines ${GBASE:-triton,cudnn} --steps 16 --repeats ${GR:-5} --profile --host-profile --budget-s $((${TG:-480} - 40)) 2>&1 \
    | grep "^L=\|Error\|error";;
esac
case " $PARTS " in *" tune "*)
  L=${TL:-131072} B=${TB:-4}; Q=quest:budget=$((L / 16)),dense_layers=0
  timeout ${TSWEEP:-200} python bench/scripts/decode_layer.py --kernel-sweep --cases ${L}x${B} \
    --kernels ${KERNELS:-decode,page_bounds,topk} --splits default,4,6,8,12,16,24 --out $OUT/sweep 2>&1 | tail -1
  [ -z "${SKIP_DEFAULT:-}" ] && run d${L}b${B}_default $L $B ${T128:-230} $Q
  [ -d $OUT/sweep ] && (
    best() { [ -f $OUT/sweep/best_$1_${L}x${B}.txt ] && cat $OUT/sweep/best_$1_${L}x${B}.txt; }
    v=$(best decode) && export ATTNPATCH_DECODE_CONFIG=$v
    v=$(best page_bounds) && export ATTNPATCH_BOUNDS_CONFIG=$v
    v=$(best topk) && export ATTNPATCH_TOPK_CONFIG=$v
    echo "tuned: decode ${ATTNPATCH_DECODE_CONFIG:-default}, bounds ${ATTNPATCH_BOUNDS_CONFIG:-default}, topk ${ATTNPATCH_TOPK_CONFIG:-default}"
    BASE=${TUNED_BASE:-none} run d${L}b${B}_tuned $L $B ${T128T:-150} $Q ${TUNED_EXTRA:-});;
esac
