"""GPU tests check backends and kernels against the reference on short inputs, where backend "auto" would
run a measured-slower method dense (`BackendPlan.speed_gate`): the gate is off here, except in the test
that checks it (`test_speed_gate_cuda.py`)."""

import pytest

import attnpatch.backends as backends


@pytest.fixture(autouse=True)
def _no_speed_gate(request, monkeypatch):
    if "speed_gate" not in request.node.nodeid:
        monkeypatch.setattr(backends, "GATED_DEVICES", ())
