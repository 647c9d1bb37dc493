import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from attnpatch.testing import tiny_model  # noqa: E402

# (family, sliding_window): the families, Qwen2 and Mistral also with a small window so SWA is exercised,
# and Gemma 3 as it ships (a sliding layer, then a full one; MQA, head dim 32, its own softmax scale).
TINY_CASES = [("llama", None), ("qwen2", None), ("qwen3", None), ("mistral", None), ("qwen2", 8),
              ("mistral", 8), ("gemma3", 8)]
TINY_IDS = [f"{f}-swa{w}" if w else f for f, w in TINY_CASES]


@pytest.fixture(params=TINY_CASES, ids=TINY_IDS)
def tiny(request):
    family, window = request.param
    return tiny_model(family, sliding_window=window)


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def _no_speed_gate_on_gpu_tests(request, monkeypatch):
    """The GPU tests check backends and kernels against the reference on short inputs, where backend "auto"
    would run a measured-slower method dense (`BackendPlan.speed_gate`): the gate is off there, except in
    the test that checks it (`tests/gpu/test_speed_gate_cuda.py`)."""
    node = request.node.nodeid
    if "gpu/" in node and "speed_gate" not in node:
        import attnpatch.backends as backends

        monkeypatch.setattr(backends, "GATED_DEVICES", ())


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def left_padded(batch: int, length: int, pads: list[int], seed: int = 0):
    ids = random_ids(batch, length, seed)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def cache_arg(model, cache) -> dict:
    """`{name: cache}` for a forward / generate call: `cache` on transformers 5.2x, `past_key_values`
    before (the old name leaves model forwards in 5.40)."""
    from attnpatch.adapters.cache_arg import cache_kwarg

    return {cache_kwarg(model): cache}
