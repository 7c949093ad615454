"""Training, evaluation, sampling and out-of-distribution scoring: the work behind `flowkern`.

    train(config)          maximum-likelihood training of a dequantized flow on 8-bit images,
                           one process or many (torchrun: DistributedDataParallel), with
                           checkpoints that resume exactly, metrics, sample grids
    evaluate(...)          held-out bits/dim of a checkpoint
    sample(...)            sample grids of a checkpoint
    ood(...)               per-sample bits/dim of an in- and an out-of-distribution set, the
                           AUROC of bits/dim as an OOD score, and a histogram of both

The objective is the per-sample bits/dim of Flow.bits_per_dim (uniform dequantization, the
Theis et al. bound), averaged over the batch: a scaled negative log-likelihood, so its
minimiser is the maximum-likelihood model, and the number on the progress bar is the one
papers report.

A run folder (--out) holds:
    config.json            every option and what it resolved to (device, model, data sizes)
    checkpoint.pt          the last good state: model (kind, constructor arguments, data shape,
                           weights and their sha256), optimizer, scheduler, step/epoch/batch,
                           every rank's RNG states, metrics so far; written atomically (temp
                           file + os.replace); read with torch.load(weights_only=True)
    metrics.jsonl/.csv     one row per --log-every steps and per evaluation: step, epoch,
                           train_bpd, test_bpd, img_per_s, lr, time_s, grad_norm
    samples_t{T}.png       final sample grids at temperatures T = 1.0, 0.7, 0.5
    samples/epoch_NNN_t{T}.png   the same after each epoch
    summary.json           the final numbers (and each rank's parameter hash)

Exact resume: the shuffle order is a function of (seed, epoch) (DistributedSampler), the
dequantization noise comes from torch's global RNG, whose state the checkpoint keeps per rank,
and evaluation and sampling draw from forked RNGs seeded apart from it, so training N steps
straight and N/2 + resume N/2 give the same parameters bit for bit (same device, process count
and thread count).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import flowkern

from . import data as fkdata

CHECKPOINT_FORMAT = "flowkern-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
TEMPERATURES = (1.0, 0.7, 0.5)
METRIC_FIELDS = ("step", "epoch", "train_bpd", "test_bpd", "img_per_s", "lr", "time_s", "grad_norm")
MODEL_KINDS = ("realnvp", "glow")
COUPLINGS = ("affine", "additive", "spline")
NORMS = ("actnorm", "batchnorm", "none")
SCALES = ("sigmoid", "exp", "tanh")
SCHEDULES = ("cosine", "constant")
# Evaluation noise and sample latents come from RNG streams seeded apart from training's, so
# evaluating or sampling never moves the training stream (exact resume) and the numbers of
# two evaluations of one model are comparable (same noise).
_EVAL_SEED = 1_000_003
_SAMPLE_SEED = 2_000_003
_RANK_SEED = 7_919

# The options of train(), with the command's defaults. Model options (the first block) shape
# the network and cannot change on --resume; the others can.
MODEL_OPTIONS = ("model", "coupling", "layers", "hidden", "norm", "levels", "scale", "alpha", "bins", "bound")
TRAIN_DEFAULTS: Dict[str, object] = {
    "model": "realnvp", "coupling": "affine", "layers": 8, "hidden": 512, "norm": "actnorm", "levels": 2,
    "scale": "tanh", "alpha": 1e-6, "bins": 8, "bound": 3.0, "dequantize": "uniform",
    "data": "mnist", "root": "data", "download": False, "holdout": None,
    "out": None, "steps": None, "epochs": None, "batch_size": 256, "lr": 1e-3, "warmup": 100,
    "schedule": "cosine", "weight_decay": 0.0, "clip": 1.0, "seed": 0,
    "backend": "auto", "device": "auto", "threads": None, "deterministic": False, "compile": False,
    "memory_saving": False,
    "eval_every": 0, "eval_batch_size": 1000, "eval_limit": None, "checkpoint_every": 0, "log_every": 100,
    "n_samples": 64, "resume": None, "overwrite": False, "stop_at": None, "time_limit": None, "quiet": False, "progress": None,
}
DEFAULT_EPOCHS = 10


DEQUANTIZE = ("uniform", "variational", "none")
NOT_DEQUANTIZED = (" This model trains on the raw integer pixels (--dequantize none): a continuous density on "
                   "256 discrete values per pixel can pile unbounded density onto them (a pixel that is always "
                   "0, like MNIST's border, first), so the loss and its gradients run off to infinity or NaN. "
                   "The data must be dequantized: train with --dequantize uniform (noise u ~ U[0, 1)) or "
                   "--dequantize variational (a learned q(u | x), Flow++).")


class UsageError(ValueError):
    """Options that cannot run together, or that do not fit the data or the checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not written by flowkern train."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stopped before the update."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# ------------------------------------------------------------------------------------ models


def model_spec(config: dict, shape: Sequence[int]) -> dict:
    """The constructor call of the model `config` asks for on images of `shape` (C, H, W):
    {"kind", "kwargs", "data_shape"}, everything a checkpoint needs to rebuild it."""
    kind = config["model"]
    c, h, w = (int(s) for s in shape)
    if kind not in MODEL_KINDS:
        raise UsageError(f"--model must be one of {MODEL_KINDS}, got {kind!r}")
    if config["coupling"] not in COUPLINGS:
        raise UsageError(f"--coupling must be one of {COUPLINGS}, got {config['coupling']!r}")
    if config["norm"] not in NORMS:
        raise UsageError(f"--norm must be one of {NORMS}, got {config['norm']!r}")
    if config.get("dequantize", "uniform") not in DEQUANTIZE:
        raise UsageError(f"--dequantize must be one of {DEQUANTIZE}, got {config['dequantize']!r}")
    # The models' argument: True (uniform; what checkpoints before --dequantize hold), "variational", False.
    dequantize = {"uniform": True, "variational": "variational", "none": False}[config.get("dequantize", "uniform")]
    if kind == "realnvp":
        kwargs = {"features": c * h * w, "layers": config["layers"], "hidden": config["hidden"],
                  "coupling": config["coupling"], "norm": None if config["norm"] == "none" else config["norm"],
                  "scale": config["scale"], "dequantize": dequantize, "alpha": config["alpha"]}
        if config["coupling"] == "spline":
            kwargs.update(bins=config["bins"], bound=config["bound"])
    else:
        if config["coupling"] != "affine":
            raise UsageError(f"--model glow uses affine couplings; --coupling {config['coupling']} "
                             "needs --model realnvp")
        if config["norm"] != "actnorm":
            raise UsageError(f"--model glow always uses actnorm; --norm {config['norm']} needs --model realnvp")
        kwargs = {"image_shape": [c, h, w], "levels": config["levels"], "steps": config["layers"],
                  "hidden": config["hidden"], "scale": config["scale"], "dequantize": dequantize, "alpha": config["alpha"]}
    return {"kind": kind, "kwargs": kwargs, "data_shape": [c, h, w]}


def build_model(spec: dict) -> flowkern.Flow:
    """The (untrained) model of a spec from model_spec() or a checkpoint."""
    from .models import Glow, RealNVP

    cls = {"realnvp": RealNVP, "glow": Glow}[spec["kind"]]
    return cls(**spec["kwargs"])


