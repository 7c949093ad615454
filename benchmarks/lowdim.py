"""Low-dimensional conditional flows at simulation-based inference's sizes: a training step and
sampling throughput of MAF and NSF (coupling and autoregressive), flowkern against nflows and
zuko building the same architectures, interleaved; plus the aten ops one training step
dispatches (a TorchDispatchMode count: on a GPU each one is a kernel launch).

The same architectures (sbi's builders): 5 layers, hidden 50, 10 bins, bound 3, tanh MADEs
with nflows' num_blocks = 2 (3 hidden layers) and a random permutation after each MAF layer,
ResidualNet conditioners (2 blocks) and LU-linear layers for the coupling NSF.
- nflows 0.14: MaskedAffineAutoregressiveTransform (use_residual_blocks=False, its
  softplus(raw) + 1e-3 scale: flowkern's scale="softplus"), PiecewiseRationalQuadraticCouplingTransform with its
  ResidualNet and LULinear, MaskedPiecewiseRationalQuadraticAutoregressiveTransform
  (use_residual_blocks=False, linear tails).
- zuko 1.6: MAF (MaskedMLP of 3 x 50, tanh, its MonotonicAffineTransform: flowkern's
  scale="rational" with clamp = -log(1e-3)); NSF (its autoregressive MonotonicRQSTransform, bound 5 as zuko fixes it). zuko
  has no coupling NSF with a residual conditioner: '-'.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import flowkern
from flowkern import models

from .common import Row, interleaved_medians, markdown_table

LAYERS, HIDDEN, BINS, BOUND, BLOCKS = 5, 50, 10, 3.0, 2


# ------------------------------------------------------------------------------------- models

class _NflowsFlow(nn.Module):
    """log_prob(x, c) and sample(n, c) of an nflows transform under N(0, I), nflows' Flow's
    arithmetic (not nflows.flows: it imports matplotlib)."""

    def __init__(self, transform: nn.Module, features: int):
        super().__init__()
        self.transform, self.features = transform, features

    def log_prob(self, x, c):
        z, lad = self.transform(x, context=c)
        return -0.5 * z.pow(2).sum(1) - 0.5 * self.features * 1.8378770664093453 + lad

    def sample(self, n, c):  # (M, n, D), nflows' layout: n draws for each context row (M = 1 without)
        m = 1 if c is None else c.shape[0]
        z = torch.randn(m * n, self.features)
        x, _ = self.transform.inverse(z, context=None if c is None else c.repeat_interleave(n, 0))
        return x.view(m, n, self.features)


def nflows_model(kind: str, features: int, context: int) -> Optional[nn.Module]:
    try:
        from nflows.nn.nets import ResidualNet
        from nflows.transforms.autoregressive import (MaskedAffineAutoregressiveTransform,
                                                      MaskedPiecewiseRationalQuadraticAutoregressiveTransform)
        from nflows.transforms.base import CompositeTransform
        from nflows.transforms.coupling import PiecewiseRationalQuadraticCouplingTransform
        from nflows.transforms.lu import LULinear
        from nflows.transforms.permutations import RandomPermutation
        from nflows.utils.torchutils import create_alternating_binary_mask
    except ImportError:
        return None
    ts = []
    for i in range(LAYERS):
        if kind == "maf":
            ts += [MaskedAffineAutoregressiveTransform(features, HIDDEN, context, num_blocks=BLOCKS,
                                                       use_residual_blocks=False, activation=torch.tanh),
                   RandomPermutation(features)]
        elif kind == "nsf":
            def net(i_f, o_f):
                return ResidualNet(i_f, o_f, HIDDEN, context_features=context, num_blocks=BLOCKS)
            ts += [PiecewiseRationalQuadraticCouplingTransform(
                create_alternating_binary_mask(features, even=i % 2 == 0), net, num_bins=BINS, tails="linear",
                tail_bound=BOUND), LULinear(features, identity_init=True)]
        else:  # autoregressive NSF
            ts += [MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                features, HIDDEN, context, num_bins=BINS, tails="linear", tail_bound=BOUND, num_blocks=BLOCKS,
                use_residual_blocks=False, activation=torch.tanh), RandomPermutation(features)]
    return _NflowsFlow(CompositeTransform(ts), features)


class _ZukoFlow(nn.Module):
    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x, c):
        return self.flow(c).log_prob(x)

    def sample(self, n, c):  # (n, M, D)
        return self.flow(c).sample((n,))


def zuko_model(kind: str, features: int, context: int) -> Optional[nn.Module]:
    try:
        import zuko
    except ImportError:
        return None
    common = dict(transforms=LAYERS, randperm=True, hidden_features=[HIDDEN] * (BLOCKS + 1), activation=nn.Tanh)
    if kind == "maf":
        return _ZukoFlow(zuko.flows.MAF(features, context, **common))
    if kind == "nsf-ar":
        return _ZukoFlow(zuko.flows.NSF(features, context, bins=BINS, **common))
    return None


class _FlowkernFlow(nn.Module):
    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x, c):
        return self.flow.log_prob(x, c)

    def sample(self, n, c):  # (n, M, D)
        return self.flow.sample(n, context=c)


ZUKO_CLAMP = -math.log(1e-3)  # zuko's MonotonicAffineTransform(slope=1e-3): log m = s / (1 + |s| / 6.9)


def flowkern_model(kind: str, features: int, context: int, scale: str, clamp: float = 2.0) -> nn.Module:
    if kind == "maf":
        return _FlowkernFlow(models.MAF(features, context, LAYERS, HIDDEN, blocks=BLOCKS, scale=scale, clamp=clamp))
    if kind == "nsf":
        return _FlowkernFlow(models.NSF(features, context, LAYERS, HIDDEN, bins=BINS, bound=BOUND, blocks=BLOCKS))
    return _FlowkernFlow(models.NSF(features, context, LAYERS, HIDDEN, bins=BINS, bound=BOUND, blocks=BLOCKS,
                                    autoregressive=True, conditioner="mlp", activation="tanh"))


def implementations(kind: str, features: int, context: int) -> dict[str, nn.Module]:
    """name -> model; the flowkern MAF twice, with nflows' scale and with zuko's."""
    impls = {}
    if kind == "maf":
        impls["flowkern (softplus)"] = flowkern_model(kind, features, context, "softplus")
        impls["flowkern (rational)"] = flowkern_model(kind, features, context, "rational", ZUKO_CLAMP)
    else:
        impls["flowkern"] = flowkern_model(kind, features, context, "tanh")
    for name, build in (("nflows", nflows_model), ("zuko", zuko_model)):
        m = build(kind, features, context)
        if m is not None:
            impls[name] = m
    return impls


# ---------------------------------------------------------------------------------- measuring

class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def aten_ops(step: Callable[[], object]) -> int:
    with _OpCount() as mode:
        step()
    return sum(mode.ops.values())


def training_step(model: nn.Module, x: torch.Tensor, c: torch.Tensor) -> Callable[[], torch.Tensor]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(x, c).mean()
        loss.backward()
        opt.step()
        return loss
    return step


def sampler(model: nn.Module, n: int, c: torch.Tensor) -> Callable[[], torch.Tensor]:
    @torch.no_grad()
    def run():
        return model.sample(n, c)
    return run


SIZES_QUICK = [(5, 20, 256)]
SIZES_FULL = [(2, 10, 50), (5, 20, 256), (10, 50, 512), (20, 100, 1024)]
KINDS = ("maf", "nsf", "nsf-ar")


def lowdim_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    if device != "cpu":
        device = "cpu"  # the peers' sampling paths here build CPU tensors; the suite is a CPU one
    rows, body = [], []
    for features, context, batch in (SIZES_QUICK if quick else SIZES_FULL):
        gen = torch.Generator().manual_seed(0)
        x, c = torch.randn(batch, features, generator=gen), torch.randn(batch, context, generator=gen)
        obs = torch.randn(1, context, generator=gen)  # sampling: 1000 draws for one observation
        for kind in KINDS:
            torch.manual_seed(0)
            impls = implementations(kind, features, context)
            steps = {name: (training_step(m, x, c), "cpu" if name.startswith("flowkern") else "reference")
                     for name, m in impls.items()}
            samples = {name: (sampler(m, 1000, obs), "cpu" if name.startswith("flowkern") else "reference")
                       for name, m in impls.items()}
            for fn, backend in list(steps.values()) + list(samples.values()):
                with flowkern.backend(backend):
                    fn()  # warm
            counts = {}
            for name, (fn, backend) in steps.items():
                with flowkern.backend(backend):
                    counts[name] = aten_ops(fn)
            t_step = interleaved_medians(steps, device, budget_s)
            t_sample = interleaved_medians(samples, device, budget_s)
            case = f"D={features} C={context} B={batch} {kind}"
            best_peer = min((t_step[p] for p in ("nflows", "zuko") if p in t_step), default=None)
            for name in impls:
                extra = {"aten_ops_per_step": counts[name], "train_samples_per_s": batch / t_step[name],
                         "sample_per_s": 1000 / t_sample[name]}
                if best_peer is not None:
                    extra["vs_best_peer"] = best_peer / t_step[name]
                rows.append(Row("lowdim", case, name, t_step[name] * 1e6, extra))
                body.append([case, name, f"{t_step[name] * 1e3:.2f}", f"{batch / t_step[name]:,.0f}",
                             f"{extra.get('vs_best_peer', float('nan')):.2f}x" if best_peer else "-",
                             f"{1000 / t_sample[name]:,.0f}", counts[name]])
    header = ["case", "impl", "train step ms", "train samples/s", "x best peer (step)", "sampling samples/s",
              "aten ops / step"]
    table = ("### lowdim: sbi-sized conditional MAF / NSF (float32; step = zero_grad, -log_prob.mean, backward, "
             "Adam; sampling: 1000 draws for one observation)\n\n" + markdown_table(header, body))
    return rows, table


if __name__ == "__main__":
    t0 = time.perf_counter()
    print(lowdim_suite("cpu", True, 0.3)[1])
    print(f"({time.perf_counter() - t0:.0f} s)")
