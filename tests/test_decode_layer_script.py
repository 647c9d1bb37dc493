"""CPU smoke test of bench/scripts/decode_layer.py (issue 12's per-layer benchmark): its per-call rows and its
launch sweeps run every kernel they time (under the Triton interpreter, timers stubbed) and name their rows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, "bench/scripts")
    import decode_layer as dl

    dl.DEVICE, dl.DTYPE = "cpu", torch.float32
    dl.HQ, dl.HKV, dl.D = 4, 2, 32
    dl.SDPA, dl.COPIES = {}, 2
    calls = []

    def timed(fns):
        calls.append(len(fns))
        for fn in fns:
            fn()
        return 1.0

    dl._graph_us_each = timed
    dl._graph_us = lambda fn: timed([fn])
    rows = dl.per_call_rows(1024, 1, 1 / 4, [64], copies=2, validity=())
    names = [r["row"] for r in rows]
    assert names == ["triton all pages", "quest kernel alone", "quest kernel alone, key_valid",
                     "quest kernel alone, key_start", "quest select alone", "quest one launch",
                     "quest one launch, key_valid"], names
    sweep = dl.kernel_sweep_rows(1024, 1, 1 / 4, splits_list=(None,), kernels=("decode", "topk", "bound"))
    kinds = {r["kernel"] for r in sweep}
    assert kinds == {"decode", "topk", "bound"}, kinds
    assert sum(r["kernel"] == "bound" for r in sweep) == 2 * len(dl.SWEEP_BOUND)
    best = dl.best_launches(sweep)["1024x1"]
    assert {"decode", "bound_64", "bound_128"} <= set(best), best
    print("OK", len(calls))
""")


def test_decode_layer_rows_and_sweeps_run_on_cpu():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
