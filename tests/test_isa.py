"""Runtime choice of the CPU kernels' vector ISA (flowkern/_ext.py) and flowkern.info()."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import flowkern
from flowkern import _ext

ALL = _ext.CAPABILITIES

pytestmark = pytest.mark.isa

needs_ext = pytest.mark.skipif(not _ext.available(), reason="compiled CPU kernels not built")


def test_choose_picks_the_best_the_host_runs():
    assert _ext.choose(ALL, ("DEFAULT", "AVX2"), None) == ("AVX2", None)
    assert _ext.choose(ALL, ALL, None) == ("AVX512", None)
    assert _ext.choose(("DEFAULT",), ALL, None) == ("DEFAULT", None)
    assert _ext.choose(("AVX512",), ("DEFAULT", "AVX2"), None) == (None, None)


def test_choose_override_caps_and_explains():
    assert _ext.choose(ALL, ALL, "DEFAULT") == ("DEFAULT", None)
    assert _ext.choose(ALL, ALL, " avx2 ") == ("AVX2", None)
    cap, note = _ext.choose(ALL, ("DEFAULT", "AVX2"), "AVX512")
    assert cap == "AVX2" and "lacks" in note
    cap, note = _ext.choose(("DEFAULT", "AVX512"), ALL, "AVX2")
    assert cap == "DEFAULT" and "not built" in note
    cap, note = _ext.choose(("AVX2",), ALL, "DEFAULT")
    assert cap == "AVX2" and "nothing at or below" in note
    cap, note = _ext.choose(ALL, ("DEFAULT", "AVX2"), "sse9")
    assert cap == "AVX2" and "not one of" in note


def test_host_capabilities_agree_with_torch():
    host = _ext.host_capabilities()
    assert host[0] == "DEFAULT" and list(host) == [c for c in ALL if c in host]
    assert ("AVX2" in host) == bool(torch.cpu._is_avx2_supported() and torch.cpu.get_capabilities().get("fma3"))
    if "AVX512" in host:
        assert torch.cpu._is_avx512_supported()


@needs_ext
def test_loaded_module_is_the_chosen_capability():
    expected, _ = _ext.choose(_ext.built_capabilities(), _ext.host_capabilities(), _ext.requested_capability())
    assert _ext.cpu_capability() == expected
    assert _ext._STATE.cpu.capability == expected  # the module's own compile-time ISA
    info = flowkern.info()
    assert info.cpu_capability == expected and "cpu" in info.backends
    assert expected in str(info) and "CUDA kernels" in str(info)


def _run(env_value):
    env = dict(os.environ)
    env.pop(_ext.ENV_VAR, None)
    if env_value is not None:
        env[_ext.ENV_VAR] = env_value
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import torch, flowkern\n"
            "from flowkern.ops import rq_spline\n"
            "from flowkern.reference import rq_spline_ref\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = torch.randn(8, 37, generator=g, dtype=torch.float64) * 2\n"
            "p = torch.randn(8, 37, 23, generator=g, dtype=torch.float64)\n"
            "with flowkern.backend('cpu'):\n"
            "    y, ld = rq_spline(x, p, bins=8)\n"
            "r, lr = rq_spline_ref(x, p, bins=8)\n"
            # float64 kernels of any ISA agree with the reference to a few ulps of the knots' scale
            "assert (y - r).abs().max() < 1e-12 and (ld - lr).abs().max() < 1e-11, ((y - r).abs().max(), (ld - lr).abs().max())\n"
            "print('CAP', flowkern.info().cpu_capability)\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@needs_ext
@pytest.mark.parametrize("capability", [c for c in ALL if c in _ext.host_capabilities()])
def test_override_selects_each_capability_the_host_runs(capability):
    if capability not in _ext.built_capabilities():
        pytest.skip(f"{capability} not built")
    res = _run(capability.lower())
    assert res.returncode == 0, res.stderr
    assert f"CAP {capability}" in res.stdout
    assert "RuntimeWarning" not in res.stderr


@needs_ext
def test_override_above_the_host_falls_to_the_best_with_a_warning():
    top = [c for c in ALL if c not in _ext.host_capabilities()]
    if not top:
        pytest.skip("this CPU runs every capability")
    res = _run(top[-1])
    assert res.returncode == 0, res.stderr
    assert f"CAP {_ext.host_capabilities()[-1]}" in res.stdout and "lacks it" in res.stderr


@needs_ext
def test_unknown_override_warns():
    res = _run("sse9")
    assert res.returncode == 0, res.stderr
    assert "not one of" in res.stderr
