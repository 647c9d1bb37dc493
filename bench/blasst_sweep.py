"""BLASST sweep on the embedded checkpoint: `python bench/blasst_sweep.py [--lengths ...] [--a ...] [--decode-a ...]`.

Same as `python -m attnpatch.bench.blasst_sweep`; see attnpatch/bench/blasst_sweep.py for the options.
"""

import sys
from pathlib import Path

# Take bench/ off the path: bench/kernels.py would shadow the `kernels` package transformers imports.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from attnpatch.bench.blasst_sweep import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(prog="python bench/blasst_sweep.py"))
