"""python -m benchmarks [--quick | --full] [--device cpu|cuda] [--only NAME] [--root DIR] [--no-compile]

Runs the suites, prints Markdown tables, and writes runs/bench/<name>.json (machine and every
row), .md (the tables) and .png (img/s of the end-to-end suites). FLOWKERN_BENCH_OUT names
another folder; the committed reference results live in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import common, interop, kernels, lowdim, training
from .chart import training_chart
from .common import describe_machine, machine, write_results

SUITES = {
    "affine_coupling": kernels.affine_coupling_suite,
    "rq_spline": kernels.rq_spline_suite,
    "actnorm": kernels.actnorm_suite,
    "batchnorm_flow": kernels.batchnorm_flow_suite,
    "dequantize_logit": kernels.dequantize_logit_suite,
    "gaussian_nll": kernels.gaussian_nll_suite,
    "train": training.train_suite,
    "sample": training.sample_suite,
    "lowdim": lowdim.lowdim_suite,
    "interop": interop.interop_suite,
}
END_TO_END = {"train", "sample"}  # the suites that take --root
ALIASES = {"realnvp_train": "train"}  # former names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, short timings (default; under 2 minutes "
                      "on a 2-core CPU)")
    mode.add_argument("--full", action="store_true", help="every size and model, longer timings")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--only", action="append", choices=sorted(SUITES) + sorted(ALIASES),
                   help="run only this suite (repeatable)")
    p.add_argument("--root", default=None, help="a folder holding MNIST (DIR/MNIST/raw/ as torchvision keeps it, "
                   "or the IDX files in DIR) for the train and sample suites; without it, or when it holds none, "
                   "MNIST-shaped synthetic digits")
    p.add_argument("--name", default=None, help="results file stem (default: the device)")
    p.add_argument("--no-compile", action="store_true",
                   help="no torch.compile rows (inductor's build time dominates a short run, e.g. on a GPU)")
    args = p.parse_args(argv)
    common.COMPILE = not args.no_compile
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    quick = not args.full
    budget = 0.3 if quick else 1.0
    info = machine(args.device)
    names = list(dict.fromkeys(ALIASES.get(n, n) for n in (args.only or SUITES)))
    if END_TO_END & set(names):
        info["data"] = training.load_images(1, args.root)[1]
    print(f"# flowkern benchmarks ({'quick' if quick else 'full'}) on {describe_machine(info)}\n", flush=True)
    rows, tables = [], []
    for name in names:
        t0 = time.perf_counter()
        extra = {"root": args.root} if name in END_TO_END else {}
        r, table = SUITES[name](args.device, quick, budget, **extra)
        rows += r
        tables.append(table)
        print(table + f"\n\n({name}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    json_path, md_path = write_results(args.name or args.device, info, rows, tables)
    png = training_chart(rows, md_path[:-3] + ".png", f"End to end, img/s (higher is better): {describe_machine(info)}")
    print(f"results: {json_path}, {md_path}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
