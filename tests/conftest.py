"""Shared test helpers: which backends can run here, and the accuracy rule kernels must meet.

Triton runs on the CPU only under TRITON_INTERPRET=1, which must be set before triton is
imported, so `make test` runs the suite twice: once plainly, once with TRITON_INTERPRET=1 and
`-m triton`. Tests parametrized over a Triton backend carry the `triton` marker.
"""
from __future__ import annotations

import pytest
import torch

import flowkern

from tolerances import affine_roundtrip_bound, spline_roundtrip_bound  # noqa: F401 (re-exported)


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