def describe_model(spec: dict, model: Optional[torch.nn.Module] = None) -> str:
    k = spec["kwargs"]
    if spec["kind"] == "realnvp":
        text = f"RealNVP({k['coupling']}, {k['layers']} layers, hidden {k['hidden']}, norm {k['norm']})"
    else:
        text = f"Glow({k['levels']} levels x {k['steps']} steps, hidden {k['hidden']})"
    deq = k.get("dequantize", True)
    text += ", " + {True: "uniform", "variational": "variational", False: "no"}[deq] + " dequantization"
    if model is not None:
        text += f", {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    return text


def model_input(pixels: torch.Tensor, spec: dict) -> torch.Tensor:
    """uint8 (B, C, H, W) images in the layout the model takes: RealNVP flattens them."""
    return pixels.flatten(1) if spec["kind"] == "realnvp" else pixels


def dequantizes(spec: dict) -> bool:
    """Whether the model starts with a dequantization layer (anything but --dequantize none)."""
    return spec["kwargs"].get("dequantize", True) is not False


def bits_per_dim(model: torch.nn.Module, spec: dict, pixels: torch.Tensor) -> torch.Tensor:
    """Per-sample bits/dim of uint8 images: Flow.bits_per_dim for a dequantizing model; for
    --dequantize none, -log_prob / (D ln 2) of the raw pixel values as real numbers (what the
    seed warns against: not a bound on anything, and unbounded below)."""
    x = model_input(pixels, spec)
    if dequantizes(spec):
        return model.bits_per_dim(x)
    return flowkern.nn.bits_per_dim(model.log_prob(x.float()), math.prod(spec["data_shape"]))


class _BitsPerDim(torch.nn.Module):
    """forward(x) = bits_per_dim(model, spec, x): the objective as a module call, so that
    DistributedDataParallel's forward hooks (gradient all-reduce) see it."""

    def __init__(self, model: torch.nn.Module, spec: dict):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return bits_per_dim(self.model, self.spec, pixels)


def param_hash(model: torch.nn.Module) -> str:
    """sha256 of every state-dict tensor (names, dtypes, shapes, bytes), in order."""
    return state_hash(model.state_dict())


def state_hash(state: dict) -> str:
    """param_hash of a state dict: also the checksum a checkpoint keeps of its weights."""
    h = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _has_uninitialized_actnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, flowkern.nn.ActNorm) and not bool(m.initialized) for m in model.modules())


# --------------------------------------------------------------------------- runtime and RNG


@dataclass
class Runtime:
    """Where this process runs: its device and its place among torchrun's processes."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    distributed: bool = False
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device auto|cpu|cuda (auto: CUDA when visible); under torchrun cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is visible (use --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")


def init_runtime(device: str = "auto") -> Runtime:
    """The device, and the process group when torchrun started us (WORLD_SIZE > 1): nccl on
    GPUs, gloo on CPUs."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(pick_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, dist.get_rank(), dist.get_world_size(), local, True, owns)


def _all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _all_gather(obj, rt: Runtime) -> list:
    if not rt.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * rt.world
    dist.all_gather_object(out, obj)
    return out


def _barrier(rt: Runtime) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier()


def _rank0_first(main: Callable, others: Callable, rt: Runtime):
    """main() on rank 0, then others() on the other ranks (e.g. download once, then read).
    An error on rank 0 is raised on every rank, so no rank waits forever."""
    if not rt.distributed:
        return main()
    import torch.distributed as dist

    result, failure, error = None, [None], None
    if rt.main:
        try:
            result = main()
        except Exception as e:
            error, failure = e, [(type(e).__name__, str(e))]
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        kind, message = failure[0]
        known = {"MissingDataset": fkdata.MissingDataset, "DataError": fkdata.DataError, "UsageError": UsageError}
        raise known.get(kind, RuntimeError)(message if kind in known else f"rank 0 failed: {kind}: {message}")
    return result if rt.main else others()


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's random and NumPy's global RNG."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """This process's RNG states, in types torch.load(weights_only=True) reads back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run a block on a private torch RNG stream seeded with `seed`; the global state is
    restored afterwards, as if the block never drew."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in path's folder (same extension); on success it replaces `path`
    in one os.replace, so a reader sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_file(path: str, flag: str) -> None:
    """An output file's path must not be a folder, nor lie under a file (checked before any work)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: name a file")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")


def check_output_folder(path: str, flag: str) -> None:
    """An output folder's path must not be a file (checked before any work)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a folder")
    check_output_file(os.path.join(path, "x"), flag)


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")


def save_checkpoint(path: str, payload: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by train(), on the CPU. Raises CheckpointError otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, a pickle that is not weights-only, ...
        detail = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]
        raise CheckpointError(f"{path} is not a readable flowkern checkpoint ({type(e).__name__}: {detail})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a flowkern checkpoint (not written by `flowkern train`)")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt['version']}; this flowkern reads up to "
                              f"{CHECKPOINT_VERSION}: upgrade flowkern")
    _check_fields(ckpt, path)
    ckpt["path"] = os.path.abspath(path)
    return ckpt


# What the readers of a checkpoint index into, with its type: a file edited or damaged into
# another shape is refused here, with its name, rather than as a KeyError deep in a resume.
_CHECKPOINT_FIELDS = {"model": dict, "model_state": dict, "optimizer_state": dict, "scheduler_state": dict,
                      "step": int, "epoch": int, "batch_in_epoch": int, "rng": list}


def _check_fields(ckpt: dict, path: str) -> None:
    for key, kind in _CHECKPOINT_FIELDS.items():
        value = ckpt.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "missing" if key not in ckpt else f"a {type(value).__name__}"
            raise CheckpointError(f"{path} is damaged: its {key!r} is {what}, not of type {kind.__name__}")
    spec = ckpt["model"]
    if (spec.get("kind") not in MODEL_KINDS or not isinstance(spec.get("kwargs"), dict)
            or not isinstance(spec.get("data_shape"), (list, tuple)) or len(spec["data_shape"]) != 3):
        raise CheckpointError(f"{path} is damaged: its model {str(spec)[:200]} is not one flowkern train writes")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model_state"].items()):
        raise CheckpointError(f"{path} is damaged: its model_state holds something other than named tensors")
    digest = ckpt.get("model_sha256")  # absent in checkpoints written before it was kept
    if digest is not None and state_hash(ckpt["model_state"]) != digest:
        raise CheckpointError(f"{path} is damaged: its weights do not match the sha256 written with them")


