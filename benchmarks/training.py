"""End-to-end: a full training step (forward, backward, AdamW) and sampling, in img/s, with
the memory a step takes, for models.RealNVP (affine and spline couplings) and models.Glow.

Every implementation builds the same model in one place (build_model): flowkern on each of its
backends here, the eager reference, torch.compile(reference), and the peers (nflows, zuko,
normflows; benchmarks/peers.py) where they have the architecture. All train on the same batch:
MNIST from --root when it is there, else MNIST-shaped synthetic digits (load_images), and the
tables say which.
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import flowkern
from flowkern import data as fkdata
from flowkern.models import Glow, RealNVP

from . import common
from .common import Row, interleaved_medians, markdown_table, sync
from .kernels import saved_bytes
from .peers import GLOW_PEERS, PEERS

# The peers' own warnings, once per model, about nothing this benchmark can change.
warnings.filterwarnings("ignore", message="Inputs to the softmax are not scaled down")
warnings.filterwarnings("ignore", message=r"torch\.lu is deprecated")

ALPHA = 1e-6  # logit-space squeeze of the dequantized pixels, as in RealNVP
IMAGE_SHAPE = (1, 28, 28)


# ------------------------------------------------------------------------------------- data

@functools.lru_cache(maxsize=4)
def load_images(n: int, root: Optional[str] = None) -> tuple[torch.Tensor, str]:
    """(the first n training images, uint8 (n, 1, 28, 28); what they are, for the tables).

    root: a folder holding MNIST as `flowkern train --data mnist --root DIR` finds it
    (DIR/MNIST/raw/ or DIR itself) or as --data idx:DIR takes it; without one, or when it
    holds no MNIST, flowkern.data.synthetic_digits (the same images in every run)."""
    why = ""
    if root is not None:
        for spec in ("mnist", f"idx:{root}"):
            try:
                images = fkdata.load(spec, root=root).train
            except (fkdata.MissingDataset, fkdata.DataError, OSError) as e:
                why = str(e).splitlines()[0]
                continue
            if tuple(images.shape[1:]) == IMAGE_SHAPE and len(images) >= n:
                return images[:n].contiguous(), f"MNIST from {root}"
            why = f"{root}: images {tuple(images.shape)}, need {n} of {IMAGE_SHAPE}"
    desc = "MNIST-shaped synthetic digits (flowkern.data.synthetic_digits)"
    return fkdata.synthetic_digits(n), desc + (f"; no usable MNIST under --root ({why})" if root else "")


def logits(pixels: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """uint8 pixels dequantized with fixed noise and logit-transformed (float32): the input of
    the models built without their dequantize layer (and of the peers)."""
    g = torch.Generator().manual_seed(seed)
    x = (pixels.double() + torch.rand(pixels.shape, generator=g, dtype=torch.float64)) / 256.0
    x = ALPHA + (1 - 2 * ALPHA) * x
    return torch.log(x / (1 - x)).float()


def mnist_like_pixels(batch: int, device: str, seed: int = 0) -> torch.Tensor:
    """uint8 (batch, 784) synthetic digits (for scripts profiling a step)."""
    return fkdata.synthetic_digits(batch, seed=seed).reshape(batch, 784).to(device)


def mnist_like_batch(batch: int, device: str, seed: int = 0) -> torch.Tensor:
    """mnist_like_pixels dequantized and logit-transformed (float32)."""
    return logits(mnist_like_pixels(batch, "cpu", seed), seed + 1).to(device)


# ------------------------------------------------------------------------------------ models

@dataclass(frozen=True)
class Config:
    """One model and batch. RealNVP: `layers` couplings; with a norm it takes uint8 pixels through
    its fused dequantize layer (flowkern only: the peers have no such layer), else logits.
    Glow: `levels` levels of `layers` steps, on logits (1, 28, 28). compile: whether the
    torch.compile implementations run (inductor takes ~30 s to build Glow on this CPU)."""
    model: str
    coupling: str = "affine"
    norm: Optional[str] = None
    layers: int = 8
    hidden: int = 512
    batch: int = 256
    levels: int = 2
    compile: bool = True

    @property
    def pixels(self) -> bool:
        return self.model == "realnvp" and self.norm is not None

    @property
    def peers(self) -> dict:
        if self.model == "glow":
            return GLOW_PEERS
        return {} if self.norm is not None else PEERS

    @property
    def name(self) -> str:
        if self.model == "glow":
            return f"Glow {self.levels}x{self.layers} steps H={self.hidden} B={self.batch}"
        norm = f"+{self.norm} (uint8 in)" if self.norm else ""
        return f"RealNVP {self.coupling}{norm} L={self.layers} H={self.hidden} B={self.batch}"


# The spline conditioner's output is 23x wider and Glow is convolution-bound on a CPU, so quick
# mode trains smaller ones, and compiles only the hidden-512 affine, the spline and the
# actnorm RealNVPs (inductor takes 5 to 30 s per model here). The affine model runs at two
# widths: at hidden 512 its matmuls are ~85% of a step, the same in every implementation; at 128
# about 70% (the 'conditioners only' row measures it).
CONFIGS = {
    "quick": [Config("realnvp", "affine", None, 8, 512, 256), Config("realnvp", "affine", None, 8, 128, 256, compile=False),
              Config("realnvp", "spline", None, 4, 256, 128),
              Config("realnvp", "affine", "actnorm", 8, 128, 256),
              Config("glow", layers=2, hidden=32, batch=32, compile=False)],
    "full": [Config("realnvp", "affine", None, 8, 512, 256), Config("realnvp", "affine", "actnorm", 8, 512, 256),
             Config("realnvp", "affine", "actnorm", 8, 128, 256), Config("realnvp", "affine", "batchnorm", 8, 128, 256),
             Config("realnvp", "spline", None, 8, 512, 256), Config("glow", layers=8, hidden=128, batch=64)],
}
CUDA_CONFIGS = {  # a GPU needs bigger batches to be busy
    "quick": [Config("realnvp", "affine", None, 8, 512, 1024), Config("realnvp", "spline", None, 8, 512, 1024),
              Config("realnvp", "affine", "actnorm", 8, 512, 1024),
              Config("glow", layers=8, hidden=128, batch=256, compile=False)],
}


def configs(device: str, quick: bool) -> list[Config]:
    mode = "quick" if quick else "full"
    return CUDA_CONFIGS.get(mode, CONFIGS[mode]) if device == "cuda" else CONFIGS[mode]


@dataclass(frozen=True)
class Impl:
    name: str
    backend: str = "reference"  # the flowkern backend it runs under
    compile: bool = False
    peer: Optional[Callable] = None


def implementations(device: str, cfg: Config, with_compile: bool = True) -> list[Impl]:
    """Eager and compiled reference, flowkern on every kernel backend for this device (and
    compiled), then the peers that have this model."""
    avail = flowkern.available_backends()
    native = "cpu" if device == "cpu" else "cuda"
    with_compile = with_compile and cfg.compile and common.COMPILE
    impls = [Impl("eager")] + ([Impl("compile", compile=True)] if with_compile else [])
    if native in avail:
        impls.append(Impl("flowkern", native))
        if with_compile:
            impls.append(Impl("flowkern+compile", native, True))
    if device == "cuda" and "triton" in avail:
        impls.append(Impl("flowkern-triton", "triton"))
    return impls + [Impl(name, peer=builder) for name, builder in cfg.peers.items()]


def build_model(impl: Impl, cfg: Config, device: str) -> Optional[torch.nn.Module]:
    """The model of `cfg` as `impl` builds it (None: the peer is not installed)."""
    torch.manual_seed(0)
    if impl.peer is not None:
        if cfg.model == "glow":
            model = impl.peer(IMAGE_SHAPE, cfg.levels, cfg.layers, cfg.hidden)
        else:
            model = impl.peer(784, cfg.layers, cfg.hidden, cfg.coupling)
    elif cfg.model == "glow":
        model = Glow(IMAGE_SHAPE, levels=cfg.levels, steps=cfg.layers, hidden=cfg.hidden, scale="sigmoid")
    else:
        # scale="sigmoid": the peers' coupling function (nflows' AffineCouplingTransform): the same model
        model = RealNVP(784, layers=cfg.layers, hidden=cfg.hidden, coupling=cfg.coupling, norm=cfg.norm,
                        dequantize=cfg.pixels, scale="sigmoid")
    return None if model is None else model.to(device)


def model_input(cfg: Config, images: torch.Tensor, device: str) -> torch.Tensor:
    """The batch every implementation of `cfg` trains on."""
    x = images[: cfg.batch]
    if not cfg.pixels:
        x = logits(x)
    return (x if cfg.model == "glow" else x.reshape(cfg.batch, 784)).to(device)


def _optimizer(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """AdamW, fused where this torch has the fused kernel for the device (the flowkern command's
    choice too), else foreach."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


