import time

import torch

from attnpatch.bench.timing import timed_ms


def test_timed_ms_returns_the_result_and_the_wall_time_off_cuda():
    ms, out = timed_ms(lambda: (time.sleep(0.02), 7)[1], torch.device("cpu"))
    assert out == 7
    assert 15 <= ms < 2000
