"""Kernel benchmark (GPU): `python bench/kernels.py [--out bench/results] [--shapes ...] [--lengths ...]`.

Same as `attnpatch bench kernels`; see attnpatch/bench/kernels.py for the options.
"""

from attnpatch.bench.kernels import main

if __name__ == "__main__":
    raise SystemExit(main())
