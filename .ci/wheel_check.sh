#!/usr/bin/env bash
# A wheel that installs with no compiler: builds one from the tracked (and untracked, not
# ignored) sources in a scratch copy, installs it into a fresh venv beside the pinned torch,
# and imports and runs it there with no compiler on PATH and the source tree out of reach.
# FLOWKERN_CUDA defaults to 0 here (the CUDA kernels cannot run on a CPU machine and would
# double the build); `make wheel` builds the full wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py="$root/.venv/bin/python"
tmp=$(mktemp -d /tmp/flowkern-wheel.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src" "$tmp/dist"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$tmp/src"

echo "-- building the wheel"
(cd "$tmp/src" && FLOWKERN_CUDA="${FLOWKERN_CUDA:-0}" "$py" -m pip wheel --no-build-isolation --no-deps \
    -w "$tmp/dist" . > "$tmp/build.log" 2>&1) || { tail -n 40 "$tmp/build.log"; exit 1; }
wheel=$(ls "$tmp"/dist/flowkern-*.whl)
echo "$(basename "$wheel"): $(du -h "$wheel" | cut -f1)"
unzip -l "$wheel" | grep -E '\.so$' | awk '{print "  " $4}'

echo "-- a fresh venv with the pinned torch"
base=$("$py" -c 'import sys; print(sys._base_executable)')
"$base" -m venv "$tmp/venv"
torch_pin=$("$py" -c 'import torch; print(torch.__version__.split("+")[0])')
# (pip's warnings about this machine's absent local index folders filtered out)
"$tmp/venv/bin/python" -m pip install -q "torch==$torch_pin" numpy tqdm 2>&1 | { grep -v "^WARNING: Location" || true; }
"$tmp/venv/bin/python" -m pip install -q --no-deps "$wheel" 2>&1 | { grep -v "^WARNING: Location" || true; }

echo "-- import and run with no compiler on PATH"
cd "$tmp"
env -i HOME="$tmp" PATH="$tmp/venv/bin" CC=/nonexistent CXX=/nonexistent "$tmp/venv/bin/python" - <<'PY'
import shutil
import torch
import flowkern
from flowkern import _ext
from flowkern.ops import affine_coupling, rq_spline
from flowkern.reference import affine_coupling_ref, rq_spline_ref

for tool in ("gcc", "g++", "cc", "c++", "nvcc", "ninja"):
    assert shutil.which(tool) is None, f"{tool} is on PATH"
assert "site-packages" in flowkern.__file__, flowkern.__file__
print(flowkern.info())
assert flowkern.info().cpu_capability == _ext.host_capabilities()[-1]
g = torch.Generator().manual_seed(0)
x = torch.randn(16, 40, generator=g, dtype=torch.float64, requires_grad=True)
p = torch.randn(16, 40, 23, generator=g, dtype=torch.float64, requires_grad=True)
with flowkern.backend("cpu"):
    y, ld = rq_spline(x, p, bins=8)
    gx, gp = torch.autograd.grad((y.sum() + ld.sum()), (x, p))
ry, rld = rq_spline_ref(x, p, bins=8)
rgx, rgp = torch.autograd.grad((ry.sum() + rld.sum()), (x, p))
for a, b in ((y, ry), (ld, rld), (gx, rgx), (gp, rgp)):
    assert (a - b).abs().max() <= 1e-10 * (1 + b.abs().max()), (a - b).abs().max()
s, t = torch.randn(16, 40, dtype=torch.float64), torch.randn(16, 40, dtype=torch.float64)
with flowkern.backend("cpu"):
    out, lda = affine_coupling(x.detach(), t, s)
rout, rlda = affine_coupling_ref(x.detach(), t, s)
assert torch.allclose(out, rout, rtol=1e-13, atol=1e-13) and torch.allclose(lda, rlda, rtol=1e-13, atol=1e-12)
flow = flowkern.models.RealNVP(features=8, layers=2, hidden=16)
assert torch.isfinite(flow.log_prob(torch.randn(4, 8))).all()
print("wheel smoke test passed")
PY
