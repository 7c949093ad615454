"""Compile every csrc/cuda/*.cu with nvcc against this torch's headers, without linking or
running anything: CI has no GPU, but a CUDA kernel that no longer compiles must fail it."""
import glob
import os
import subprocess
import sys
import tempfile

import torch

if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # as setup.py: `which nvcc` may be a wrapper
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
if not os.path.exists(nvcc):
    nvcc = "nvcc"
includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")] + [f"-I{os.path.join(root, 'csrc')}"]
flags = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-DFLOWKERN_WITH_CUDA", "-D__CUDA_NO_HALF_OPERATORS__",
         "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
         "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC"]
# Every CUDA source, or only the ones named on the command line (while working on one).
sources = [os.path.abspath(a) for a in sys.argv[1:]] or sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
if torch.version.cuda is None:
    sys.exit("nvcc check: this torch has no CUDA headers")
with tempfile.TemporaryDirectory() as tmp:
    for src in sources:
        out = os.path.join(tmp, os.path.basename(src) + ".o")
        print(f"nvcc -c {os.path.relpath(src, root)}", flush=True)
        subprocess.run([nvcc, "-c", src, "-o", out, *flags, *includes], check=True)
print(f"nvcc check: {len(sources)} CUDA source(s) compile")