FLOOR, FLOOR_COMPILED = "conditioners only", "conditioners only, compiled"


def conditioner_floor_step(model: torch.nn.Module, x: torch.Tensor,
                           compile: bool = False) -> Optional[Callable[[], None]]:
    """A training step of `model`'s coupling conditioners alone (None when it has no coupling):
    the same networks and fused AdamW, fed what they are fed in model.log_prob(x) (shapes, and
    whether the input needs a gradient) as fixed tensors, with fixed output gradients, and every
    flow op (the couplings' transforms, norms, permutations, 1x1 convolutions, the likelihood)
    taken out. Every implementation of the model runs these networks, so none steps faster than
    this with torch's own matmuls and convolutions on the machine: its img/s is the ceiling of
    every "x eager" and "x best peer" ratio.

    compile: run the conditioners' forward (and so, through AOTAutograd, their backward) as one
    torch.compile graph, the ceiling of a compiled implementation (python -m benchmarks.ceiling
    compares the two).
    """
    from flowkern.nn.coupling import _Coupling

    nets = [m.conditioner for m in model.modules() if isinstance(m, _Coupling)]
    if not nets:
        return None
    seen = []
    hooks = [net.register_forward_hook(
        lambda net, args, out: seen.append((net, args[0].shape, args[0].requires_grad, out.shape))) for net in nets]
    try:
        model.log_prob(x)
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(0)
    calls = [(net, torch.randn(shape, generator=g).to(x.device).requires_grad_(needs_grad),
              torch.randn(out_shape, generator=g).to(x.device)) for net, shape, needs_grad, out_shape in seen]
    opt = _optimizer(torch.nn.ModuleList(nets), x.device.type)

    def forward():
        return [net(v) for net, v, _ in calls]

    if compile:
        forward = torch.compile(forward, dynamic=False)

    def step():
        opt.zero_grad(set_to_none=True)
        for _, v, _ in calls:
            v.grad = None  # the input gradients are computed, as a flow's are, not accumulated
        torch.autograd.backward(forward(), [grad for _, _, grad in calls])
        opt.step()
    return step