def load_model(ckpt: dict, device: torch.device) -> Tuple[flowkern.Flow, dict]:
    """The trained model of a checkpoint, on `device`, in eval mode, and its spec."""
    spec = ckpt["model"]
    try:
        model = build_model(spec)
        model.load_state_dict(ckpt["model_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt.get('path', 'the checkpoint')} is damaged: its weights do not fit its model "
                              f"({_first_line(e)})") from None
    return model.to(device).eval(), spec


def _first_line(e: BaseException) -> str:
    """The gist of an error: its first two non-empty lines (load_state_dict's name the tensor)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(e).__name__


class MetricsLog:
    """metrics.jsonl and metrics.csv in the run folder; rank 0 writes, others do nothing.

    On resume both files are rewritten from the checkpoint's rows, dropping rows that an
    interrupted run logged after its last checkpoint."""

    def __init__(self, folder: str, rows: List[dict], enabled: bool):
        self.rows = list(rows)
        self.enabled = enabled
        self.jsonl = os.path.join(folder, "metrics.jsonl")
        self.csv = os.path.join(folder, "metrics.csv")
        if enabled:
            with atomic_path(self.jsonl) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
            with atomic_path(self.csv) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, METRIC_FIELDS)
                writer.writeheader()
                writer.writerows(self.rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow(row)


# ------------------------------------------------------------------------ scoring, sampling


@torch.no_grad()
def per_sample_bpd(model: torch.nn.Module, spec: dict, images: torch.Tensor, *, device: torch.device,
                   batch_size: int = 1000, seed: int = 0, samples: int = 1) -> torch.Tensor:
    """Bits/dim of each uint8 (N, C, H, W) image, float64 (N,) on the CPU.

    The model runs in eval mode (BatchNormFlow with its running statistics) on dequantization
    noise from a private stream seeded with `seed`: one draw per image (the bound), or with
    samples=K, the importance-weighted estimate of -log P(x) / (D ln 2) from K draws
    (flowkern.nn.importance_log_prob).
    """
    from .nn import importance_log_prob

    dims = math.prod(spec["data_shape"])
    was_training = model.training
    model.eval()
    out = []
    try:
        with forked_rng(device, seed):
            for lo in range(0, images.shape[0], batch_size):
                x = images[lo:lo + batch_size].to(device, non_blocking=True)
                if samples == 1:
                    out.append(bits_per_dim(model, spec, x).double().cpu())
                else:
                    log_p = importance_log_prob(model, model_input(x, spec), samples)
                    out.append((-log_p / (dims * math.log(2.0))).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


@torch.no_grad()
def sample_pixels(model: torch.nn.Module, spec: dict, n: int, temperature: float, *,
                  device: torch.device, seed: int = 0) -> torch.Tensor:
    """n samples at `temperature` as uint8 (n, C, H, W) images on the CPU (from latents drawn
    on a private stream seeded with `seed`; non-finite pixels become 0)."""
    was_training = model.training
    model.eval()
    try:
        with forked_rng(device, seed):
            x = model.sample(n, temperature)
    finally:
        model.train(was_training)
    x = x.reshape(n, *spec["data_shape"]).float().nan_to_num(0.0, 0.0, 0.0)
    return x.round().clamp(0, 255).to(torch.uint8).cpu()


def _require_torchvision(what: str):
    try:
        import torchvision.utils
    except ImportError:
        raise UsageError(f"{what} needs torchvision: pip install 'flowkern[cli]' (or torchvision matching "
                         f"your torch {torch.__version__})") from None
    return torchvision.utils


def save_grid(pixels: torch.Tensor, path: str, nrow: Optional[int] = None) -> str:
    """Save uint8 (n, C, H, W) images as one PNG grid (torchvision.utils.save_image of
    pixels / 255), atomically; nrow defaults to a square grid."""
    tvu = _require_torchvision("saving sample grids")
    n, c = pixels.shape[:2]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    if c not in (1, 2, 3, 4):  # no PNG mode: each image's channels one above the other, in grey
        pixels = pixels.reshape(n, 1, c * pixels.shape[2], pixels.shape[3])
    with atomic_path(path) as tmp:
        tvu.save_image(pixels.float() / 255.0, tmp, nrow=nrow, padding=2, pad_value=0.5, format="PNG")
    return path


def auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve of `score` as a detector of the out set (higher = more out):
    P(score_out > score_in) + P(score_out == score_in) / 2, from average ranks (ties counted
    half), i.e. the Mann-Whitney U statistic / (n_in * n_out). 0.5 is chance; below 0.5 the
    out set scores LOWER than the in set. Infinite scores are ranked; NaN raises."""
    a = np.asarray(scores_in, dtype=np.float64).ravel()
    b = np.asarray(scores_out, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"auroc needs scores in both sets, got {a.size} in and {b.size} out")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("auroc: scores contain NaN")
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    # A tie group at sorted positions s+1..s+k (1-based) has the average rank s + (k + 1) / 2.
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    u = ranks[a.size:].sum() - b.size * (b.size + 1) / 2.0
    return float(u / (a.size * b.size))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 6) -> List[float]:
    raw = (hi - lo) / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def histogram_png(path: str, series: Sequence[Tuple[str, np.ndarray]], title: str, *,
                  xlabel: str = "bits/dim", bins: int = 60, size: Tuple[int, int] = (760, 460)) -> str:
    """Overlaid histograms (fraction of each set per bin, common bins) of a few 1-D series,
    in translucent distinguishable colours with a legend, drawn with PIL and saved as PNG."""
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    finite = [np.asarray(v, dtype=np.float64)[np.isfinite(v)] for _, v in series]
    allv = np.concatenate(finite) if finite else np.empty(0)
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.02 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, bins + 1)
    hists = [np.histogram(v, edges)[0] / max(1, v.size) for v in finite]
    top = max([h.max() for h in hists] + [1e-9]) * 1.08

    w, h = size
    left, right, upper, lower = 78, w - 20, 64, h - 58
    img = Image.new("RGBA", size, (255, 255, 255, 255))
    font, small = _font(15), _font(12)

    def px(x):
        return left + (x - lo) / (hi - lo) * (right - left)

    def py(y):
        return lower - y / top * (lower - upper)

    for (label, _), hist, colour in zip(series, hists, colours):
        layer = Image.new("RGBA", size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        for k, frac in enumerate(hist):
            if frac > 0:
                d.rectangle([px(edges[k]), py(frac), px(edges[k + 1]), lower], fill=colour + (110,))
        outline = []
        for k, frac in enumerate(hist):  # a solid step outline keeps overlaps readable
            outline += [(px(edges[k]), py(frac)), (px(edges[k + 1]), py(frac))]
        d.line([(px(edges[0]), lower)] + outline + [(px(edges[-1]), lower)], fill=colour + (255,), width=2)
        img = Image.alpha_composite(img, layer)

    d = ImageDraw.Draw(img)
    black, grey = (0, 0, 0, 255), (90, 90, 90, 255)
    d.line([(left, upper), (left, lower), (right, lower)], fill=black, width=1)
    for t in _nice_ticks(lo, hi):
        x = px(t)
        d.line([(x, lower), (x, lower + 5)], fill=black)
        d.text((x, lower + 8), f"{t:g}", fill=black, font=small, anchor="mt")
    for t in _nice_ticks(0.0, top / 1.08, 5):
        y = py(t)
        d.line([(left - 5, y), (left, y)], fill=black)
        d.text((left - 8, y), f"{100 * t:.0f}%" if top >= 0.1 else f"{100 * t:.1f}%", fill=black, font=small,
               anchor="rm")
    d.text(((left + right) / 2, h - 22), xlabel, fill=black, font=font, anchor="mm")
    d.text((left, upper - 10), "fraction of set per bin", fill=grey, font=small, anchor="lb")
    d.text((w / 2, 18), title, fill=black, font=font, anchor="mm")
    y = upper + 6
    for (label, v), fin, colour in zip(series, finite, colours):
        dropped = np.asarray(v).size - fin.size
        text = f"{label}: n={np.asarray(v).size}, mean {fin.mean():.3f}" if fin.size else f"{label}: no finite values"
        if dropped:
            text += f" ({dropped} non-finite not shown)"
        tw = d.textlength(text, font=small)
        d.rectangle([right - tw - 32, y, right - tw - 18, y + 12], fill=colour + (255,))
        d.text((right - tw - 10, y + 6), text, fill=black, font=small, anchor="lm")
        y += 20
    with atomic_path(path) as tmp:
        img.convert("RGB").save(tmp, format="PNG")
    return path


# --------------------------------------------------------------------------------- training


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning-rate multiplier for the step after `step` completed ones: linear warmup
    from 1/warmup to 1 over `warmup` steps, then constant or a cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, lr: float, weight_decay: float) -> Tuple[torch.optim.Optimizer, str]:
    """AdamW with torch's fused implementation where it supports the parameters' device (CUDA,
    and the CPU in recent torch), else the foreach one; returns it and "fused" or "foreach"."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), "fused"
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True), "foreach"


def _positive_int(config: dict, key: str, flag: str, allow_zero: bool = False, allow_none: bool = False):
    v = config[key]
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise UsageError(f"{flag} must be an int >= {0 if allow_zero else 1}, got {v!r}")


def check_config(config: dict) -> dict:
    """TRAIN_DEFAULTS updated with `config`, checked (UsageError names the flag)."""
    unknown = set(config) - set(TRAIN_DEFAULTS)
    if unknown:
        raise UsageError(f"unknown training options: {sorted(unknown)}")
    cfg = dict(TRAIN_DEFAULTS, **config)
    if not cfg["out"]:
        raise UsageError("--out DIR (the run folder) is required")
    if cfg["steps"] is not None and cfg["epochs"] is not None:
        raise UsageError("give --steps or --epochs, not both")
    for key, flag in [("layers", "--layers"), ("hidden", "--hidden"), ("levels", "--levels"), ("bins", "--bins"),
                      ("batch_size", "--batch-size"), ("eval_batch_size", "--eval-batch-size")]:
        _positive_int(cfg, key, flag)
    for key, flag in [("steps", "--steps"), ("epochs", "--epochs"), ("stop_at", "--stop-at"),
                      ("eval_limit", "--eval-limit"), ("threads", "--threads")]:
        _positive_int(cfg, key, flag, allow_none=True)
    for key, flag in [("warmup", "--warmup"), ("eval_every", "--eval-every"),
                      ("checkpoint_every", "--checkpoint-every"), ("log_every", "--log-every"),
                      ("n_samples", "--n-samples")]:
        _positive_int(cfg, key, flag, allow_zero=True)
    if not (isinstance(cfg["lr"], (int, float)) and cfg["lr"] > 0 and math.isfinite(cfg["lr"])):
        raise UsageError(f"--lr must be a positive number, got {cfg['lr']!r}")
    limit = cfg["time_limit"]
    if limit is not None and not (isinstance(limit, (int, float)) and limit > 0 and math.isfinite(limit)):
        raise UsageError(f"--time-limit must be a positive number of minutes, got {limit!r}")
    if not cfg["weight_decay"] >= 0:
        raise UsageError(f"--weight-decay must be >= 0, got {cfg['weight_decay']!r}")
    if not cfg["clip"] >= 0:
        raise UsageError(f"--clip must be >= 0 (0 disables clipping), got {cfg['clip']!r}")
    if cfg["schedule"] not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {SCHEDULES}, got {cfg['schedule']!r}")
    if cfg["scale"] not in SCALES:
        raise UsageError(f"--scale must be one of {SCALES}, got {cfg['scale']!r}")
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise UsageError(f"--seed must be a non-negative int, got {cfg['seed']!r}")
    if not isinstance(cfg["compile"], bool):
        raise UsageError(f"compile must be True or False, got {cfg['compile']!r}")
    ms = cfg["memory_saving"]
    if not (isinstance(ms, bool) or (isinstance(ms, int) and ms >= 1)):
        raise UsageError(f"--memory-saving takes an int >= 1 (keep every k-th layer's input; 0 on the command "
                         f"line: off), got {ms!r}")
    if ms and cfg["compile"]:
        raise UsageError("--memory-saving runs its backward eagerly, layer by layer; under --compile the flow would "
                         "silently fall back to standard backprop: choose one")
    if cfg["backend"] not in flowkern.BACKENDS:
        raise UsageError(f"--backend must be one of {flowkern.BACKENDS}, got {cfg['backend']!r}")
    return cfg


def train(config: dict, *, log: Optional[Callable[[str], None]] = None) -> dict:
    """Train a flow as `config` says (keys: TRAIN_DEFAULTS; the command's flags with dashes
    as underscores) and return the summary (also in OUT/summary.json).

    Under torchrun (WORLD_SIZE > 1) this joins the process group, trains with
    DistributedDataParallel and a DistributedSampler (--batch-size is the global batch, split
    evenly over the ranks) and logs and writes files on rank 0 only.

    Raises UsageError, CheckpointError, data.MissingDataset / data.DataError for bad options
    or inputs, TrainingDiverged when the loss or gradient becomes non-finite.
    """
    cfg = check_config(config)
    rt = init_runtime(cfg["device"])
    try:
        summary = _Run(cfg, rt, log or print).run()
        # Every rank reaches this point before any tears the group down: a rank that destroys
        # its gloo group while a peer still talks to it aborts that peer ("terminate called").
        _barrier(rt)
        return summary
    finally:
        if rt.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class _Progress:
    """A tqdm bar on a terminal (rank 0, not --quiet), else plain log lines."""

    def __init__(self, run: "_Run", initial: int, total: int):
        show = run.cfg["progress"]
        if show is None:
            show = sys.stderr.isatty()
        self.bar = None
        if run.rt.main and show and not run.cfg["quiet"]:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            desc="train", smoothing=0.1)

    def update(self, bpd: float, img_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{bpd:.3f} bpd, {img_per_s:.0f} img/s", refresh=False)
            self.bar.update(1)

    def write(self, line: str, log: Callable[[str], None]) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Run:
    """One call of train(): set-up, the loop, and the events (log, evaluate, checkpoint, sample)."""

    def __init__(self, cfg: dict, rt: Runtime, log: Callable[[str], None]):
        self.cfg, self.rt = cfg, rt
        self._log = log
        self.out = os.path.abspath(cfg["out"])
        self.ckpt_path = os.path.join(self.out, CHECKPOINT_NAME)

    # Logging goes through rank 0 only; quiet keeps the final summary and warnings.
    def log(self, line: str, always: bool = False) -> None:
        if self.rt.main and (always or not self.cfg["quiet"]):
            (self.progress.write(line, self._log) if getattr(self, "progress", None) else self._log(line))

    # ------------------------------------------------------------------------- set-up
    def _load_data(self) -> fkdata.ImageData:
        cfg = self.cfg

        def load(download):
            return fkdata.load(cfg["data"], root=cfg["root"], download=download, holdout=cfg["holdout"])

        return _rank0_first(lambda: load(cfg["download"]), lambda: load(False), self.rt)

    def _setup(self) -> None:
        cfg, rt = self.cfg, self.rt
        check_output_folder(self.out, "--out")
        ckpt = None
        # Whether this run replaces whatever --out holds: a fresh run, or a resume of another folder's run.
        self.replaces_out = True
        if cfg["resume"]:
            ckpt = load_checkpoint(cfg["resume"])
            self.replaces_out = os.path.abspath(ckpt["path"]) != self.ckpt_path
            if self.replaces_out and os.path.exists(self.ckpt_path) and not cfg["overwrite"]:
                raise UsageError(f"{self.out} already holds another run ({CHECKPOINT_NAME}): resuming "
                                 f"{ckpt['path']} there would replace it; pass --overwrite, or another --out")
        elif os.path.exists(self.ckpt_path) and not cfg["overwrite"]:
            raise UsageError(f"{self.out} already holds a run ({CHECKPOINT_NAME}): pass --resume to continue it, "
                             "--overwrite to start it again, or another --out")
        self.ckpt = ckpt
        flowkern.set_backend(cfg["backend"])
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        if cfg["deterministic"]:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

        if cfg["n_samples"]:
            _require_torchvision("the sample grids (--n-samples 0 skips them)")
        self.data = self._load_data()
        # The config (so the checkpoint) keeps the data with absolute paths: a resume from another
        # working folder finds the same files.
        cfg["data"] = self.data.spec
        if cfg["root"]:
            cfg["root"] = os.path.abspath(cfg["root"])
        shape = self.data.shape
        spec = model_spec(cfg, shape)
        if ckpt is not None:
            saved = ckpt["model"]
            if list(saved["data_shape"]) != list(shape):
                raise UsageError(f"the checkpoint's model takes images of shape {tuple(saved['data_shape'])}, "
                                 f"but --data {cfg['data']} has {tuple(shape)}")
            if saved != spec:
                diff = [k for k in sorted(set(saved["kwargs"]) | set(spec["kwargs"]))
                        if saved["kwargs"].get(k) != spec["kwargs"].get(k)]
                raise UsageError(f"the model options differ from the checkpoint's ({saved['kind']}: "
                                 + ", ".join(f"{k}={saved['kwargs'].get(k)!r}, not {spec['kwargs'].get(k)!r}"
                                             for k in diff)
                                 + "): a resumed run keeps its model; drop those flags")
        self.spec = spec
        if len(self.data.test) == 0:
            raise UsageError(f"--data {cfg['data']} has an empty test split")

        world, batch = rt.world, cfg["batch_size"]
        if batch % world:
            raise UsageError(f"--batch-size {batch} (the global batch) must be divisible by the {world} processes")
        self.local_batch = batch // world
        from torch.utils.data import DistributedSampler

        n_train = len(self.data.train)
        self.sampler = DistributedSampler(range(n_train), num_replicas=world, rank=rt.rank, shuffle=True,
                                          seed=cfg["seed"], drop_last=True)
        self.steps_per_epoch = len(self.sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise UsageError(f"the training split has {n_train} images, fewer than --batch-size {batch}: "
                             "use a smaller --batch-size or more data")
        if cfg["steps"] is not None:
            self.total = cfg["steps"]
        else:
            self.total = (cfg["epochs"] or DEFAULT_EPOCHS) * self.steps_per_epoch
        self.target = min(self.total, cfg["stop_at"]) if cfg["stop_at"] else self.total

        # The model: identical on every rank (same seed), then DDP checks it is.
        seed_all(cfg["seed"])
        device = rt.device
        try:
            model = build_model(spec).to(device)
        except (ValueError, TypeError) as e:  # e.g. Glow levels that do not divide the image size
            raise UsageError(f"cannot build {spec['kind']} for images of shape {tuple(shape)}: {e}") from None
        self.model = model
        self.opt, self.opt_impl = make_optimizer(model.parameters(), cfg["lr"], cfg["weight_decay"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg["warmup"], self.total, cfg["schedule"]))
        self.train_images = self.data.train.to(device)
        self.test_images = self.data.test if cfg["eval_limit"] is None else self.data.test[:cfg["eval_limit"]]

        if ckpt is not None:
            try:
                model.load_state_dict(ckpt["model_state"])
                self.opt.load_state_dict(ckpt["optimizer_state"])
                self.sched.load_state_dict(ckpt["scheduler_state"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{ckpt['path']} is damaged: its state does not fit its model "
                                      f"({_first_line(e)})") from None
            # --lr / --steps may change on resume: recompute the next step's rate from them (the
            # same value, bit for bit, when they did not change).
            self.sched.base_lrs = [cfg["lr"]] * len(self.opt.param_groups)
            for group in self.opt.param_groups:
                group["initial_lr"] = cfg["lr"]
                group["lr"] = cfg["lr"] * lr_factor(self.sched.last_epoch, cfg["warmup"], self.total, cfg["schedule"])
            self.step, self.epoch, self.batch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
            if self.step > self.total:
                raise UsageError(f"the run is at step {self.step}, past the {self.total} steps asked for: "
                                 "give a larger --steps or --epochs to continue it")
            self.elapsed0 = ckpt.get("elapsed_s", 0.0)
            self.last_ckpt_step = ckpt["step"]
            rows = ckpt.get("metrics", [])
            if ckpt.get("world_size") != world:
                self.log(f"warning: the checkpoint was written by {ckpt.get('world_size')} processes, this run has "
                         f"{world}: the data order and RNG streams restart at the next epoch (not an exact resume)",
                         always=True)
                if self.batch:
                    self.epoch, self.batch = self.epoch + 1, 0
                torch.manual_seed(cfg["seed"] + _RANK_SEED * rt.rank + 1 + self.step)
            else:
                try:
                    set_rng_state(ckpt["rng"][rt.rank], device)
                except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{ckpt['path']} is damaged: its RNG states do not load "
                                          f"({_first_line(e)})") from None
                # A position inside an epoch counts batches of the checkpoint's size over its split;
                # with another batch size or split it points elsewhere (or past the epoch's end).
                # (Checkpoints before these keys: steps_per_epoch alone tells.)
                layout = (ckpt.get("steps_per_epoch"), ckpt.get("local_batch", self.local_batch),
                          ckpt.get("n_train", n_train))
                if self.batch and layout != (self.steps_per_epoch, self.local_batch, n_train):
                    self.log(f"warning: the checkpoint stopped at batch {self.batch} of an epoch of "
                             f"{ckpt.get('steps_per_epoch')} batches; with this run's batch size and training split "
                             "that position does not exist, so training continues at the start of the next epoch",
                             always=True)
                    self.epoch, self.batch = self.epoch + 1, 0
        else:
            self.step = self.epoch = self.batch = 0
            self.elapsed0, self.last_ckpt_step, rows = 0.0, None, []
            if _has_uninitialized_actnorm(model):
                self._init_actnorm()
            # Each rank draws its own dequantization noise from here on.
            torch.manual_seed(cfg["seed"] + _RANK_SEED * rt.rank)

        self.last_lr = self._lr()  # the rate of the latest step, for the metrics
        # A way of running the model, not part of it: the checkpoint's model spec leaves it out.
        model.memory_saving = cfg["memory_saving"]
        self.net = _BitsPerDim(model, spec)
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # DDP broadcasts rank 0's parameters and buffers here, so the ranks start equal.
            self.net = DistributedDataParallel(self.net, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg["compile"]:
            # The training objective only (forward and, through AOTAutograd, backward); evaluation
            # and sampling stay eager. Batches are all the same size (drop_last): one graph.
            self.net = torch.compile(self.net, dynamic=False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if cfg["overwrite"] and rt.main and self.replaces_out:
            self._remove_old_run()
        self.metrics = MetricsLog(self.out, rows, rt.main)

    def _remove_old_run(self) -> None:
        """--overwrite: the files an earlier run wrote into the folder (only those), so that none
        of them (its checkpoint above all) outlives the new run's start and mixes with it."""
        if not os.path.isdir(self.out):
            return
        names = {CHECKPOINT_NAME, "summary.json", "config.json", "metrics.jsonl", "metrics.csv"}
        for name in os.listdir(self.out):
            if name in names or (name.startswith("samples_t") and name.endswith(".png")):
                os.remove(os.path.join(self.out, name))
        grids = os.path.join(self.out, "samples")
        if os.path.isdir(grids):
            for name in os.listdir(grids):
                if name.startswith("epoch_") and name.endswith(".png"):
                    os.remove(os.path.join(grids, name))

    def _init_actnorm(self) -> None:
        """ActNorm's data-dependent initialisation: one eager training-mode forward on the
        first global batch of epoch 0, the same batch (and noise) on every rank."""
        from torch.utils.data import DistributedSampler

        cfg, rt, n = self.cfg, self.rt, len(self.data.train)
        idx = []
        for r in range(rt.world):
            s = DistributedSampler(range(n), num_replicas=rt.world, rank=r, shuffle=True, seed=cfg["seed"],
                                   drop_last=True)
            s.set_epoch(0)
            idx += list(s)[: self.local_batch]
        batch = self.train_images[torch.tensor(idx, device=self.train_images.device)]
        self.model.train()
        with torch.no_grad():
            bits_per_dim(self.model, self.spec, batch)

    def _write_config(self) -> None:
        if not self.rt.main:
            return
        from . import _backend

        resolved = {
            "device": str(self.rt.device), "world_size": self.rt.world, "backend": flowkern.get_backend(),
            "backend_resolved": _backend.resolve(self.rt.device), "optimizer": f"AdamW ({self.opt_impl})",
            "model": self.spec, "model_description": describe_model(self.spec, self.model),
            "data": {"spec": self.data.spec, "description": self.data.description,
                     "shape": list(self.data.shape), "train": len(self.data.train), "test": len(self.data.test)},
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total, "local_batch": self.local_batch,
            "threads": torch.get_num_threads(), "flowkern": flowkern.__version__, "torch": torch.__version__,
            "command": sys.argv,
        }
        write_json(os.path.join(self.out, "config.json"), {"config": self.cfg, "resolved": resolved})

    # ------------------------------------------------------------------------- events
    def _lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def _elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start

    def _test_bpd(self) -> float:
        """Mean held-out bits/dim: each rank scores a shard, the sums are all-reduced."""
        images = self.test_images[self.rt.rank::self.rt.world]
        bpd = per_sample_bpd(self.model, self.spec, images, device=self.rt.device,
                             batch_size=self.cfg["eval_batch_size"], seed=self.cfg["seed"] + _EVAL_SEED + self.rt.rank)
        stats = torch.tensor([bpd.sum().item(), float(bpd.numel())], dtype=torch.float64,
                             device=self.rt.device if self.rt.device.type == "cuda" else "cpu")
        total, count = _all_reduce_sum(stats, self.rt).tolist()
        return total / count

    def _record(self, evaluate: bool) -> dict:
        """A metrics row: train bits/dim and img/s since the previous row, test bits/dim."""
        test = self._test_bpd() if evaluate else None
        n = self.window_steps
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
               "train_bpd": self.window_bpd / n if n else None, "test_bpd": test,
               "img_per_s": self.window_images / self.window_time if self.window_time > 0 else None,
               "lr": self.last_lr, "time_s": round(self._elapsed(), 3),
               "grad_norm": self.window_gnorm / n if n else None}
        self.window_steps = self.window_images = 0
        self.window_bpd = self.window_gnorm = self.window_time = 0.0
        self.metrics.append(row)

        def fmt(v, spec):
            return "-" if v is None else format(v, spec)

        self.log(f"step {self.step}/{self.total} (epoch {row['epoch']:.2f}): train {fmt(row['train_bpd'], '.4f')} "
                 f"bits/dim" + (f", test {test:.4f} bits/dim" if test is not None else "")
                 + f", {fmt(row['img_per_s'], '.0f')} img/s, lr {row['lr']:.2e}")
        return row

    def _checkpoint(self) -> None:
        """Every rank's RNG states gathered, rank 0 writes atomically, all wait for it."""
        states = _all_gather(rng_state(self.rt.device), self.rt)
        if self.rt.main:
            payload = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "flowkern_version": flowkern.__version__, "torch_version": str(torch.__version__),
                "model": self.spec, "model_state": self.model.state_dict(), "model_sha256": param_hash(self.model),
                "optimizer_state": self.opt.state_dict(), "scheduler_state": self.sched.state_dict(),
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total, "world_size": self.rt.world,
                "local_batch": self.local_batch, "n_train": len(self.data.train),
                "rng": states, "sampler": {"seed": self.cfg["seed"], "epoch": self.epoch},
                "metrics": self.metrics.rows, "elapsed_s": self._elapsed(), "config": self.cfg,
                "data": {"spec": self.data.spec, "root": os.path.abspath(self.cfg["root"]),
                         "holdout": self.cfg["holdout"], "shape": list(self.data.shape)},
            }
            save_checkpoint(self.ckpt_path, payload)
        self.last_ckpt_step = self.step
        _barrier(self.rt)

    def _samples(self, folder: str, prefix: str) -> List[str]:
        if not self.rt.main or not self.cfg["n_samples"]:
            return []
        paths = []
        for t in TEMPERATURES:
            pixels = sample_pixels(self.model, self.spec, self.cfg["n_samples"], t, device=self.rt.device,
                                   seed=self.cfg["seed"] + _SAMPLE_SEED)
            paths.append(save_grid(pixels, os.path.join(folder, f"{prefix}t{t:.1f}.png")))
        return paths

    # --------------------------------------------------------------------------- loop
    def _train_step(self, pixels: torch.Tensor) -> Tuple[float, float]:
        loss = self.net(pixels).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.cfg["clip"] > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg["clip"], foreach=True)
        else:
            gnorm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # One small all-reduce and one host sync per step: every rank sees the same numbers, so
        # all of them stop together on a non-finite loss (a NaN on one rank also poisons the
        # all-reduced gradients, hence the gradient norm, everywhere).
        # The --time-limit flag rides along, so every rank stops after the same step.
        limit = self.cfg["time_limit"]
        over = float(limit is not None and time.perf_counter() - self.t_start > 60.0 * limit)
        stats = torch.stack([loss.detach().float(), gnorm.detach().float().to(loss.device),
                             torch.tensor(over, device=loss.device)])
        loss_v, gnorm_v, over_v = (_all_reduce_sum(stats, self.rt) / self.rt.world).tolist()
        if over_v > 0:
            self.target = self.step + 1  # this step is the last
        if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
            where = ("the last good checkpoint is " + self.ckpt_path + f" (step {self.last_ckpt_step})"
                     if self.last_ckpt_step is not None else "no checkpoint had been written yet")
            raise TrainingDiverged(
                f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step {self.step + 1} "
                f"(epoch {self.epoch + 1}, batch {self.batch + 1}): loss {loss_v} bits/dim, gradient norm {gnorm_v}. "
                f"Training stopped before that update; {where}. Try a lower --lr, a longer --warmup or --clip "
                "(then --resume)." + ("" if dequantizes(self.spec) else NOT_DEQUANTIZED), self.step + 1)
        self.last_lr = self._lr()
        self.opt.step()
        self.sched.step()
        return loss_v, gnorm_v

    def run(self) -> dict:
        self._setup()
        cfg, rt = self.cfg, self.rt
        self.t_start = time.perf_counter()
        self._write_config()
        self.log(f"flowkern train: {describe_model(self.spec, self.model)}")
        self.log(f"  data: {self.data.description}; images {tuple(self.data.shape)}")
        self.log(f"  {self.steps_per_epoch} steps/epoch at batch {cfg['batch_size']}"
                 + (f" ({rt.world} processes x {self.local_batch})" if rt.world > 1 else "")
                 + f", {self.total} steps; device {rt.device}, backend {flowkern.get_backend()}, "
                   f"AdamW ({self.opt_impl})"
                 + (", torch.compile" if cfg["compile"] else "")
                 + (", memory-saving backprop" if cfg["memory_saving"] else "")
                 + (f"; resuming at step {self.step}" if self.ckpt is not None else ""))
        self.log(f"  run folder {self.out}")
        self.window_steps = self.window_images = 0
        self.window_bpd = self.window_gnorm = self.window_time = 0.0
        self.progress = _Progress(self, self.step, self.target)
        epoch_samples = os.path.join(self.out, "samples")
        self.net.train()
        compiling = bool(cfg["compile"])
        if compiling and self.step < self.target:
            self.log("  compiling the training step (the first step; left out of img/s)")
        try:
            while self.step < self.target:
                self.sampler.set_epoch(self.epoch)
                order = torch.tensor(list(self.sampler), device=self.train_images.device)
                while self.batch < self.steps_per_epoch and self.step < self.target:
                    lo = self.batch * self.local_batch
                    pixels = self.train_images[order[lo:lo + self.local_batch]]
                    t0 = time.perf_counter()
                    bpd, gnorm = self._train_step(pixels)
                    dt = time.perf_counter() - t0
                    self.step += 1
                    self.batch += 1
                    self.window_steps += 1
                    self.window_bpd += bpd
                    self.window_gnorm += gnorm
                    if compiling:  # the first step under --compile: its time is the compile's
                        compiling = False
                    else:
                        self.window_images += cfg["batch_size"]
                        self.window_time += dt
                    self.progress.update(self.window_bpd / self.window_steps,
                                         self.window_images / self.window_time if self.window_time else 0.0)
                    if self.step >= self.target:
                        break
                    evaluate = bool(cfg["eval_every"]) and self.step % cfg["eval_every"] == 0
                    end_of_epoch = self.batch >= self.steps_per_epoch
                    if not end_of_epoch and (evaluate or (cfg["log_every"] and self.step % cfg["log_every"] == 0)):
                        self._record(evaluate)
                    if not end_of_epoch and cfg["checkpoint_every"] and self.step % cfg["checkpoint_every"] == 0:
                        self._checkpoint()
                if self.batch >= self.steps_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                    if self.step < self.target:  # the last epoch's events are the final ones below
                        self._record(evaluate=True)
                        self._checkpoint()
                        self._samples(epoch_samples, f"epoch_{self.epoch:03d}_")
        finally:
            self.progress.close()
            self.progress = None

        summary = {"step": self.step, "total_steps": self.total, "epoch": round(self.step / self.steps_per_epoch, 4),
                   "stopped_early": self.step < self.total, "out": self.out, "checkpoint": self.ckpt_path,
                   "world_size": rt.world, "device": str(rt.device)}
        if self.last_ckpt_step != self.step or not self.metrics.rows:
            row = self._record(evaluate=True)
            self._checkpoint()
        else:
            row = next((r for r in reversed(self.metrics.rows) if r["test_bpd"] is not None), self.metrics.rows[-1])
        summary.update(test_bpd=row["test_bpd"], train_bpd=row["train_bpd"], img_per_s=row["img_per_s"],
                       time_s=row["time_s"])
        summary["samples"] = self._samples(self.out, "samples_")
        summary["param_sha256_per_rank"] = _all_gather(param_hash(self.model), rt)
        if len(set(summary["param_sha256_per_rank"])) != 1:
            self.log("warning: the ranks ended with different parameters (a DistributedDataParallel problem)",
                     always=True)
        if rt.main:
            write_json(os.path.join(self.out, "summary.json"), summary)
        test = "-" if summary["test_bpd"] is None else f"{summary['test_bpd']:.4f}"
        self.log(f"{'stopped at' if summary['stopped_early'] else 'done:'} step {self.step}/{self.total}, "
                 f"test {test} bits/dim; {self.out}", always=True)
        return summary


