"""python -m benchmarks --only interop: flowkern.accelerate on the models people already have.

Each library's model (nflows' coupling NSF as sbi's build_nsf makes it, nflows' autoregressive
spline as build_maf_rqs, nflows' MAF as build_maf, zuko's NSF and MAF) plain and accelerated (a deep copy, same weights), and its
floor: the same conditioner networks run on inputs of the same shapes and nothing else, with
Adam over all the model's parameters (what no acceleration of the flow's own arithmetic can go
below). Training steps and sampling interleaved in one run; "gain taken" = (plain - accelerated) / (plain - floor).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
from torch import nn

import flowkern
from flowkern.interop import is_accelerated

from .common import Row, interleaved_medians, markdown_table
from .lowdim import aten_ops, nflows_model, sampler, training_step, zuko_model

MODELS = {"nflows nsf": ("nflows", "nsf"), "nflows maf_rqs": ("nflows", "nsf-ar"), "nflows maf": ("nflows", "maf"),
          "zuko nsf": ("zuko", "nsf-ar"), "zuko maf": ("zuko", "maf")}
SIZES_QUICK = [(5, 20, 256)]
SIZES_FULL = [(2, 10, 50), (5, 20, 256), (10, 50, 512), (20, 100, 1024)]


def build(library: str, kind: str, features: int, context: int):
    return (nflows_model if library == "nflows" else zuko_model)(kind, features, context)


def floor_step(model: nn.Module, x: torch.Tensor, c: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The conditioners of every accelerated layer on inputs of their shapes, and Adam over all
    of the model's parameters (the others, e.g. LULinear's, with a fixed zero gradient: the
    optimizer's per-tensor work stays, as no acceleration of the flow removes it)."""
    calls = []
    for m in model.modules():
        if not is_accelerated(m):
            continue
        if hasattr(m, "transform_net"):  # nflows coupling
            calls.append((m.transform_net, (x[:, m._fk_identity], c)))
        elif hasattr(m, "autoregressive_net"):  # nflows MADE
            calls.append((m.autoregressive_net, (x, c)))
        elif hasattr(m, "hyper"):  # zuko: hyper(cat(x, c))
            calls.append((m.hyper, (torch.cat([x, c], -1),)))
    conditioner = [p for net, _ in calls for p in net.parameters()]
    ids = {id(p) for p in conditioner}
    for p in model.parameters():
        if id(p) not in ids:
            p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam(list(model.parameters()), lr=1e-4)

    def step():
        for p in conditioner:
            p.grad = None
        loss = sum(net(*args).square().mean() for net, args in calls)
        loss.backward()
        opt.step()
        return loss
    return step


def interop_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    rows, body = [], []
    for features, context, batch in (SIZES_QUICK if quick else SIZES_FULL):
        gen = torch.Generator().manual_seed(0)
        x, c = torch.randn(batch, features, generator=gen), torch.randn(batch, context, generator=gen)
        obs = torch.randn(1, context, generator=gen)
        for label, (library, kind) in MODELS.items():
            torch.manual_seed(0)
            plain = build(library, kind, features, context)
            if plain is None:
                continue
            fast = flowkern.accelerate(copy.deepcopy(plain))
            floor = floor_step(copy.deepcopy(fast), x, c)  # its own copy: it keeps fixed zero grads
            steps = {"plain": training_step(plain, x, c), "accelerated": training_step(fast, x, c), "floor": floor}
            samples = {"plain": sampler(plain, 1000, obs), "accelerated": sampler(fast, 1000, obs)}
            for fn in list(steps.values()) + list(samples.values()):
                fn()
            counts = {name: aten_ops(fn) for name, fn in steps.items()}
            # the plain models run torch ops only; the accelerated ones flowkern's compiled kernels
            t = interleaved_medians({k: (f, "cpu") for k, f in steps.items()}, "cpu", budget_s)
            ts = interleaved_medians({k: (f, "cpu") for k, f in samples.items()}, "cpu", budget_s)
            case = f"D={features} C={context} B={batch} {label}"
            gain = (t["plain"] - t["accelerated"]) / max(t["plain"] - t["floor"], 1e-12)
            for name in steps:
                extra = {"aten_ops_per_step": counts[name], "vs_plain": t["plain"] / t[name]}
                if name in ts:
                    extra["sample_per_s"] = 1000 / ts[name]
                if name == "accelerated":
                    extra["gain_taken"] = gain
                    extra["sampling_vs_plain"] = ts["plain"] / ts["accelerated"]
                rows.append(Row("interop", case, name, t[name] * 1e6, extra))
                body.append([case, name, f"{t[name] * 1e3:.2f}", f"{t['plain'] / t[name]:.2f}x",
                             f"{gain:.0%}" if name == "accelerated" else "-",
                             f"{1000 / ts[name]:,.0f}" if name in ts else "-",
                             f"{ts['plain'] / ts[name]:.2f}x" if name in ts else "-", counts[name]])
    header = ["case", "run", "train step ms", "x plain", "gain taken", "sampling samples/s", "x plain (sampling)",
              "aten ops / step"]
    table = ("### interop: flowkern.accelerate(model) on nflows / zuko models (float32; step = zero_grad, "
             "-log_prob.mean, backward, Adam; floor = the conditioners alone, with Adam over all parameters; sampling: "
             "1000 draws for "
             "one observation)\n\n" + markdown_table(header, body))
    return rows, table


if __name__ == "__main__":
    t0 = time.perf_counter()
    print(interop_suite("cpu", True, 0.3)[1])
    print(f"({time.perf_counter() - t0:.0f} s)")
