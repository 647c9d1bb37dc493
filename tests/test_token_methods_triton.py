"""`anchor` and `s2o` selections executed by the Triton gather kernel (CPU interpreter) equal the
reference executor: the lists they build are what the fast path reads in place."""

import pytest
import torch
from triton_interpreted import interpret_env, load_interpreted

from attnpatch.backends.reference import token_gather_attention
from attnpatch.methods.base import PrefillContext
from attnpatch.methods.prefill.anchor import AnchorPrefill
from attnpatch.methods.prefill.s2o import S2OPrefill
from attnpatch.sparsity import KeyBounds

_tg, _SKIP_REASON = load_interpreted("gather.py")
pytestmark = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")


@pytest.fixture(autouse=True, scope="module")
def _interpret_while_testing():
    with interpret_env():
        yield


METHODS = {"anchor": AnchorPrefill(block_size=16, step=2, theta=2.0),
           "s2o": S2OPrefill(block_size=16, pool_size=8, tau=0.1)}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(("lq", "lk"), [(100, 100), (70, 130)], ids=["prefill", "chunked"])
def test_gather_kernel_runs_the_selection(name, lq, lk):
    g = torch.Generator().manual_seed(lq)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h, n in ((4, lq), (2, lk), (2, lk)))
    sel = METHODS[name].select(q, k, PrefillContext(0, 0.25, KeyBounds(), None))
    assert _tg.unsupported_reason(q, k, v, sel, chunk=16) is None
    kept, total = sel.kept_and_total()
    assert (kept < total).all()
    out = _tg.token_gather_attention_triton(q, k, v, sel, scale=0.25, chunk=16)
    torch.testing.assert_close(out, token_gather_attention(q, k, v, sel, scale=0.25), atol=1e-4, rtol=0)
