"""Build flowkern's compiled extension, flowkern._C, from csrc/.

Environment knobs:
  FLOWKERN_NO_EXT=1            pure Python install (reference + Triton backends only)
  FLOWKERN_CUDA=0 / =1         skip / force the CUDA kernels (default: built when nvcc and a CUDA torch exist)
  FLOWKERN_CPU_CAPABILITY=X    vector ISA of the CPU kernels: AVX512, AVX2 or DEFAULT
                               (default: what torch reports for this machine)
  TORCH_CUDA_ARCH_LIST         GPU architectures (default: this machine's GPU, else "8.0;9.0+PTX")

The CPU kernels are compiled for the build machine's vector ISA; flowkern/_build_info.py
records which, and flowkern refuses to load an extension this CPU cannot run (it falls back
to the other backends with a warning rather than dying on an illegal instruction).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _flag(name):
    value = os.environ.get(name, "").strip()
    return None if value == "" else value not in ("0", "false", "False", "no")


def _write_build_info(capability, with_cuda):
    path = os.path.join(ROOT, "flowkern", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py: how flowkern._C was built.\n")
        f.write(f"CPU_CAPABILITY = {capability!r}\nWITH_CUDA = {with_cuda!r}\n")


def extensions():
    if _flag("FLOWKERN_NO_EXT"):
        _write_build_info(None, False)
        return [], {}
    import torch

    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch guesses CUDA_HOME from `which nvcc`, which misleads when nvcc on PATH is a wrapper.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    capability = os.environ.get("FLOWKERN_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    capability = capability.upper()
    if capability not in CPU_FLAGS:  # other architectures (ARM, POWER): portable build
        capability = "DEFAULT"

    want_cuda = _flag("FLOWKERN_CUDA")
    cuda_possible = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if want_cuda and not cuda_possible:
        raise RuntimeError("FLOWKERN_CUDA=1 but no nvcc (CUDA_HOME) or no CUDA build of torch was found")
    with_cuda = cuda_possible if want_cuda is None else want_cuda

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", *CPU_FLAGS[capability]]
    args = dict(name="flowkern._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc")],
                extra_link_args=["-fopenmp"], py_limited_api=False)
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"  # PTX: newer GPUs JIT it
        args["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        args["extra_compile_args"] = {
            "cxx": cxx + ["-DFLOWKERN_WITH_CUDA"],
            # No --use_fast_math: it turns tanhf/expf/logf into ~1e-3-accurate approximations,
            # and these kernels are bound by memory, not arithmetic.
            "nvcc": ["-O3", "-DFLOWKERN_WITH_CUDA", "-Xcompiler", "-fno-math-errno"],
        }
        ext = cpp_extension.CUDAExtension(**args)
    else:
        args["extra_compile_args"] = {"cxx": cxx}
        ext = cpp_extension.CppExtension(**args)
    _write_build_info(capability, with_cuda)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
