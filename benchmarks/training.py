"""End-to-end: img/s of a full RealNVP training step (forward, backward, AdamW) on
MNIST-shaped data, and the bytes autograd saves for its backward, for each implementation:
same model, data and batch."""
from __future__ import annotations

import math

import torch

import flowkern
from flowkern.models import RealNVP

from .common import Row, markdown_table, median_time
from .kernels import saved_bytes

ALPHA = 1e-6  # logit-space squeeze of the dequantized pixels, as in RealNVP


def mnist_like_batch(batch: int, device: str, seed: int = 0) -> torch.Tensor:
    """Dequantized, logit-transformed uint8 pixels of MNIST-shaped synthetic digits: a dark
    background with bright strokes in the middle, so the statistics resemble MNIST's."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = torch.exp(-((yy - 14) ** 2 + (xx - 14) ** 2) / 60.0)
    bright = torch.rand(batch, 28, 28, generator=g) < centre * 0.6
    pixels = torch.where(bright, torch.randint(128, 256, (batch, 28, 28), generator=g), 0)
    x = (pixels.double() + torch.rand(batch, 28, 28, generator=g, dtype=torch.float64)) / 256.0
    x = ALPHA + (1 - 2 * ALPHA) * x
    return torch.log(x / (1 - x)).float().reshape(batch, 784).to(device)


# (coupling, layers, hidden, batch) per mode: the spline conditioner's output is 23x wider, so
# quick mode trains a smaller spline model to stay within its time.
CONFIGS = {
    "quick": [("affine", 8, 512, 256), ("spline", 4, 256, 128)],
    "full": [("affine", 8, 512, 256), ("spline", 8, 512, 256)],
}


def realnvp_train_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    impls = [("eager", "reference", False), ("compile", "reference", True), ("flowkern", "auto", False),
             ("flowkern+compile", "auto", True)]
    rows, body = [], []
    for coupling, layers, hidden, batch in CONFIGS["quick" if quick else "full"]:
        x = mnist_like_batch(batch, device)
        case = f"{coupling} L={layers} H={hidden} B={batch}"
        times = {}
        for name, backend, use_compile in impls:
            torch.manual_seed(0)
            model = RealNVP(784, layers=layers, hidden=hidden, coupling=coupling).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

            def loss_fn(v, model=model):
                return -model.log_prob(v).mean()

            step_loss = torch.compile(loss_fn, fullgraph=True, dynamic=False) if use_compile else loss_fn

            def step(opt=opt, step_loss=step_loss):
                opt.zero_grad(set_to_none=True)
                loss = step_loss(x)
                loss.backward()
                opt.step()
                return loss

            with flowkern.backend(backend):
                step()  # compile / warm up outside the timing
                sec = median_time(step, device, budget_s * 6, min_reps=3, max_reps=50)
                loss = float(step().detach())
                saved = None if use_compile else saved_bytes(lambda: loss_fn(x)) / 2**20
            if not math.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss}")
            times[name] = sec
            rows.append(Row("realnvp_train", case, name, sec * 1e6, {"img/s": batch / sec, "saved_MB": saved}))
        for r in rows[-len(impls):]:
            r.extra["vs_eager"] = times["eager"] * 1e6 / r.median_us
            saved = r.extra["saved_MB"]
            body.append([case, r.impl, r.median_us / 1e3, r.extra["img/s"], r.extra["vs_eager"],
                         "-" if saved is None else f"{saved:.0f}"])
    table = ("### RealNVP training step (MNIST-shaped synthetic data, AdamW; saved MB = what autograd keeps "
             "for the backward)\n\n" + markdown_table(["model", "impl", "ms/step", "img/s", "x eager", "saved MB"],
                                                       body))
    return rows, table
