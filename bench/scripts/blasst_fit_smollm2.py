"""BLASST's λ = a / L fit on SmolLM2 (CPU): `python bench/scripts/blasst_fit_smollm2.py`.

Layers 0, 7, 15, 22, 29; one prompt (Emma) per length 2K / 4K / 8K; output-error tolerance 0.05; writes
bench/results/calibration/blasst_fit_smollm2.json (the fitted a, each prompt's best λ, and the skipped
share per length at the fitted a and at one fixed λ).
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

from attnpatch.calibrate.blasst_fit import fit_lambda
from attnpatch.calibrate.data import calibration_ids
from attnpatch.calibrate.record import record_layers
from attnpatch.models import load

LAYERS = (0, 7, 15, 22, 29)
LENGTHS = (2048, 4096, 8192)
GRID = [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3]

model, tok = load("smollm2")
start = time.time()
prompts = [ids for n in LENGTHS for ids in calibration_ids(tok, "text", 1, n)]
layers = {i: r for i, r in record_layers(model, prompts).items() if i in LAYERS}
fit = fit_lambda(layers, GRID, tolerance=0.05, block=128)
out = {"what": "BLASST λ = a / L fit, SmolLM2-135M-Instruct, CPU float32, layers 0,7,15,22,29, one Emma prompt per "
               "length, output-error tolerance 0.05",
       "command": "python bench/scripts/blasst_fit_smollm2.py", "grid": GRID, "fit": asdict(fit),
       "seconds": round(time.time() - start, 1)}
print(json.dumps(out, indent=1))
path = Path("bench/results/calibration/blasst_fit_smollm2.json")
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(out, indent=1))
