"""End-to-end: img/s of a full RealNVP training step (forward, backward, AdamW) on
MNIST-shaped data, for each implementation, same model, data and batch."""
from __future__ import annotations

import math

import torch

import flowkern
from flowkern.models import RealNVP

from .common import Row, markdown_table, median_time

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


def realnvp_train_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    batch, layers, hidden = 256, 8, 512
    x = mnist_like_batch(batch, device)
    configs = [("eager", "reference", False), ("compile", "reference", True), ("flowkern", "auto", False),
               ("flowkern+compile", "auto", True)]
    rows, body, times = [], [], {}
    for name, backend, use_compile in configs:
        torch.manual_seed(0)
        model = RealNVP(784, layers=layers, hidden=hidden, coupling="affine").to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def loss_fn(v):
            return -model.log_prob(v).mean()

        step_loss = torch.compile(loss_fn, fullgraph=True, dynamic=False) if use_compile else loss_fn

        def step():
            opt.zero_grad(set_to_none=True)
            loss = step_loss(x)
            loss.backward()
            opt.step()
            return loss

        with flowkern.backend(backend):
            step()  # compile / warm up outside the timing
            sec = median_time(step, device, budget_s * 6, min_reps=5, max_reps=50)
            loss = float(step().detach())
        if not math.isfinite(loss):
            raise RuntimeError(f"{name}: non-finite loss {loss}")
        times[name] = sec
        rows.append(Row("realnvp_train", f"affine L={layers} H={hidden} B={batch}", name, sec * 1e6,
                        {"img/s": batch / sec}))
    for r in rows:
        r.extra["vs_eager"] = times["eager"] * 1e6 / r.median_us
        body.append([r.impl, r.median_us / 1e3, r.extra["img/s"], r.extra["vs_eager"]])
    table = (f"### RealNVP training step (affine couplings, {layers} layers, hidden {hidden}, batch {batch}, "
             "MNIST-shaped synthetic data, AdamW)\n\n"
             + markdown_table(["impl", "ms/step", "img/s", "x eager"], body))
    return rows, table
