"""python -m benchmarks.scale_defaults [--steps N] [--seeds K] [--root DIR]: which affine scale
function to default to. Trains the same flow with scale = "sigmoid", "exp" and "tanh" on
low-dimensional densities generated here (two moons, a 10-D Gaussian mixture, a 10-D funnel)
and on MNIST (with --root; else MNIST-shaped synthetic digits), and prints the held-out
negative log-likelihood of each (nats per point; bits/dim for images). The table in
docs/defaults.md came from this script.

Models: RealNVP affine couplings (8 layers, hidden 64; images: 6 layers, hidden 256, dequantize)
and MAF (5 layers, hidden 50) for the low-dimensional sets. Adam, lr 1e-3, batch 256 (images:
64), `steps` steps, gradients clipped at norm 10; a run that goes non-finite is reported as
diverged."""
from __future__ import annotations

import argparse
import math
import time

import torch

from flowkern import models

SCALES = ("sigmoid", "exp", "tanh")


def two_moons(n: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.rand(n, generator=gen) * math.pi
    upper = torch.rand(n, generator=gen) < 0.5
    x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x, y], 1) + 0.08 * torch.randn(n, 2, generator=gen)
    return (pts - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])  # about unit scale


def mixture10(n: int, gen: torch.Generator) -> torch.Tensor:
    means = torch.randn(4, 10, generator=torch.Generator().manual_seed(123)) * 2.0
    k = torch.randint(0, 4, (n,), generator=gen)
    return means[k] + 0.5 * torch.randn(n, 10, generator=gen)


def funnel10(n: int, gen: torch.Generator) -> torch.Tensor:
    v = 1.5 * torch.randn(n, 1, generator=gen)  # Neal's funnel, milder: scale of the rest exp(v / 2)
    return torch.cat([v, torch.randn(n, 9, generator=gen) * torch.exp(v / 2)], 1)


DATASETS = {"two moons (2-D)": two_moons, "mixture (10-D)": mixture10, "funnel (10-D)": funnel10}


def train(model, batches, steps: int, lr: float = 1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(steps):
        x = batches(i)
        loss = -model.log_prob(x).mean()
        if not torch.isfinite(loss):
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    return True


def lowdim_rows(steps: int, seeds: int):
    rows = []
    for dname, sample in DATASETS.items():
        for mname in ("RealNVP", "MAF"):
            for scale in SCALES:
                nll = []
                for seed in range(seeds):
                    torch.manual_seed(seed)
                    gen = torch.Generator().manual_seed(1000 + seed)
                    test = sample(5000, torch.Generator().manual_seed(99))
                    d = test.shape[1]
                    model = (models.RealNVP(d, 8, 64, "affine", scale=scale) if mname == "RealNVP"
                             else models.MAF(d, layers=5, hidden=50, scale=scale))
                    ok = train(model, lambda i: sample(256, gen), steps)
                    with torch.no_grad():
                        v = -model.log_prob(test).mean().item() if ok else math.nan
                    nll.append(v if math.isfinite(v) else math.nan)
                rows.append((dname, mname, scale, nll))
                print(dname, mname, scale, [f"{v:.3f}" for v in nll], flush=True)
    return rows


def mnist_rows(steps: int, seeds: int, root):
    from flowkern import data as fkdata

    from .training import load_images

    try:  # a folder with one IDX image file (e.g. MNIST's 10,000 test images) as --data idx:FILE takes it
        import glob

        files = sorted(glob.glob(f"{root}/*images-idx3-ubyte*")) if root else []
        images = fkdata.load(f"idx:{files[0]}").train
        desc = f"MNIST {files[0].rsplit('/', 1)[-1]}"
    except (IndexError, fkdata.MissingDataset, fkdata.DataError, OSError):
        images, desc = load_images(10000, root)
    images = images[:10000]
    flat = images.reshape(len(images), -1)
    split = len(flat) * 9 // 10
    train_x, test_x = flat[:split], flat[split:]
    rows = []
    for scale in SCALES:
        bpd = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = models.RealNVP(784, 6, 256, "affine", scale=scale, dequantize=True)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            ok = True
            for _ in range(steps):
                x = train_x[torch.randint(0, len(train_x), (64,), generator=gen)]
                loss = model.bits_per_dim(x).mean()
                if not torch.isfinite(loss):
                    ok = False
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
            with torch.no_grad():
                v = model.bits_per_dim(test_x).mean().item() if ok else math.nan
            bpd.append(v if math.isfinite(v) else math.nan)
        rows.append((f"MNIST ({desc.split(';')[0]})", "RealNVP", scale, bpd))
        print("MNIST", scale, [f"{v:.3f}" for v in bpd], flush=True)
    return rows


def table(rows) -> str:
    out = ["| data | model | " + " | ".join(SCALES) + " |", "|---|---|" + "---|" * len(SCALES)]
    groups = {}
    for dname, mname, scale, vals in rows:
        groups.setdefault((dname, mname), {})[scale] = vals
    for (dname, mname), by_scale in groups.items():
        cells = []
        finite = {s: [v for v in vals if math.isfinite(v)] for s, vals in by_scale.items()}
        best = min((sum(v) / len(v) for v in finite.values() if v and len(v) == len(by_scale[next(iter(by_scale))])),
                   default=None)
        for s in SCALES:
            vals = by_scale.get(s, [])
            fin = finite.get(s, [])
            if not fin:
                cells.append("diverged")
                continue
            mean = sum(fin) / len(fin)
            spread = f" ± {(max(fin) - min(fin)) / 2:.3f}" if len(fin) > 1 else ""
            div = f" ({len(vals) - len(fin)} of {len(vals)} diverged)" if len(fin) < len(vals) else ""
            mark = "**" if best is not None and abs(mean - best) < 1e-12 else ""
            cells.append(f"{mark}{mean:.3f}{mark}{spread}{div}")
        out.append(f"| {dname} | {mname} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_defaults", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="training steps per low-dimensional run")
    p.add_argument("--image-steps", type=int, default=300, help="training steps per MNIST run")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--root", default=None, help="a folder holding MNIST (see python -m benchmarks --help)")
    p.add_argument("--no-images", action="store_true")
    p.add_argument("--images-only", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (small models: 1 is as fast)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = [] if args.images_only else lowdim_rows(args.steps, args.seeds)
    if not args.no_images:
        rows += mnist_rows(args.image_steps, args.seeds, args.root)
    print(f"\nheld-out NLL (nats per point; MNIST: bits/dim), mean over {args.seeds} seeds ± half the range; "
          f"{args.steps} steps ({args.image_steps} for MNIST); lower is better, best in bold\n")
    print(table(rows))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
