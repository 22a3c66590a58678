"""The benchmarks' shared helpers that produce numbers recorded in benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _common  # noqa: E402


@pytest.mark.parametrize("groups", [1, 4, 64])
def test_count_flops_of_a_grouped_convolution_backward(groups):
    """Forward 2 * N * H * W * C_out * (C_in / groups) * k * k; the input and the weight gradients cost one forward
    each. torch's own formula counted the weight gradient of a grouped convolution as dense."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    forward = 2 * 2 * 8 * 8 * 64 * (64 // groups) * 9
    assert _common.count_flops(lambda: conv(x)) == forward
    assert _common.count_flops(lambda: conv(x).sum().backward()) == 3 * forward
