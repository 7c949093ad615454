"""Training faults: `flowkern train` killed with SIGKILL mid-epoch resumes from its latest
checkpoint (to the same parameters as a run never killed); a process killed while writing a
checkpoint leaves the previous one intact; checkpoints load with torch.load(weights_only=True);
a truncated or tampered checkpoint is refused with a clear error (exit code 2, no traceback),
and loading one never runs code from it.

The runs are tiny (2 coupling layers, hidden 16, synthetic digits) and take a few seconds each.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flowkern
from flowkern import cli
from flowkern import train as T

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

# The repository whose flowkern this test imported: subprocesses must run the same one.
ROOT = str(Path(flowkern.__file__).resolve().parents[1])
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
           PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
# 2000 synthetic digits, batch 32: ~56 steps an epoch, so a checkpoint every 2 steps early on
# lies mid-epoch.
RUN = ["--data", "synthetic:2000", "--layers", "2", "--hidden", "16", "--batch-size", "32", "--warmup", "2",
       "--schedule", "constant",
       "--n-samples", "0", "--quiet", "--eval-limit", "40", "--log-every", "1"]
TINY = {"data": "synthetic:300", "layers": 2, "hidden": 16, "batch_size": 64, "warmup": 3, "lr": 2e-3,
        "quiet": True, "n_samples": 0, "eval_limit": 40, "log_every": 2}


def flowkern_cmd(*args):
    return [sys.executable, "-m", "flowkern", *args]


def run_cli(*args, timeout=120):
    return subprocess.run(flowkern_cmd(*args), env=ENV, capture_output=True, text=True, timeout=timeout)


def rows(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_sigkill_mid_epoch_then_resume(tmp_path):
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(flowkern_cmd("train", *RUN, "--steps", "100000", "--checkpoint-every", "2", "--out", out),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.monotonic() + 90
    try:
        # A few steps past the first checkpoints, then kill: wherever it is (in a step, in a
        # checkpoint's write), as a pre-empted job would be.
        while rows(metrics) < 7 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended by itself: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    path = os.path.join(out, "checkpoint.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and containers only
    ckpt = T.load_checkpoint(out)
    assert raw["step"] == ckpt["step"] >= 2 and ckpt["step"] % 2 == 0
    assert 0 < ckpt["batch_in_epoch"] < ckpt["steps_per_epoch"], "the kill was meant to land mid-epoch"
    assert raw["model_sha256"] == T.state_hash(raw["model_state"])
    # A kill during a write leaves at most a temporary file beside it, which nothing reads.
    leftovers = [p for p in os.listdir(out) if p.startswith(".checkpoint.")]
    assert all(p.endswith(".tmp.pt") for p in leftovers), leftovers

    # --resume continues from there to the end, and lands where a run never killed lands.
    total = ckpt["step"] + 5
    resumed = run_cli("train", *RUN, "--steps", str(total), "--checkpoint-every", "2", "--resume", out, "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    done = summary(out)
    assert done["step"] == total and not done["stopped_early"]
    assert T.load_checkpoint(out)["step"] == total
    steps = [json.loads(line)["step"] for line in open(metrics) if line.strip() and "train_bpd" in line]
    assert steps == sorted(set(steps)) and steps[-1] == total, "metrics rows repeat or miss steps after resume"

    straight = str(tmp_path / "straight")
    ref = run_cli("train", *RUN, "--steps", str(total), "--checkpoint-every", "2", "--out", straight)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert summary(straight)["param_sha256_per_rank"] == done["param_sha256_per_rank"], \
        "killed + resumed training did not reproduce the uninterrupted run"


KILL_DURING_WRITE = r"""
import os, signal, sys, torch
from flowkern import train as T
path, = sys.argv[1:]
good = T.load_checkpoint(path)
good.pop("path")
real_save = torch.save
def half_then_die(obj, f, *a, **k):
    real_save({"format": "half"}, f)   # some bytes of the new file...
    f.flush(); os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies mid-write