# -------------------------------------------------------------------- sample / eval / ood


def _setup_inference(checkpoint: str, device: str, backend: str, threads: Optional[int] = None):
    ckpt = load_checkpoint(checkpoint)
    flowkern.set_backend(backend)
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    model, spec = load_model(ckpt, dev)
    return ckpt, model, spec, dev


def _data_from(ckpt: dict, spec_text: Optional[str], root: Optional[str], holdout, download: bool = False,
               shape=None) -> fkdata.ImageData:
    """--data as given, else the checkpoint's own data; --root and --holdout as given, else the
    run's (so --data naming the training set again holds out the same test split)."""
    saved = ckpt.get("data", {})
    if spec_text is None:
        spec_text = saved.get("spec")
    root = root if root is not None else saved.get("root")
    holdout = holdout if holdout is not None else saved.get("holdout")
    return fkdata.load(spec_text, root=root, download=download, holdout=holdout,
                       shape=shape or tuple(ckpt["model"]["data_shape"]))


def _check_shape(images: torch.Tensor, spec: dict, what: str) -> None:
    if list(images.shape[1:]) != list(spec["data_shape"]):
        raise UsageError(f"{what} images have shape {tuple(images.shape[1:])}, the model takes "
                         f"{tuple(spec['data_shape'])}")