def floor_steps(cfg: Config, device: str, x: torch.Tensor, compiled: bool) -> dict[str, tuple[Callable, str]]:
    """{FLOOR: (step, backend)} of cfg's model, and FLOOR_COMPILED too when `compiled`, each run once
    (compiled, warm); {} for a model without couplings."""
    steps = {}
    for name, compile_floor in ((FLOOR, False), (FLOOR_COMPILED, True)):
        if compile_floor and not compiled:
            continue
        floor = conditioner_floor_step(build_model(Impl("eager"), cfg, device), x, compile=compile_floor)
        if floor is not None:
            floor()  # compiles
            steps[name] = (floor, "reference")
    return steps


def training_step(model: torch.nn.Module, x: torch.Tensor, device: str, compile: bool = False) -> Callable:
    """The step every implementation is timed on: zero_grad, -log_prob(x).mean() (with compile,
    one fullgraph torch.compile graph), backward, fused AdamW; it returns the loss."""
    opt = _optimizer(model, device)

    def loss_fn(v):
        return -model.log_prob(v).mean()

    step_loss = torch.compile(loss_fn, fullgraph=True, dynamic=False) if compile else loss_fn

    def step():
        opt.zero_grad(set_to_none=True)
        loss = step_loss(x)
        loss.backward()
        opt.step()
        return loss
    return step


# ---------------------------------------------------------------------------------- measuring

