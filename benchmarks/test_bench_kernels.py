"""pytest-benchmark suite of the kernels (affine coupling, rational-quadratic spline):
`make bench-pytest` (or `python -m pytest benchmarks/test_bench_kernels.py --benchmark-only`).

The same comparisons as `python -m benchmarks` (flowkern vs eager reference vs
torch.compile(reference)), in pytest-benchmark's format, for its statistics, --benchmark-json
and --benchmark-compare across commits. Never part of `make test`: no test asserts a time.
"""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.ops import affine_coupling, rq_spline
from flowkern.reference import affine_coupling_ref, rq_spline_ref

from .common import sync
from .kernels import implementations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = implementations(DEVICE, affine_coupling, affine_coupling_ref)
SPLINE_IMPLS = implementations(DEVICE, rq_spline, rq_spline_ref)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("scale", ["sigmoid", "exp", "tanh"])
@pytest.mark.parametrize("direction", ["fwd", "inv", "fwd+bwd"])
@pytest.mark.parametrize("shape", [(256, 392), (256, 784)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_affine_coupling(benchmark, impl, scale, direction, shape):
    op, backend = IMPLS[impl]
    x, t, s = (torch.randn(shape, device=DEVICE) for _ in range(3))
    gy, gl = torch.randn(shape, device=DEVICE), torch.randn(shape[0], device=DEVICE)
    leaves = [a.clone().requires_grad_() for a in (x, t, s)]
    benchmark.group = f"affine_coupling {shape[0]}x{shape[1]} {scale} {direction}"

    def run():
        if direction == "fwd+bwd":
            y, ld = op(*leaves, scale=scale)
            torch.autograd.grad((y, ld), leaves, (gy, gl))
        else:
            op(x, t, s, scale=scale, inverse=direction == "inv")
        sync(DEVICE)

    with flowkern.backend(backend):
        run()  # warm-up (and compilation) outside the timing
        benchmark(run)


@pytest.mark.parametrize("impl", list(SPLINE_IMPLS))
@pytest.mark.parametrize("direction", ["fwd", "inv", "fwd+bwd"])
@pytest.mark.parametrize("shape", [(256, 392), (256, 784)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_rq_spline(benchmark, impl, direction, shape, bins=8):
    op, backend = SPLINE_IMPLS[impl]
    x = torch.randn(shape, device=DEVICE) * 1.5
    params = torch.randn(*shape, 3 * bins - 1, device=DEVICE)
    gy, gl = torch.randn(shape, device=DEVICE), torch.randn(shape[0], device=DEVICE)
    leaves = [x.clone().requires_grad_(), params.clone().requires_grad_()]
    benchmark.group = f"rq_spline {shape[0]}x{shape[1]} K={bins} {direction}"

    def run():
        if direction == "fwd+bwd":
            y, ld = op(*leaves, bins=bins)
            torch.autograd.grad((y, ld), leaves, (gy, gl))
        else:
            op(x, params, bins=bins, inverse=direction == "inv")
        sync(DEVICE)

    with flowkern.backend(backend):
        run()
        benchmark(run)
