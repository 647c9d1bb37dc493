"""GPU correctness checks: a thin runner of `pytest tests/gpu` (the cases are in tests/gpu/test_kernels_cuda.py).

`python -m attnpatch.bench.check [pytest options]` on a CUDA machine, from a source checkout: every
backend of the table against the exact float32 reference in bf16 and fp16 (GQA, chunked prefill,
left padding, sliding windows, skip rules, decode, a patched tiny model). Prints pytest's summary
with the reason of every skip and exits with pytest's status (2 without a GPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests" / "gpu"


def main(argv: list[str] | None = None) -> int:
    if not TESTS.is_dir():
        print(f"{TESTS} not found: run from a source checkout of attnpatch", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    args = sys.argv[1:] if argv is None else argv
    return subprocess.call([sys.executable, "-m", "pytest", str(TESTS), "-q", "-rs", *args], cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main())
