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
