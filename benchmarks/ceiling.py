"""python -m benchmarks.ceiling [--device cpu|cuda] [--only MODEL-SUBSTRING]

How fast could any implementation of each training-suite model train on this machine? The
ceiling is a step of the model's conditioner networks alone ("conditioners only":
training.conditioner_floor_step): the same networks, batch and fused AdamW, fed fixed tensors of
the shapes log_prob feeds them, with every flow op taken out. It is timed eager and compiled (one
torch.compile graph for all the conditioners' forward, AOTAutograd's backward); the faster of the
two is the ceiling, and the table states the most any implementation could gain over eager and
over the best peer.

The implementations are timed in turn within each round (common.interleaved_medians). Writes
runs/bench/ceiling-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import sys

import torch

import flowkern

from . import training
from .common import Row, describe_machine, interleaved_medians, machine, markdown_table, run_and_write

EAGER_FLOOR, COMPILED_FLOOR = training.FLOOR, training.FLOOR_COMPILED


def ceiling_suite(device: str, budget_s: float, only: str = "") -> tuple[list[Row], str]:
    cfgs = [c for c in training.configs(device, quick=True) if only in c.name]
    images, source = training.load_images(max(c.batch for c in cfgs), None)
    rows, body = [], []
    for cfg in cfgs:
        x = training.model_input(cfg, images, device)
        fns = {}
        for impl, model in training._initialised_models(device, cfg, x, with_compile=False):
            if impl.name not in ("eager", "flowkern") and impl.peer is None:
                continue
            step = training.training_step(model, x, device)
            with flowkern.backend(impl.backend):
                step()
            fns[impl.name] = (step, impl.backend)
        fns.update(training.floor_steps(cfg, device, x, compiled=True))
        t = interleaved_medians(fns, device, budget_s, warmup=1, max_turns=40)
        peers = {p: t[p] for p in cfg.peers if p in t}
        best_peer = min(peers, key=peers.get) if peers else None
        ceiling = min(t[EAGER_FLOOR], t[COMPILED_FLOOR])
        extra = {name: sec * 1e3 for name, sec in t.items()}
        extra.update(best_peer=best_peer, ceiling_vs_eager=t["eager"] / ceiling,
                     ceiling_vs_best_peer=None if best_peer is None else t[best_peer] / ceiling,
                     flowkern_vs_eager=t["eager"] / t["flowkern"] if "flowkern" in t else None, data=source)
        rows.append(Row("ceiling", cfg.name, "all", ceiling * 1e6, extra))
        body.append([cfg.name, t["eager"] * 1e3, t["flowkern"] * 1e3 if "flowkern" in t else "-",
                     "-" if best_peer is None else f"{t[best_peer] * 1e3:.1f} ({best_peer})",
                     t[EAGER_FLOOR] * 1e3, t[COMPILED_FLOOR] * 1e3, t["eager"] / ceiling,
                     "-" if best_peer is None else t[best_peer] / ceiling])
    table = (f"### The ceiling of a training step: its conditioners alone ({source})\n\n"
             "ms per step (forward, backward, fused AdamW). The ceiling is the faster of the two "
             "conditioners-only steps; 'ceiling x' = the most any implementation could run faster than "
             "eager or than the best peer.\n\n"
             + markdown_table(["model", "eager ms", "flowkern ms", "best peer ms", "conditioners only ms",
                               "compiled ms", "ceiling x eager", "ceiling x best peer"], body))
    return rows, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--only", default="", metavar="TEXT", help="only the models whose name contains TEXT")
    p.add_argument("--budget", type=float, default=2.0, metavar="S", help="timing seconds per implementation")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    info = machine(args.device)
    print(f"# training-step ceilings on {describe_machine(info)}\n", flush=True)
    names = [c.name for c in training.configs(args.device, quick=True)]
    if not any(args.only in n for n in names):
        p.error(f"--only {args.only!r} matches none of the models: {', '.join(names)}")
    return run_and_write(f"ceiling-{args.device}", info, lambda: ceiling_suite(args.device, args.budget, args.only))


if __name__ == "__main__":
    sys.exit(main())