def sample(checkpoint: str, out: str, *, n: int = 64, temperatures: Sequence[float] = (0.7,),
           nrow: Optional[int] = None, seed: int = 0, device: str = "auto", backend: str = "auto") -> List[str]:
    """Sample grids from a checkpoint: one PNG per temperature (OUT itself for one temperature,
    OUT with _t{T} before the extension for several). Returns the paths written."""
    if not isinstance(n, int) or n < 1:
        raise UsageError(f"--n must be a positive int, got {n!r}")
    for t in temperatures:
        if not (t >= 0 and math.isfinite(t)):
            raise UsageError(f"--temperature must be >= 0, got {t!r}")
    _require_torchvision("flowkern sample")
    base, ext = os.path.splitext(out)
    if ext.lower() not in ("", ".png"):
        raise UsageError(f"--out {out}: the grids are PNG images, name a .png file")
    ext = ext or ".png"
    out = base + ext
    check_output_file(out, "--out")
    ckpt, model, spec, dev = _setup_inference(checkpoint, device, backend)
    paths = []
    for t in temperatures:
        path = out if len(temperatures) == 1 else f"{base}_t{t:g}{ext}"
        pixels = sample_pixels(model, spec, n, t, device=dev, seed=seed)
        paths.append(save_grid(pixels, path, nrow))
    return paths