class _LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while the mode is on and still alive; `peak` is the
    most at once. Sees the output of every op (kernel-internal scratch is not a tensor it sees)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)  # storages keep their Python object while alive
                if key not in self._refs:
                    n = storage.nbytes()
                    self._refs[key] = weakref.ref(storage, lambda _, key=key, n=n: self._freed(key, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def step_peak_bytes(step: Callable[[], object], device: str) -> Optional[int]:
    """The most tensor bytes live at once during step() beyond those live before it (the
    model, optimizer state and batch): CUDA from the caching allocator's statistics, CPU by
    following every op's output (None when the step cannot run under a dispatch mode:
    torch.compile refuses them)."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    try:
        with _LiveTensorBytes() as mode:
            step()
    except Exception:  # noqa: BLE001 - a compiled step under a dispatch mode: a missing number
        return None
    return mode.peak


def _time_interleaved(fns: dict[str, tuple[Callable, str]], device: str, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each (already warm) fn, interleaved: common.interleaved_medians."""
    return interleaved_medians(fns, device, budget_s, warmup=0, max_turns=40)


def _ratios(times: dict[str, float], peers: dict) -> tuple[dict[str, float], Optional[float]]:
    best_peer = min((times[p] for p in peers if p in times), default=None)
    return {name: times["eager"] / sec for name, sec in times.items()}, best_peer


def _mb(nbytes: Optional[float]) -> object:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


# ------------------------------------------------------------------------------------- suites

def _initialised_models(device: str, cfg: Config, x: torch.Tensor, with_compile: bool = True):
    """(impl, model) for every implementation that builds cfg's model, each with ActNorm's
    data-dependent initialisation run eagerly on x (as a trained model has it)."""
    for impl in implementations(device, cfg, with_compile=with_compile):
        model = build_model(impl, cfg, device)
        if model is None:
            continue
        with torch.no_grad(), flowkern.backend(impl.backend):
            model.log_prob(x)
        yield impl, model


def train_suite(device: str, quick: bool, budget_s: float, root: Optional[str] = None) -> tuple[list[Row], str]:
    """img/s of a full training step, bytes autograd saves, peak bytes of a step."""
    cfgs = configs(device, quick)
    images, source = load_images(max(c.batch for c in cfgs), root)
    rows, body, skipped = [], [], []
    for cfg in cfgs:
        x = model_input(cfg, images, device)
        steps, saved, peak, compiled = {}, {}, {}, set()
        for impl, model in _initialised_models(device, cfg, x):
            step = training_step(model, x, device, compile=impl.compile)
            with flowkern.backend(impl.backend):
                try:
                    loss = float(step().detach())  # compile / warm up outside the timing
                except Exception as e:  # noqa: BLE001 - no C++ compiler for inductor, say
                    if not impl.compile:
                        raise
                    skipped.append(f"{impl.name} on {cfg.name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                if not math.isfinite(loss):
                    raise RuntimeError(f"{impl.name} on {cfg.name}: non-finite loss {loss}")
                saved[impl.name] = None if impl.compile else saved_bytes(lambda: -model.log_prob(x).mean())
                # On the CPU a compiled step cannot run under the dispatch mode that follows the bytes.
                peak[impl.name] = None if impl.compile and device != "cuda" else step_peak_bytes(step, device)
            steps[impl.name] = (step, impl.backend)
            if impl.compile:
                compiled.add(impl.name)
        # The ceilings: eager, and compiled where compiled implementations run (their flow ms
        # is measured from it).
        for name, floor in floor_steps(cfg, device, x, compiled=bool(compiled)).items():
            steps[name], saved[name], peak[name] = floor, None, None
        times = _time_interleaved(steps, device, budget_s * (1 if quick else 2))
        vs_eager, best_peer = _ratios(times, cfg.peers)
        for name, sec in times.items():
            vs_peer = None if best_peer is None else best_peer / sec
            floor_s = times.get(FLOOR_COMPILED if name in compiled else FLOOR)
            flow_ms = None if floor_s is None or name in (FLOOR, FLOOR_COMPILED) else (sec - floor_s) * 1e3
            rows.append(Row("train", cfg.name, name, sec * 1e6,
                            {"img/s": cfg.batch / sec, "vs_eager": vs_eager[name], "vs_best_peer": vs_peer,
                             "flow_ms": flow_ms, "saved_MB": None if saved[name] is None else saved[name] / 2**20,
                             "peak_MB": None if peak[name] is None else peak[name] / 2**20, "data": source}))
            body.append([cfg.name, name, sec * 1e3, cfg.batch / sec, vs_eager[name],
                         "-" if vs_peer is None else vs_peer, "-" if flow_ms is None else flow_ms,
                         _mb(saved[name]), _mb(peak[name])])
    peak_how = ("torch.cuda.max_memory_allocated" if device == "cuda" else
                "every op's output followed by a TorchDispatchMode; '-' under torch.compile, which refuses one")
    table = (f"### Training step: forward, backward, fused AdamW ({source})\n\n"
             "x eager = speed-up over the reference backend; x best peer = over the fastest of the peers "
             f"({', '.join(sorted(set(PEERS) | set(GLOW_PEERS)))}) building the same model, '-' where none has it; "
             "saved MB = tensors autograd keeps for the backward ('-' under torch.compile, whose graph keeps its "
             "own); peak MB = most tensor bytes live at once during one step beyond the model, optimizer state "
             f"and batch ({peak_how}). '{FLOOR}': the same conditioner networks, batch and AdamW "
             "stepping with no flow op, run by torch's own matmuls (and compiled, beside the compiled rows): "
             "the faster of the two is the ceiling of every implementation's img/s and ratios on this machine; "
             "flow ms = a step's time beyond the ceiling of its kind (the flow's own work).\n\n"
             + markdown_table(["model", "impl", "ms/step", "img/s", "x eager", "x best peer", "flow ms", "saved MB",
                               "peak MB"],
                              body))
    if skipped:
        table += "\n\nNot run: " + "; ".join(skipped)
    return rows, table


def sample_suite(device: str, quick: bool, budget_s: float, root: Optional[str] = None) -> tuple[list[Row], str]:
    """img/s of model.sample(batch): base draws and the inverse pass, without gradients."""
    cfgs = configs(device, quick)
    images, source = load_images(max(c.batch for c in cfgs), root)
    rows, body, skipped = [], [], []
    for cfg in cfgs:
        x = model_input(cfg, images, device)
        fns = {}
        # torch.compile of the inverse pass takes inductor 5 to 15 s per model here: --full only.
        for impl, model in _initialised_models(device, cfg, x, with_compile=not quick):

            def sample(model=model, n=cfg.batch):
                with torch.no_grad():
                    return model.sample(n)

            fn = torch.compile(sample, fullgraph=True, dynamic=False) if impl.compile else sample
            with flowkern.backend(impl.backend):
                try:
                    out = fn()  # compile / warm up outside the timing
                except Exception as e:  # noqa: BLE001
                    if not impl.compile:
                        raise
                    skipped.append(f"{impl.name} on {cfg.name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
            if out.shape[0] != cfg.batch or out.numel() != cfg.batch * 784:
                raise RuntimeError(f"{impl.name} on {cfg.name}: sample shape {tuple(out.shape)}")
            fns[impl.name] = (fn, impl.backend)
        times = _time_interleaved(fns, device, budget_s * (1 if quick else 2))
        vs_eager, best_peer = _ratios(times, cfg.peers)
        for name, sec in times.items():
            vs_peer = None if best_peer is None else best_peer / sec
            rows.append(Row("sample", cfg.name, name, sec * 1e6,
                            {"img/s": cfg.batch / sec, "vs_eager": vs_eager[name], "vs_best_peer": vs_peer}))
            body.append([cfg.name, name, sec * 1e3, cfg.batch / sec, vs_eager[name], "-" if vs_peer is None else vs_peer])
    table = ("### Sampling: model.sample(B), the inverse pass without gradients (untrained weights; pixel models "
             "end in their quantize layer)\n\nx eager = speed-up over the reference backend; x best peer = over "
             "the fastest peer's own sample(), '-' where none has the model"
             + ("; torch.compile rows with --full only" if quick else "") + ".\n\n"
             + markdown_table(["model", "impl", "ms/batch", "img/s", "x eager", "x best peer"], body))
    if skipped:
        table += "\n\nNot run: " + "; ".join(skipped)
    return rows, table


# The suite's former name (README, scripts).
realnvp_train_suite = train_suite
