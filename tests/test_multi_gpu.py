"""Ops on a CUDA device other than the current one (cuda:1 while cuda:0 is current): Triton
launches on the current device unless its entry points make the tensors' device current
(triton/_common.on_input_device); the compiled CUDA ops have their own guard. Needs two GPUs."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in flowkern.available_backends()])
def test_ops_on_the_second_gpu_match_the_reference(backend):
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    x, t, s = (torch.randn(8, 32, generator=g).to("cuda:1") for _ in range(3))
    px = torch.randint(0, 256, (8, 32), generator=g, dtype=torch.uint8).to("cuda:1")
    with flowkern.backend("reference"):
        want = [ops.affine_coupling(x, t, s, scale="sigmoid"), ops.actnorm(x, t[0], s[0]),
                ops.gaussian_nll(x), ops.dequantize_logit(px, seed=3)]
    with flowkern.backend(backend):
        got = [ops.affine_coupling(x, t, s, scale="sigmoid"), ops.actnorm(x, t[0], s[0]),
               ops.gaussian_nll(x), ops.dequantize_logit(px, seed=3)]
        torch.cuda.synchronize(1)
    for a, b in zip(got, want):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert u.device == torch.device("cuda:1")
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    assert torch.cuda.current_device() == 0  # the guard restored it