torch.save = half_then_die
good["step"] += 1
T.save_checkpoint(path, good)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run (3 steps), trained in this process."""
    out = tmp_path_factory.mktemp("faults") / "run"
    T.train(dict(TINY, out=str(out), steps=3))
    return out


def test_kill_during_checkpoint_write_keeps_the_previous(run_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = out / "checkpoint.pt"
    path.write_bytes((run_dir / "checkpoint.pt").read_bytes())
    before = path.read_bytes()
    p = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(path)], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert path.read_bytes() == before, "the checkpoint changed although its replacement never finished"
    assert [q.name for q in out.iterdir() if q.name.startswith(".checkpoint.")], "expected the dead write's temp file"
    assert T.load_checkpoint(str(out))["step"] == 3


def damaged_copies(src: Path, folder: Path):
    """(name, path, message fragment) of checkpoints truncated or tampered in various ways."""
    data = src.read_bytes()
    good = torch.load(src, map_location="cpu", weights_only=True)
    made = []

    def write(name, blob):
        p = folder / f"{name}.pt"
        p.write_bytes(blob)
        return p

    for cut in (0, 10, len(data) // 2, len(data) - 1):
        made.append((f"truncated_{cut}", write(f"truncated_{cut}", data[:cut]), "not a readable flowkern checkpoint"))
    made.append(("garbage", write("garbage", os.urandom(4096)), "not a readable flowkern checkpoint"))

    def saved(name, change, expect):
        c = {k: (type(v)(v) if isinstance(v, dict) else v) for k, v in good.items()}
        c["model"] = dict(good["model"], kwargs=dict(good["model"]["kwargs"]))
        change(c)
        p = folder / f"{name}.pt"
        torch.save(c, p)
        made.append((name, p, expect))

    saved("format", lambda c: c.__setitem__("format", "something-else"), "not a flowkern checkpoint")
    saved("version", lambda c: c.__setitem__("version", T.CHECKPOINT_VERSION + 1), "upgrade flowkern")
    saved("no_weights", lambda c: c.pop("model_state"), "'model_state' is missing")
    saved("no_optimizer", lambda c: c.pop("optimizer_state"), "'optimizer_state' is missing")
    saved("step_text", lambda c: c.__setitem__("step", "3"), "'step' is a str")
    saved("model_kind", lambda c: c["model"].__setitem__("kind", "nosuch"), "is not one flowkern train writes")
    name = next(iter(good["model_state"]))
    saved("weight_replaced", lambda c: c["model_state"].__setitem__(name, torch.zeros(7)), "sha256")
    weight = next(k for k, v in good["model_state"].items() if v.is_floating_point() and v.numel())
    nudged = good["model_state"][weight].clone()
    nudged.view(-1)[0] += 1e-3
    saved("weight_nudged", lambda c: c["model_state"].__setitem__(weight, nudged), "sha256")
    # The model's options edited, its checksum made consistent: the weights no longer fit.
    saved("model_options", lambda c: c["model"]["kwargs"].__setitem__("layers", 3), "do not fit")
    # One byte of a tensor flipped inside the zip (torch.load checks no CRC): the checksum sees it.
    import zipfile
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    flipped = bytearray(data)
    flipped[start + info.file_size // 2] ^= 0x10
    made.append(("bit_flip", write("bit_flip", bytes(flipped)), "sha256"))
    return made


class Evil:
    """A pickle that runs code when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_truncated_and_tampered_checkpoints_are_refused(run_dir, tmp_path, capsys):
    for name, path, expect in damaged_copies(run_dir / "checkpoint.pt", tmp_path):
        with pytest.raises(T.CheckpointError) as info:
            T.load_model(T.load_checkpoint(str(path)), torch.device("cpu"))
        msg = str(info.value)
        assert expect in msg and str(path) in msg, f"{name}: {msg}"
        # The command: exit code 2 and one line naming the file, no traceback.
        for args in (["eval", "--checkpoint", str(path), "--data", "synthetic:300"],
                     ["train", *map(str, ["--data", "synthetic:300", "--layers", 2, "--hidden", 16, "--batch-size",
                                          64, "--n-samples", 0, "--quiet", "--steps", 5]),
                      "--resume", str(path), "--out", str(tmp_path / f"resume_{name}")]):
            assert cli.main(args) == 2, (name, args[0])
            err = capsys.readouterr().err
            if name == "model_options" and args[0] == "train":
                # The edited options disagree with the command's own: refused as a usage error first.
                assert "differ from the checkpoint" in err, err
                continue
            assert "Traceback" not in err and str(path) in err and expect in err, (name, args[0], err)


def test_loading_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": T.CHECKPOINT_FORMAT, "version": 1, "model": Evil(str(marker))}, path)
    with pytest.raises(T.CheckpointError, match="not a readable flowkern checkpoint"):
        T.load_checkpoint(str(path))
    assert not marker.exists(), "unpickling ran code from the checkpoint"
    assert cli.main(["eval", "--checkpoint", str(path)]) == 2
    assert not marker.exists()


def test_checkpoint_is_weights_only_and_self_checking(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == T.CHECKPOINT_FORMAT and ckpt["step"] == 3
    assert ckpt["model_sha256"] == T.state_hash(ckpt["model_state"])
    model, _ = T.load_model(T.load_checkpoint(str(run_dir)), torch.device("cpu"))
    assert T.param_hash(model) == ckpt["model_sha256"]
    # A checkpoint from before the checksum was kept still loads.
    ckpt.pop("model_sha256")
    legacy = run_dir.parent / "legacy.pt"
    torch.save(ckpt, legacy)
    assert T.load_checkpoint(str(legacy))["step"] == 3