def evaluate(checkpoint: str, *, data: Optional[str] = None, root: Optional[str] = None, holdout=None,
             split: str = "test", limit: Optional[int] = None, batch_size: int = 1000, seed: int = 0,
             device: str = "auto", backend: str = "auto", download: bool = False, samples: int = 1) -> dict:
    """Mean bits/dim (and its standard error) of a checkpoint on a data split; --data defaults
    to the data the model was trained on (its held-out split).

    samples=K > 1 adds the importance-weighted estimate of -log P(x) in bits/dim with K
    dequantization draws per image ("bpd_iw", flowkern.nn.importance_log_prob), which is below
    the one-draw bound "bpd" on average and approaches the model's discrete likelihood as K
    grows (uniform and variational dequantization alike)."""
    if not isinstance(samples, int) or samples < 1:
        raise UsageError(f"--samples must be a positive int, got {samples!r}")
    ckpt, model, spec, dev = _setup_inference(checkpoint, device, backend)
    ds = _data_from(ckpt, data, root, holdout, download)
    images = ds.split(split)[:limit] if limit else ds.split(split)
    _check_shape(images, spec, f"--data {ds.spec}")
    if len(images) == 0:
        raise UsageError(f"the {split} split of {ds.spec} is empty")
    bpd = per_sample_bpd(model, spec, images, device=dev, batch_size=batch_size, seed=seed)
    finite = bpd[torch.isfinite(bpd)]
    result = {"checkpoint": ckpt["path"], "step": ckpt["step"], "data": ds.spec, "description": ds.description,
              "split": split, "images": len(images), "bpd": finite.mean().item() if len(finite) else float("nan"),
              "bpd_std_error": (finite.std().item() / math.sqrt(len(finite))) if len(finite) > 1 else None,
              "non_finite": int(len(bpd) - len(finite)), "samples": samples}
    if samples > 1:
        if not dequantizes(spec):
            raise UsageError("--samples needs a model with dequantization (it averages over the noise)")
        iw = per_sample_bpd(model, spec, images, device=dev, batch_size=batch_size, seed=seed, samples=samples)
        fin = iw[torch.isfinite(iw)]
        result.update(bpd_iw=fin.mean().item() if len(fin) else float("nan"),
                      bpd_iw_std_error=(fin.std().item() / math.sqrt(len(fin))) if len(fin) > 1 else None)
    return result


