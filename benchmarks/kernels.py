"""Per-op speed: flowkern's kernels vs the eager reference vs torch.compile(reference),
with effective bandwidth against clone() of the same bytes in the same run (the roofline of
these memory-bound ops)."""
from __future__ import annotations

from typing import Callable

import torch

import flowkern
from flowkern.ops import affine_coupling
from flowkern.reference import affine_coupling_ref

from .common import Row, compiled, markdown_table, median_time


def _impls(device: str) -> dict[str, tuple[Callable, str]]:
    """name -> (op, backend to run it under)."""
    impls = {"eager": (affine_coupling_ref, "reference")}
    comp = compiled(affine_coupling_ref, dynamic=False)
    if comp is not None:
        impls["compile"] = (comp, "reference")
    avail = flowkern.available_backends()
    native = "cpu" if device == "cpu" else "cuda"
    if native in avail:
        impls["flowkern"] = (affine_coupling, native)
    if device == "cuda" and "triton" in avail:
        impls["flowkern-triton"] = (affine_coupling, "triton")
    return impls


def affine_coupling_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    sizes = [(256, 392)] if quick else [(256, 392), (256, 784), (1024, 784), (4096, 3072)]
    if device == "cuda":
        sizes = [(256, 392), (4096, 784), (16384, 3072)] if quick else sizes + [(16384, 3072), (65536, 3072)]
    scales = ("sigmoid", "exp") if quick else ("sigmoid", "exp", "tanh")
    dtype = torch.float32
    rows, body = [], []
    impls = _impls(device)
    for b, d in sizes:
        gen = torch.Generator().manual_seed(0)
        x, t, s = (torch.randn(b, d, generator=gen).to(device, dtype) for _ in range(3))
        gy = torch.randn(b, d, generator=gen).to(device, dtype)
        gl = torch.randn(b, generator=gen).to(device)
        tensor_bytes = x.numel() * x.element_size()
        clone_s = median_time(lambda: x.clone(), device, budget_s)
        clone_gbs = 2 * tensor_bytes / clone_s / 1e9
        case0 = f"B={b} D={d}"
        rows.append(Row("affine_coupling", case0, "clone", clone_s * 1e6, {"GB/s": clone_gbs}))
        for scale in scales:
            for direction in ("fwd", "fwd+bwd"):
                case = f"{case0} {scale} {direction}"
                moved = (4 if direction == "fwd" else 9) * tensor_bytes  # the fused algorithm's traffic
                times = {}
                for name, (op, backend) in impls.items():
                    with flowkern.backend(backend):
                        if direction == "fwd":
                            fn = lambda op=op: op(x, t, s, scale=scale)  # noqa: E731
                        else:
                            leaves = [a.clone().requires_grad_() for a in (x, t, s)]

                            def fn(op=op, leaves=leaves):
                                y, ld = op(*leaves, scale=scale)
                                return torch.autograd.grad((y, ld), leaves, (gy, gl))
                        times[name] = median_time(fn, device, budget_s)
                for name, sec in times.items():
                    gbs = moved / sec / 1e9
                    extra = {"GB/s": gbs, "clone_fraction": gbs / clone_gbs,
                             "vs_eager": times["eager"] / sec}
                    if "compile" in times:
                        extra["vs_compile"] = times["compile"] / sec
                    rows.append(Row("affine_coupling", case, name, sec * 1e6, extra))
                    body.append([case, name, sec * 1e6, extra["vs_eager"], extra.get("vs_compile", "-"),
                                 gbs, f"{100 * extra['clone_fraction']:.0f}%"])
    table = "### affine_coupling (float32; GB/s counts the fused kernels' minimal traffic)\n\n" + markdown_table(
        ["case", "impl", "median us", "x eager", "x compile", "GB/s", "of clone"], body)
    return rows, table
