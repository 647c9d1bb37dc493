"""Run lm-eval on a patched model from Python (offline): RULER niah_single_1 at 4K, dense vs BLASST.

The same from the shell (`attnpatch lm-eval --help` lists the model_args):
    attnpatch lm-eval run --model attnpatch --model_args pretrained=smollm2,method=blasst:a=128 \
        --tasks niah_single_1 --metadata '{"max_seq_lengths":[4096]}' --limit 4
"""

import torch
from lm_eval import simple_evaluate

import attnpatch.eval.lm_eval_plugin  # noqa: F401  (registers model "attnpatch")
from attnpatch.models import smollm2_dir

device = "cuda" if torch.cuda.is_available() else "cpu"
for method in ("dense", "blasst:a=128"):  # a method spec: name, or name:key=value
    out = simple_evaluate(
        model="attnpatch",
        model_args=f"pretrained={smollm2_dir()},method={method}",
        tasks=["niah_single_1"],
        metadata={"max_seq_lengths": [4096]},
        device=device,
        limit=4,
    )
    print(method, out["results"]["niah_single_1"])
