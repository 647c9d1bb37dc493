"""lm-eval model `attnpatch`: the harness's HFLM running a patched model.

Importing this module registers the model with lm-eval (lm-eval ignores entry points, so
registration happens in-process: `attnpatch lm-eval ...` imports it, then runs lm-eval's own CLI).
`PatchSpec.from_model_args` splits model_args into the patch and HFLM's arguments:

* `pretrained`: a local directory, a hub id or `smollm2` (the default, the embedded checkpoint);
* `method` / `decode`: prefill / decode method, `name` or `name:key=value` (default dense);
* any option of the chosen methods (`local_blocks=4`, `window=512`), `prefill.X=` / `decode.X=` for
  an option both methods declare (blasst's `a`);
* `attn_backend`: auto, sparse, reference, triton, flex or flash (HFLM already uses `backend`); an
  evaluation runs "auto" as "sparse", without the speed gate that runs short prefills dense on CUDA;
* `profile`: a Profile JSON path; `allow_other_weights=true` accepts one made for other weights;
* everything else goes to HFLM (`dtype`, `device`, `batch_size`, `max_length`, `parallelize`, ...).

A comma ends a model_args entry, so `method=a_shape:local_blocks=4,sink_blocks=2` reads as
`method=a_shape:local_blocks=4` plus the flat option `sink_blocks=2` (the same patch).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Mapping
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from attnpatch.api import patch_model
from attnpatch.models import resolve
from attnpatch.registry import method_infos
from attnpatch.spec import PatchSpec


def split_model_args(args: Mapping[str, Any]) -> tuple[PatchSpec, dict[str, Any]]:
    """`(spec, HFLM's arguments)` from model_args. An argument left for HFLM that is an option of a
    method other than the chosen ones is a mistake (HFLM would hand it to `from_pretrained`): ValueError."""
    spec, rest = PatchSpec.from_model_args(args)
    hflm_params = set(inspect.signature(HFLM.__init__).parameters)
    for key in rest:
        owners = [f"{m.phase} method {m.name!r}" for m in method_infos() if key in m.option_names]
        if owners and key not in hflm_params:
            raise ValueError(f"model_args {key!r} is an option of {', '.join(owners)}, not of method={spec.method!r} "
                             f"or decode={spec.decode!r}")
    return spec, rest


@register_model("attnpatch")
class AttnpatchLM(HFLM):
    """HFLM whose model is patched with attnpatch (see the module docstring for model_args)."""

    def __init__(self, pretrained: Any = "smollm2", **kwargs: Any) -> None:
        spec, kwargs = split_model_args(kwargs)  # validated before the model loads
        if isinstance(pretrained, str):
            pretrained = resolve(pretrained)
            kwargs.setdefault("tokenizer", pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        self.spec = spec
        self.patch = patch_model(self.model, spec.for_evaluation())  # scores of the method, never gated
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map and len(set(device_map.values())) > 1:  # parallelize=True spread the layers
            placed = sorted({str(v) for v in device_map.values()})
            print(f"attnpatch: {spec} patch over a model spread on {', '.join(placed)}", file=sys.stderr)


def resolve_model_args(argv: list[str]) -> list[str]:
    """Replace `pretrained=smollm2` in `--model_args` by the converted directory, so that lm-eval's
    own code that reads `pretrained` (RULER's tokenizer lookup) finds a real path too."""
    out, in_args = [], False
    for token in argv:
        if token.startswith("--"):
            in_args = token == "--model_args"
        elif in_args:
            parts = []
            for part in token.split(","):
                key, _, value = part.partition("=")
                parts.append(f"pretrained={resolve(value)}" if key.strip() == "pretrained" else part)
            token = ",".join(parts)
        out.append(token)
    return out


def main(argv: list[str], essays: bool = True) -> int:
    """Run lm-eval's CLI with the `attnpatch` model registered (and, with `essays`, the RULER essay
    haystack served offline)."""
    from lm_eval.__main__ import cli_evaluate

    from attnpatch.eval.haystack import offline_essays

    sys.argv = ["lm-eval", *resolve_model_args(argv)]
    with offline_essays() if essays else contextlib.nullcontext():
        cli_evaluate()
    return 0
