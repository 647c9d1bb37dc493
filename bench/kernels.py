"""Kernel benchmark (GPU):
`python bench/kernels.py [--out bench/results] [--shapes ...] [--lengths ...] [--backends ...]`.

Same as `attnpatch bench kernels`; see attnpatch/bench/kernels.py for the options.
"""

import sys
from pathlib import Path

# Take bench/ off the path: this file would shadow the `kernels` package transformers imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from attnpatch.bench.kernels import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
