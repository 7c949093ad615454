"""python -m benchmarks.memory_saving [--quick | --full] [--device cpu|cuda] [--depths 8,16,32,64]

Memory-saving backprop (Flow(..., memory_saving=True)) against standard backprop and against
nflows at the same depth: peak memory and time of one training step (forward + backward of
-log_prob(x).mean()) of a RealNVP affine flow on MNIST-shaped data (784 features).

Memory, per step:
  saved    the bytes autograd saves for the backward pass (distinct tensors, through
           torch.autograd.graph.saved_tensors_hooks as benchmarks.kernels.saved_bytes does),
           less the parameters that ops save (a Linear saves its weight, which is held
           anyway): activation memory.
  peak     CUDA: torch.cuda.max_memory_allocated during the step minus what was allocated
           before it. CPU: the peak of the live bytes of the tensors created during the step,
           tracked by a TorchDispatchMode (every op's outputs, released when their storage
           dies), so activations, gradients and transients, but not parameters or inputs.
Time: the median of the whole step (zero_grad, forward, backward), the implementations timed in
turn within each round, so that a change of load on the machine hits them alike.

Writes runs/bench/memory_saving-<device>.json and .md. The suite function
memory_saving_suite(device, quick, budget_s) -> (rows, table) follows benchmarks/__main__.py's
suite signature.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .common import Row, describe_machine, machine, markdown_table, run_and_write, sync
from .peers import nflows_realnvp

FEATURES = 784


class LiveBytes(TorchDispatchMode):
    """Peak live bytes of the storages created by ops while the mode is on.

    A storage counts from the op that returns it until it is freed (a weak reference to it
    expires); views and in-place results of a counted storage are not counted again."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict = {}  # storage cdata -> (weak ref, bytes)
        self.current = self.peak = 0
        self._calls = 0

    def _prune(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._prune()
        # Views and in-place results share an input's storage: not a new allocation (and an
        # input made outside the step, a parameter say, is not the step's memory).
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata in inputs:
                    continue
                ref = self._ref(storage)
                if ref.cdata not in self.live:
                    nbytes = storage.nbytes()
                    self.live[ref.cdata] = (ref, nbytes)
                    self.current += nbytes
        self.peak = max(self.peak, self.current)
        return out


def saved_activation_bytes(fn: Callable[[], object], exclude) -> int:
    """Bytes of the distinct tensors autograd saves while fn() runs, less those whose storage is
    one of `exclude`'s (the parameters)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[(storage.data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def interleaved_times(steps: dict, device: str, budget_s: float, min_reps: int = 5) -> dict:
    """Median seconds per call of each step, the steps called in turn in every round."""
    for step in steps.values():
        step()
    sync(device)
    t0 = time.perf_counter()
    for step in steps.values():
        step()
    sync(device)
    reps = max(min_reps, int(budget_s * len(steps) / max(time.perf_counter() - t0, 1e-6)))
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_step_bytes(step: Callable[[], object], device: str) -> int:
    """Peak memory of one call of step() beyond what was allocated before it (see the docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveBytes() as mode:
        step()
    return mode.peak


def _models(depth: int, hidden: int, device: str) -> dict:
    """The implementations compared at one depth: name -> (model, log_prob(x))."""
    from flowkern.models import RealNVP

    torch.manual_seed(0)
    base = RealNVP(FEATURES, depth, hidden, "affine", scale="sigmoid")  # nflows' scale: the peer's model
    with torch.no_grad():  # off the identity, so inverses do real work
        for layer in base.couplings:
            layer.conditioner[-1].weight.normal_(0.0, 0.01)
    saving = RealNVP(FEATURES, depth, hidden, "affine", scale="sigmoid", memory_saving=True)
    saving.load_state_dict(base.state_dict())
    out = {"standard": base.to(device), "memory_saving": saving.to(device)}
    peer = nflows_realnvp(FEATURES, depth, hidden, "affine")
    if peer is not None:
        out["nflows"] = peer.to(device)
    return out


def _step(model, x: torch.Tensor) -> Callable[[], None]:
    def step():
        for p in model.parameters():
            p.grad = None
        (-model.log_prob(x).mean()).backward()
    return step


def memory_saving_suite(device: str, quick: bool, budget_s: float,
                        depths: Optional[list] = None) -> tuple[list[Row], str]:
    depths = depths or [8, 16, 32, 64]
    hidden, batch = (128, 256) if quick else (512, 256)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, FEATURES, generator=gen).to(device) * 4 - 2
    rows, body = [], []
    for depth in depths:
        models = _models(depth, hidden, device)
        steps = {name: _step(model, x) for name, model in models.items()}
        times = interleaved_times(steps, device, budget_s)
        std = None
        for name, model in models.items():
            params = list(model.parameters())
            saved = saved_activation_bytes(lambda m=model: m.log_prob(x), params)
            peak = peak_step_bytes(steps[name], device)
            grads = sum(p.numel() * p.element_size() for p in params)
            t = times[name]
            std = std or (saved, peak, t)
            rows.append(Row("memory_saving", f"depth={depth} hidden={hidden} B={batch}", name, t * 1e6,
                            {"saved_MB": saved / 2**20, "peak_MB": peak / 2**20, "grads_MB": grads / 2**20}))
            body.append([depth, name, f"{saved / 2**20:.2f}", f"{peak / 2**20:.1f}", f"{grads / 2**20:.1f}",
                         f"{t * 1e3:.1f}", f"{saved / std[0]:.3f}", f"{peak / std[1]:.2f}", f"{t / std[2]:.2f}"])
        del models, steps
    peak_name = "peak step MB (max_memory_allocated)" if device == "cuda" else "peak step MB (live tensors)"
    header = ["depth", "impl", "activations saved MB", peak_name, "of which grads MB", "step ms",
              "saved / standard", "peak / standard", "time / standard"]
    table = (f"### Memory-saving backprop: RealNVP affine, {FEATURES} features, hidden {hidden}, batch {batch}, "
             f"float32, one training step (forward + backward)\n\n" + markdown_table(header, body))
    return rows, table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_saving", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="hidden 128, batch 256, short timings (default)")
    mode.add_argument("--full", action="store_true", help="hidden 512, batch 256, longer timings")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--depths", default="8,16,32,64", help="comma-separated depths (couplings)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    quick = not args.full
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    info = machine(args.device)
    print(f"# memory-saving backprop ({'quick' if quick else 'full'}) on {describe_machine(info)}\n", flush=True)
    return run_and_write(f"memory_saving-{args.device}", info,
                         lambda: memory_saving_suite(args.device, quick, 0.3 if quick else 1.0, depths))


if __name__ == "__main__":
    sys.exit(main())
