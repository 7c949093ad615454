"""Shared test helpers: which backends can run here, and the accuracy rule kernels must meet.

Triton runs on the CPU only under TRITON_INTERPRET=1, which must be set before triton is
imported, so `make test` runs the suite twice: once plainly, once with TRITON_INTERPRET=1 and
`-m triton`. Tests parametrized over a Triton backend carry the `triton` marker.
"""
from __future__ import annotations

import pytest
import torch

import flowkern


def kernel_backends(with_reference: bool = False):
    """pytest params (backend, device) for every non-reference backend available here (and the
    reference first, with_reference=True)."""
    params = [pytest.param("reference", "cpu", id="reference")] if with_reference else []
    avail = flowkern.available_backends()
    if "cpu" in avail:
        params.append(pytest.param("cpu", "cpu", id="cpu"))
    if "cuda" in avail:
        params.append(pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu))
    if "triton" in avail:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        params.append(pytest.param("triton", dev, id=f"triton-{dev}", marks=pytest.mark.triton))
    if not params:
        params.append(pytest.param(None, None, marks=pytest.mark.skip(reason="no kernel backend here")))
    return params


def assert_close_2x(name, got, ref64, ref_lowp, atol):
    """The kernel's error vs the float64 reference is at most 2x the error of the reference run
    in the kernel's dtype, plus atol (the rule the best kernel libraries use)."""
    got, ref64, ref_lowp = (t.detach().double().cpu() for t in (got, ref64, ref_lowp))
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    err = (got - ref64).abs()
    bound = 2 * (ref_lowp - ref64).abs() + atol + 1e-6 * ref64.abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst err "
                           f"{err[bad].max().item():.3g} vs bound {bound[bad].min().item():.3g}")


def affine_roundtrip_bound(x, t, m, eps, inverse=False, tiny=0.0):
    """|x - back| elementwise for the affine coupling's round trip in a dtype of unit roundoff
    eps. Forward first: y = x m + t rounds to eps (|x m| + |t|), which going back divides by m;
    inverse first: y = (x - t) / m rounds to eps (|x| + |t|) / m, which going back multiplies
    by m. 16 ulps covers the few roundings on each side; `tiny` (the dtype's subnormal
    spacing) the intermediate's absolute floor, over the first map's slope."""
    x, t, m = (a.double() for a in (x, t, m))
    first = 1 / m if inverse else m
    return 16 * eps * (x.abs() + (t.abs() if inverse else t.abs() / m)) + 2 * tiny / first


def spline_roundtrip_bound(x, y, log_slope, bound, eps, tiny=0.0):
    """|F^-1(F(x)) - x| elementwise for the spline in a dtype of unit roundoff eps: y rounds to
    eps (|y| + bound) (the knots too, which the inverse rebuilds), and the inverse scales that by
    its slope, 1 / F'(x) = exp(-log_slope) (flat bins of F magnify it), beside x's own knots'
    rounding; 64 ulps covers the dozen roundings of the knots' cumulative sums and the root
    formula. `tiny` is the dtype's subnormal spacing, for flat bins near zero. No CPU's rounding
    enters: it bounds every correctly rounded implementation."""
    inv_slope = torch.exp(-log_slope)
    return 64 * eps * ((x.abs() + bound) + (y.abs() + bound) * inv_slope) + 2 * tiny * inv_slope


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = flowkern.get_backend()
    yield
    flowkern.set_backend(previous)


def pytest_collection_modifyitems(config, items):
    """Marks `cpu_kernels` every test that runs the compiled CPU kernels (parametrized with the
    "cpu" backend, or marked by hand): `make test` runs those again under each lower CPU
    capability (FLOWKERN_CPU_CAPABILITY=DEFAULT, ...)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "cpu":
            item.add_marker(pytest.mark.cpu_kernels)
