"""python -m benchmarks --only interop: flowkern.accelerate on the models people already have.

Each library's model (nflows' coupling NSF as sbi's build_nsf makes it, nflows' autoregressive
spline as build_maf_rqs, nflows' MAF as build_maf, zuko's NSF and MAF) plain and accelerated (a deep copy, same weights), and its
floor: the same conditioner networks run on inputs of the same shapes and nothing else, with
Adam over all the model's parameters (what no acceleration of the flow's own arithmetic can go
below). Training steps and sampling interleaved in one run; "gain taken" = (plain - accelerated) / (plain - floor).
An epoch is 10^4 simulations at the row's batch size (ceil(10^4 / B) steps at the step's
median); sampling draws 10^4 posterior samples, 100 for each of 100 observations, in one call.
--full adds nflows' spline RealNVP at MNIST size: 784 features, no context, batch 64, four
couplings (8 bins, linear tails at 3) with ResidualNets of 256 (2 blocks), sampling 1000 images.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import nn

import flowkern
from flowkern.interop import is_accelerated

from .common import Row, interleaved_medians, markdown_table
from .lowdim import _NflowsFlow, aten_ops, nflows_model, sampler, training_step, zuko_model

MODELS = {"nflows nsf": ("nflows", "nsf"), "nflows maf_rqs": ("nflows", "nsf-ar"), "nflows maf": ("nflows", "maf"),
          "zuko nsf": ("zuko", "nsf-ar"), "zuko maf": ("zuko", "maf")}
SIZES_QUICK = [(5, 20, 256)]
SIZES_FULL = [(2, 10, 50), (5, 20, 256), (10, 50, 512), (20, 100, 1024)]
EPOCH_SIMULATIONS = 10_000
OBSERVATIONS, DRAWS = 100, 100  # 10^4 posterior samples per sampling call
MNIST_FEATURES, MNIST_BATCH, MNIST_DRAWS = 784, 64, 1000


def mnist_realnvp():
    """nflows' spline RealNVP on flattened MNIST: alternating-mask spline couplings with
    ResidualNet conditioners (no context, no LULinear: nflows' LU assembly is the cheaper one at
    784 features, and it would be left as it is)."""
    try:
        from nflows.nn.nets import ResidualNet
        from nflows.transforms.base import CompositeTransform
        from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
        from nflows.utils.torchutils import create_alternating_binary_mask
    except ImportError:
        return None

    def net(i, o):
        return ResidualNet(i, o, 256, num_blocks=2)
    ts = [PiecewiseRationalQuadraticCouplingTransform(create_alternating_binary_mask(MNIST_FEATURES, even=i % 2 == 0),
                                                      net, num_bins=8, tails="linear", tail_bound=3.0)
          for i in range(4)]
    return _NflowsFlow(CompositeTransform(ts), MNIST_FEATURES)


def _cases(quick: bool):
    """(case label, plain model builder, x, c, sampling draws, sampling context) per row."""
    for features, context, batch in (SIZES_QUICK if quick else SIZES_FULL):
        gen = torch.Generator().manual_seed(0)
        x, c = torch.randn(batch, features, generator=gen), torch.randn(batch, context, generator=gen)
        obs = torch.randn(OBSERVATIONS, context, generator=gen)
        for label, (library, kind) in MODELS.items():
            yield (f"D={features} C={context} B={batch} {label}", lambda lib=library, k=kind, f=features, ctx=context:
                   build(lib, k, f, ctx), x, c, DRAWS, obs)
    if not quick:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(MNIST_BATCH, MNIST_FEATURES, generator=gen)
        yield (f"D={MNIST_FEATURES} B={MNIST_BATCH} nflows spline realnvp (MNIST size)", mnist_realnvp, x, None,
               MNIST_DRAWS, None)


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
    for case, make, x, c, draws, obs in _cases(quick):
        torch.manual_seed(0)
        plain = make()
        if plain is None:
            continue
        fast = flowkern.accelerate(copy.deepcopy(plain))
        floor = floor_step(copy.deepcopy(fast), x, c)  # its own copy: it keeps fixed zero grads
        steps = {"plain": training_step(plain, x, c), "accelerated": training_step(fast, x, c), "floor": floor}
        samples = {"plain": sampler(plain, draws, obs), "accelerated": sampler(fast, draws, obs)}
        n_samples = draws * (1 if obs is None else obs.shape[0])
        for fn in list(steps.values()) + list(samples.values()):
            fn()
        counts = {name: aten_ops(fn) for name, fn in steps.items()}
        # the plain models run torch ops only; the accelerated ones flowkern's compiled kernels
        t = interleaved_medians({k: (f, "cpu") for k, f in steps.items()}, "cpu", budget_s)
        ts = interleaved_medians({k: (f, "cpu") for k, f in samples.items()}, "cpu", budget_s)
        epoch_steps = math.ceil(EPOCH_SIMULATIONS / x.shape[0])
        gain = (t["plain"] - t["accelerated"]) / max(t["plain"] - t["floor"], 1e-12)
        for name in steps:
            extra = {"aten_ops_per_step": counts[name], "vs_plain": t["plain"] / t[name],
                     "epoch_s": t[name] * epoch_steps}
            if name in ts:
                extra["sample_per_s"] = n_samples / ts[name]
                extra["samples"] = n_samples
                extra["sampling_s"] = ts[name]
            if name == "accelerated":
                extra["gain_taken"] = gain
                extra["sampling_vs_plain"] = ts["plain"] / ts["accelerated"]
            rows.append(Row("interop", case, name, t[name] * 1e6, extra))
            body.append([case, name, f"{t[name] * 1e3:.2f}", f"{t[name] * epoch_steps:.2f}",
                         f"{t['plain'] / t[name]:.2f}x", f"{gain:.0%}" if name == "accelerated" else "-",
                         f"{ts[name]:.3f} ({n_samples:,})" if name in ts else "-",
                         f"{ts['plain'] / ts[name]:.2f}x" if name in ts else "-", counts[name]])
    header = ["case", "run", "train step ms", "epoch s", "x plain", "gain taken", "sampling s (samples)",
              "x plain (sampling)", "aten ops / step"]
    table = ("### interop: flowkern.accelerate(model) on nflows / zuko models (float32; step = zero_grad, "
             "-log_prob.mean, backward, Adam; epoch = 10^4 simulations, ceil(10^4 / B) steps at the step's median; "
             "floor = the conditioners alone, with Adam over all parameters; sampling: 10^4 posterior samples, "
             f"{DRAWS} for each of {OBSERVATIONS} observations, in one call)\n\n" + markdown_table(header, body))
    return rows, table


if __name__ == "__main__":
    t0 = time.perf_counter()
    print(interop_suite("cpu", True, 0.3)[1])
    print(f"({time.perf_counter() - t0:.0f} s)")
