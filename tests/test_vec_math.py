"""The CPU kernels' inline float exp and log (csrc/cpu/vec_math.h, AVX2) are Sleef's, the
functions at::vec calls, to the bit: every one of the 2^32 floats is compared. The spline's
knots then round as the float32 reference's softmax rounds them, so an input on a knot takes
the reference's bin. Needs a C++ compiler and the torch headers (skipped without them) and a
CPU with AVX2 + FMA."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _capability_flags(name: str) -> list[str]:
    """setup.py's compiler flags for one CPU capability (its X86_CAPABILITIES table)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "X86_CAPABILITIES" for t in node.targets):
            return ast.literal_eval(node.value)[name]
    raise AssertionError("setup.py has no X86_CAPABILITIES table")


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 Linux only")
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
@pytest.mark.skipif("AVX2" not in torch.backends.cpu.get_cpu_capability() and
                    "AVX512" not in torch.backends.cpu.get_cpu_capability(), reason="the CPU has no AVX2")
def test_inline_exp_and_log_match_sleef_on_every_float(tmp_path):
    from torch.utils import cpp_extension
    include = cpp_extension.include_paths()
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    exe = tmp_path / "vec_math_check"
    cmd = [os.environ.get("CXX", "g++"), "-O3", "-fno-math-errno", "-std=c++17", *_capability_flags("AVX2"),
           "-I", str(ROOT / "csrc"), *[f"-I{p}" for p in include], str(ROOT / "tests/native/vec_math_check.cpp"),
           "-o", str(exe), f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=600)
    rows = {name: (int(d), int(n)) for name, d, n in (line.split() for line in out.stdout.splitlines())}
    assert rows == {"exp": (0, 2**32), "log": (0, 2**32)}, f"{rows}\n{out.stderr}"
