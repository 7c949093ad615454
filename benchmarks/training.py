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
from .peers import PEERS

ALPHA = 1e-6  # logit-space squeeze of the dequantized pixels, as in RealNVP


def mnist_like_pixels(batch: int, device: str, seed: int = 0) -> torch.Tensor:
    """uint8 (batch, 784) MNIST-shaped synthetic digits: a dark background with bright strokes
    in the middle, so the statistics resemble MNIST's."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centre = torch.exp(-((yy - 14) ** 2 + (xx - 14) ** 2) / 60.0)
    bright = torch.rand(batch, 28, 28, generator=g) < centre * 0.6
    pixels = torch.where(bright, torch.randint(128, 256, (batch, 28, 28), generator=g), 0)
    return pixels.to(torch.uint8).reshape(batch, 784).to(device)


def mnist_like_batch(batch: int, device: str, seed: int = 0) -> torch.Tensor:
    """mnist_like_pixels dequantized and logit-transformed (float32), for models that take
    real-valued data."""
    pixels = mnist_like_pixels(batch, "cpu", seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = (pixels.double() + torch.rand(pixels.shape, generator=g, dtype=torch.float64)) / 256.0
    x = ALPHA + (1 - 2 * ALPHA) * x
    return torch.log(x / (1 - x)).float().to(device)


# (coupling, norm, layers, hidden, batch) per mode. "pixels" models start with the fused
# dequantize + logit layer and take uint8 batches; the others take logits. The spline
# conditioner's output is 23x wider, so quick mode trains a smaller spline model.
CONFIGS = {
    "quick": [("affine", None, 8, 512, 256), ("affine", "actnorm", 8, 128, 256), ("spline", None, 4, 256, 128)],
    "full": [("affine", None, 8, 512, 256), ("affine", "actnorm", 8, 512, 256), ("affine", "actnorm", 8, 128, 256),
             ("affine", "batchnorm", 8, 128, 256), ("spline", None, 8, 512, 256)],
}


ROUNDS = 3  # implementations are timed in turn, ROUNDS times; each keeps its best round's median


def _optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has the fused kernel for the device (the flowkern command's
    choice too), else foreach."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def realnvp_train_suite(device: str, quick: bool, budget_s: float) -> tuple[list[Row], str]:
    impls = [("eager", "reference", False), ("compile", "reference", True), ("flowkern", "auto", False),
             ("flowkern+compile", "auto", True)]
    rows, body = [], []
    for coupling, norm, layers, hidden, batch in CONFIGS["quick" if quick else "full"]:
        pixels = norm is not None  # the normalised models train end to end from uint8 pixels
        x = mnist_like_pixels(batch, device) if pixels else mnist_like_batch(batch, device)
        case = f"{coupling}{'+' + norm + ' (uint8 in)' if norm else ''} L={layers} H={hidden} B={batch}"
        steps, saved = {}, {}
        # The peers build the same model (no norm layers, logits in): those configurations only.
        peers = [] if norm is not None else [(name, "reference", False) for name in PEERS]
        for name, backend, use_compile in impls + peers:
            torch.manual_seed(0)
            if name in PEERS:
                model = PEERS[name](784, layers, hidden, coupling)
                if model is None:
                    continue
                model = model.to(device)
            else:
                model = RealNVP(784, layers=layers, hidden=hidden, coupling=coupling, norm=norm,
                                dequantize=pixels).to(device)
            with torch.no_grad(), flowkern.backend(backend):
                model.log_prob(x)  # ActNorm's data-dependent initialisation, eagerly
            opt = _optimizer(model, device)

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
                loss = float(step().detach())  # compile / warm up outside the timing
                saved[name] = None if use_compile else saved_bytes(lambda: loss_fn(x)) / 2**20
            if not math.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss}")
            steps[name] = (step, backend)
        # In turn, several rounds: a slow spell of this shared machine hits every implementation
        # alike instead of whichever happened to run then.
        times = {name: float("inf") for name in steps}
        for _ in range(ROUNDS):
            for name, (step, backend) in steps.items():
                with flowkern.backend(backend):
                    times[name] = min(times[name], median_time(step, device, budget_s * 2, min_reps=3, max_reps=30))
        best_peer = min((times[p] for p in PEERS if p in times), default=None)
        for name, sec in times.items():
            vs_peer = None if best_peer is None else best_peer / sec
            rows.append(Row("realnvp_train", case, name, sec * 1e6,
                            {"img/s": batch / sec, "saved_MB": saved[name], "vs_eager": times["eager"] / sec,
                             "vs_best_peer": vs_peer}))
            body.append([case, name, sec * 1e3, batch / sec, times["eager"] / sec,
                         "-" if vs_peer is None else vs_peer, "-" if saved[name] is None else f"{saved[name]:.0f}"])
    table = ("### RealNVP training step (MNIST-shaped synthetic data, fused AdamW; x eager = speed-up over the "
             "reference backend; x best peer = over the fastest of nflows/zuko/normflows building the same model; saved MB = what autograd keeps for the backward)\n\n"
             + markdown_table(["model", "impl", "ms/step", "img/s", "x eager", "x best peer", "saved MB"], body))
    return rows, table
