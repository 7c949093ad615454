#!/usr/bin/env bash
# GPU check (make gpu-check): on a machine with CUDA, build the extension with its CUDA kernels,
# run the GPU tests (every backend against the reference on the GPU, fp32/fp16/bf16), the
# benchmarks and the training-step ceilings, and put every log and result in one folder: $OUT if
# set, else gpu-check/.
# Uses the machine's own python3/torch (no venv, no network): pip builds offline.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status=0
{
    nvidia-smi || true
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/machine.txt" 2>&1

echo "== build" | tee "$out/summary.txt"
start=$(date +%s)
if ! FLOWKERN_CUDA=1 "$py" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
    echo "build FAILED (see build.log)" | tee -a "$out/summary.txt"; tail -30 "$out/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"

echo "== GPU tests" | tee -a "$out/summary.txt"
timeout 240 "$py" -m pytest tests -q -x -p no:cacheprovider > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log" | tee -a "$out/summary.txt"

echo "== benchmarks" | tee -a "$out/summary.txt"
# Without torch.compile rows first: inductor's GPU builds (a dozen models and ops) could take the
# whole budget; the training step with them comes after, on its own.
timeout 200 "$py" -m benchmarks --quick --device cuda --no-compile --name cuda > "$out/bench.log" 2>&1 || status=1
cp runs/bench/cuda.json runs/bench/cuda.md "$out/" 2>/dev/null || true
grep "|" "$out/bench.log" | head -60 | tee -a "$out/summary.txt"

echo "== training step with torch.compile rows" | tee -a "$out/summary.txt"
timeout 150 "$py" -m benchmarks --quick --device cuda --only train --name cuda-compile > "$out/bench-compile.log" 2>&1 \
    || echo "(compile rows timed out or failed: see bench-compile.log)" | tee -a "$out/summary.txt"
cp runs/bench/cuda-compile.json runs/bench/cuda-compile.md "$out/" 2>/dev/null || true
grep "|" "$out/bench-compile.log" | tee -a "$out/summary.txt"

echo "== memory-saving backprop" | tee -a "$out/summary.txt"
timeout 120 "$py" -m benchmarks.memory_saving --device cuda > "$out/memory_saving.log" 2>&1 || status=1
cp runs/bench/memory_saving-cuda.json runs/bench/memory_saving-cuda.md "$out/" 2>/dev/null || true
grep "|" "$out/memory_saving.log" | tee -a "$out/summary.txt"
echo "== training-step ceilings" | tee -a "$out/summary.txt"
timeout 150 "$py" -m benchmarks.ceiling --device cuda --budget 1 > "$out/ceiling.log" 2>&1 || status=1
cp runs/bench/ceiling-cuda.json runs/bench/ceiling-cuda.md "$out/" 2>/dev/null || true
grep "|" "$out/ceiling.log" | tee -a "$out/summary.txt"
exit $status