def ood(checkpoint: str, out_data: str, *, in_data: Optional[str] = None, root: Optional[str] = None, holdout=None,
        split: str = "test", limit: Optional[int] = None, out_dir: Optional[str] = None, batch_size: int = 1000,
        seed: int = 0, device: str = "auto", backend: str = "auto", download: bool = False) -> dict:
    """Out-of-distribution scoring with bits/dim (higher = more anomalous).

    Scores the `split` of the in-distribution data (default: the checkpoint's own, i.e. the
    held-out images) and of `out_data`, and writes to out_dir (default CHECKPOINT_DIR/ood):
    bpd_in.npy, bpd_out.npy, ood_scores.csv (set, index, bpd), ood_histogram.png and
    ood.json (AUROC, means, medians, counts). AUROC < 0.5 means the flow gives the OUT set
    the higher likelihood (Nalisnick et al., 2018)."""
    if out_dir:
        check_output_folder(out_dir, "--out")
    ckpt, model, spec, dev = _setup_inference(checkpoint, device, backend)
    shape = tuple(spec["data_shape"])
    ds_in = _data_from(ckpt, in_data, root, holdout, download)
    ds_out = fkdata.load(out_data, root=root if root is not None else ckpt.get("data", {}).get("root"),
                         holdout=holdout, shape=shape)
    sets = {}
    for name, ds in (("in", ds_in), ("out", ds_out)):
        images = ds.split(split)[:limit] if limit else ds.split(split)
        _check_shape(images, spec, f"--{name}-data {ds.spec}")
        if len(images) == 0:
            raise UsageError(f"the {split} split of --{name}-data {ds.spec} is empty")
        sets[name] = per_sample_bpd(model, spec, images, device=dev, batch_size=batch_size, seed=seed).numpy()
    out_dir = out_dir or os.path.join(os.path.dirname(ckpt["path"]), "ood")
    os.makedirs(out_dir, exist_ok=True)
    # NaN bits/dim (a broken model on that input) ranks as the most anomalous.
    score = {k: np.where(np.isnan(v), np.inf, v) for k, v in sets.items()}
    auc = auroc(score["in"], score["out"])
    for name, values in sets.items():
        with atomic_path(os.path.join(out_dir, f"bpd_{name}.npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, values)
    with atomic_path(os.path.join(out_dir, "ood_scores.csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["set", "index", "bpd"])
        for name, values in sets.items():
            w.writerows((name, i, repr(float(v))) for i, v in enumerate(values))

    def stats(v):
        fin = v[np.isfinite(v)]
        return {"n": int(v.size), "mean": float(fin.mean()) if fin.size else None,
                "median": float(np.median(fin)) if fin.size else None,
                "std": float(fin.std()) if fin.size else None, "non_finite": int(v.size - fin.size)}

    result = {"checkpoint": ckpt["path"], "in_data": ds_in.spec, "out_data": ds_out.spec, "split": split,
              "auroc": auc, "in": stats(sets["in"]), "out": stats(sets["out"]),
              "out_more_likely": auc < 0.5, "out_dir": os.path.abspath(out_dir)}
    title = f"bits/dim: in vs out of distribution (AUROC {auc:.3f})"
    histogram_png(os.path.join(out_dir, "ood_histogram.png"),
                  [(f"in: {_short(ds_in.spec)}", sets["in"]), (f"out: {_short(ds_out.spec)}", sets["out"])], title)
    result["files"] = sorted(os.path.join(os.path.abspath(out_dir), f) for f in
                             ("bpd_in.npy", "bpd_out.npy", "ood_scores.csv", "ood_histogram.png", "ood.json"))
    write_json(os.path.join(out_dir, "ood.json"), result)
    return result


def _short(spec: str, width: int = 36) -> str:
    """A data spec short enough for a legend: long paths keep their file names."""
    if len(spec) <= width:
        return spec
    kind, _, rest = spec.partition(":")
    names = ",".join(os.path.basename(p) for p in rest.split(","))
    text = f"{kind}:{names}"
    return text if len(text) <= width else text[: width - 3] + "..."
