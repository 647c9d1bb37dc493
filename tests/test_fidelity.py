"""Fidelity metrics against values worked out by hand, and on a real forward pass of a tiny model."""

import torch

from attnpatch.eval.fidelity import layer_fidelity, measure, true_block_mass
from attnpatch.sparsity import BlockSelection
from attnpatch.testing import tiny_model


def _uniform_qkv(length=4, d=8):
    q = torch.zeros(1, 1, length, d)  # zero queries: every row attends uniformly to the keys it sees
    k = torch.randn(1, 1, length, d)
    v = torch.randn(1, 1, length, d)
    return q, k, v


def test_true_block_mass_by_hand():
    q, k, _ = _uniform_qkv()
    mass = true_block_mass(q, k, 1.0, 2, 2)[0, 0]
    # rows 0,1 see only block 0; row 2 puts 2/3 on block 0 and 1/3 on block 1; row 3 puts 1/2 on each
    expected = torch.tensor([[1.0, 0.0], [(2 / 3 + 1 / 2) / 2, (1 / 3 + 1 / 2) / 2]])
    torch.testing.assert_close(mass, expected)


def test_recall_density_and_error_by_hand():
    q, k, v = _uniform_qkv()
    full = BlockSelection.from_block_mask(torch.tensor([[[[True, False], [True, True]]]]), 2, 2, 4, 4)
    heads, _ = layer_fidelity(0, q, k, v, full, None, 1.0)
    assert abs(heads[0].recall - 1.0) < 1e-6 and heads[0].density == 1.0 and heads[0].rel_error < 1e-6
    diag = BlockSelection.from_block_mask(torch.tensor([[[[True, False], [False, True]]]]), 2, 2, 4, 4)
    heads, record = layer_fidelity(0, q, k, v, diag, None, 1.0)
    assert abs(heads[0].recall - (1 + 1 + 1 / 3 + 1 / 2) / 4) < 1e-6
    assert abs(heads[0].density - 2 / 3) < 1e-6 and heads[0].rel_error > 0.01
    assert record.computed[0].tolist() == [[True, False], [False, True]]


def test_measure_on_a_real_forward_pass():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 128))
    report, records = measure(model, ids, "a_shape", keep_layers=(1,), block_size=16, local_blocks=2)
    assert len(report.heads) == 2 * 4 and set(records) == {1}
    s = report.summary()
    assert 0 < s["density"] < 1 and 0 < s["recall"] < 1 and s["rel_error"] > 0
    full, _ = measure(model, ids, "a_shape", block_size=16, local_blocks=16)  # fits: dense fallback, no sparse layer
    assert full.heads == [] and full.dense_layers == [0, 1]
    blasst, _ = measure(model, ids, "blasst", block_size=16, a=1e4)
    assert blasst.summary()["density"] < 1  # skipped tiles are not counted as computed


def test_token_recall_density_and_error_by_hand():
    from attnpatch.eval.fidelity import token_layer_fidelity
    from attnpatch.sparsity import KeyBounds
    from attnpatch.sparsity.tokens import CountedTokenSelection

    q, k, v = _uniform_qkv()
    # query block 0 (rows 0, 1) lists key 0; block 1 (rows 2, 3) lists keys 0 and 3
    sel = CountedTokenSelection(torch.tensor([[[[0, 0], [0, 3]]]], dtype=torch.int32),
                                torch.tensor([[[1, 2]]], dtype=torch.int32), 2, 4, 4)
    heads = token_layer_fidelity(0, q, k, v, sel, KeyBounds(), None, 1.0)
    # row 0: 1, row 1: 1/2, row 2: 1/3 (key 3 is in its future), row 3: 1/2
    assert abs(heads[0].recall - (1 + 1 / 2 + 1 / 3 + 1 / 2) / 4) < 1e-6
    assert abs(heads[0].density - 5 / 10) < 1e-6 and heads[0].rel_error > 0.01
    everything = CountedTokenSelection(torch.tensor([[[[0, 1, 2, 3], [0, 1, 2, 3]]]], dtype=torch.int32),
                                       torch.tensor([[[2, 4]]], dtype=torch.int32), 2, 4, 4)
    heads = token_layer_fidelity(0, q, k, v, everything, KeyBounds(), None, 1.0)
    assert abs(heads[0].recall - 1) < 1e-6 and heads[0].density == 1.0 and heads[0].rel_error < 1e-6


def test_measure_counts_token_selections():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 256))
    report, records = measure(model, ids, "s2o", keep_layers=(1,), block_size=16, pool_size=8, tau=0.3,
                              local_blocks=1)
    assert len(report.heads) == 2 * 4 and records == {}
    s = report.summary()
    assert 0 < s["density"] < 1 and 0 < s["recall"] <= 1 and s["rel_error"] > 0
