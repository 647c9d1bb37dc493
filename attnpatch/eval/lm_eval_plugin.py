"""lm-eval model `attnpatch`: the harness's HFLM running a patched model.

Importing this module registers the model with lm-eval (lm-eval ignores entry points, so
registration happens in-process: `attnpatch lm-eval ...` imports it, then runs lm-eval's own CLI).
model_args: `pretrained` (a local directory, a hub id or `smollm2`), `method`, `decode`, `profile`
(a Profile JSON path), `attn_backend` (HFLM already uses `backend`), any option of the chosen
methods, and every HFLM argument (`dtype`, `device`, `batch_size`, `max_length`, ...).
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from attnpatch.api import patch_model
from attnpatch.models import resolve
from attnpatch.profile import Profile
from attnpatch.registry import get_method


@register_model("attnpatch")
class AttnpatchLM(HFLM):
    """HFLM whose model is patched with attnpatch (see the module docstring for model_args)."""

    def __init__(self, pretrained: Any = "smollm2", method: str = "dense", decode: str | None = None,
                 profile: str | None = None, attn_backend: str = "auto", **kwargs: Any) -> None:
        names = {o.name for o in get_method(method, "prefill").options}
        names |= {o.name for o in get_method(decode or "dense", "decode").options}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if isinstance(pretrained, str):
            pretrained = resolve(pretrained)
            kwargs.setdefault("tokenizer", pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        self.patch = patch_model(self.model, method=method, decode=decode, backend=attn_backend,
                                 profile=Profile.load(profile) if profile else None, **options)
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map and len(set(device_map.values())) > 1:  # parallelize=True spread the layers
            placed = sorted({str(v) for v in device_map.values()})
            print(f"attnpatch: {method} patch over a model spread on {', '.join(placed)}", file=sys.stderr)


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


def main(argv: list[str]) -> int:
    """Run lm-eval's CLI with the `attnpatch` model registered."""
    from lm_eval.__main__ import cli_evaluate

    from attnpatch.eval.haystack import offline_essays

    sys.argv = ["lm-eval", *resolve_model_args(argv)]
    with offline_essays():  # essay-haystack RULER tasks run without the hub
        cli_evaluate()
    return 0
