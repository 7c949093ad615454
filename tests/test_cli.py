"""The `flowkern` command: help texts, exit codes and messages, an end-to-end run on tiny
generated IDX files (train, sample, eval, ood), and a 2-process torchrun (gloo) training."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flowkern import cli, data

pytest.importorskip("torchvision")

TINY = ["--layers", "2", "--hidden", "16", "--batch-size", "32", "--warmup", "2", "--n-samples", "4", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def write_mnist_like(root, n_train=256, n_test=48):
    """Tiny MNIST in torchvision's layout (ROOT/MNIST/raw, .gz), from the synthetic digits."""
    digits = data.synthetic_digits(n_train + n_test, seed=5)[:, 0]
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    data.write_idx(os.path.join(raw, "train-images-idx3-ubyte.gz"), digits[:n_train])
    data.write_idx(os.path.join(raw, "t10k-images-idx3-ubyte.gz"), digits[n_train:])
    return root


def test_help_texts(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "sample", "eval", "ood"):
        assert command in out
    for command, flags in {
        "train": ["--data", "--root", "--download", "--out", "--steps", "--epochs", "--batch-size", "--lr", "--layers",
                  "--hidden", "--seed", "--backend", "--resume", "--model", "--coupling", "--norm", "--warmup",
                  "--clip", "idx:TRAIN,TEST", "synthetic", "torchrun", "exit codes", "--compile",
                  "--memory-saving"],
        "sample": ["--checkpoint", "--n", "--temperature", "--out"],
        "eval": ["--checkpoint", "--data", "--split"],
        "ood": ["--checkpoint", "--in-data", "--out-data", "AUROC", "Nalisnick", "noise"],
    }.items():
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for flag in flags:
            assert flag in out, (command, flag)
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2  # a command is required
    assert cli.main(["train", "--steps", "0"]) == 2
    assert cli.main(["train", "--steps", "2", "--epochs", "2", "--out", "x"]) == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("flags, memory_saving, compile", [
    ([], False, False), (["--memory-saving"], True, False), (["--memory-saving", "3"], 3, False),
    (["--compile"], False, True), (["--memory-saving", "0", "--no-compile"], False, False)])
def test_memory_saving_and_compile_flags(flags, memory_saving, compile):
    parser = cli.build_parser()
    argv = ["train", "--out", "x", *flags]
    cfg = cli._train_config(parser.parse_args(argv), cli._explicit(parser, "train", argv))
    assert cfg["memory_saving"] == memory_saving and cfg["compile"] == compile


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("flowkern") == "flowkern.cli:console_main"


def test_missing_dataset_exits_2_without_traceback(tmp_path):
    """Through `python -m flowkern`, as a user runs it: one message, the path, the flags."""
    root = tmp_path / "data"
    p = subprocess.run([sys.executable, "-m", "flowkern", "train", "--data", "mnist", "--root", str(root),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert str(root / "MNIST" / "raw") in p.stderr
    for flag in ("--download", "--data idx:", "--data synthetic"):
        assert flag in p.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_errors_are_messages(tmp_path, capsys):
    assert cli.main(["train", "--data", "synthetic:300"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["train", "--data", "idx:" + str(tmp_path / "none.gz"), "--out", str(tmp_path / "r")]) == 2
    assert str(tmp_path / "none.gz") in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--data", "synthetic:300", "--out", str(tmp_path / "r"), "--model", "glow",
                     "--levels", "3", *TINY]) == 2
    assert "levels" in capsys.readouterr().err


def test_non_finite_loss_exits_1(tmp_path, capsys, monkeypatch):
    from flowkern import train as T

    monkeypatch.setattr(T._BitsPerDim, "forward", lambda self, x: torch.full((x.shape[0],), float("nan")) + 0 * sum(
        p.sum() for p in self.parameters()))
    assert cli.main(["train", "--data", "synthetic:300", "--out", str(tmp_path / "r"), "--steps", "3", *TINY]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 1" in err and "no checkpoint had been written yet" in err


def test_end_to_end_train_resume_sample_eval_ood(tmp_path, capsys):
    root = write_mnist_like(str(tmp_path / "data"))
    run = str(tmp_path / "run")
    common = ["--data", "mnist", "--root", root, "--out", run, *TINY]
    assert cli.main(["train", *common, "--steps", "12", "--stop-at", "6"]) == 0
    assert json.load(open(os.path.join(run, "summary.json")))["stopped_early"] is True
    # Resume with only --out: the run's own options, carried on to --steps.
    assert cli.main(["train", "--out", run, "--resume", "--quiet"]) == 0
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["step"] == 12 and not summary["stopped_early"]
    assert cli.main(["train", "--out", run, "--resume", "--steps", "14", "--quiet"]) == 0
    assert json.load(open(os.path.join(run, "summary.json")))["step"] == 14
    assert cli.main(["train", "--out", run, "--resume", "--hidden", "8", "--quiet"]) == 2
    assert "hidden=16, not 8" in capsys.readouterr().err
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["config"]["data"] == "mnist" and config["resolved"]["data"]["train"] == 256
    ckpt = os.path.join(run, "checkpoint.pt")
    capsys.readouterr()

    grid = str(tmp_path / "grid.png")
    assert cli.main(["sample", "--checkpoint", ckpt, "--n", "9", "--temperature", "0.7", "--out", grid]) == 0
    from PIL import Image

    assert Image.open(grid).size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)  # 3x3 grid, 2-pixel padding
    assert grid in capsys.readouterr().out

    assert cli.main(["eval", "--checkpoint", ckpt, "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    result = json.load(open(tmp_path / "e.json"))
    assert result["images"] == 48 and 0 < result["bpd"] < 8 and f"{result['bpd']:.4f}" in out

    ood_dir = str(tmp_path / "ood")
    assert cli.main(["ood", "--checkpoint", ckpt, "--out-data", "noise:400", "--out", ood_dir]) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out
    report = json.load(open(os.path.join(ood_dir, "ood.json")))
    assert report["auroc"] > 0.9 and report["in"]["n"] == 48 and report["out"]["n"] == 40
    assert np.load(os.path.join(ood_dir, "bpd_in.npy")).shape == (48,)
    assert Image.open(os.path.join(ood_dir, "ood_histogram.png")).size == (760, 460)
    assert cli.main(["ood", "--checkpoint", ckpt, "--out-data", "inverted:mnist", "--out", ood_dir,
                     "--limit", "10"]) == 0
    assert json.load(open(os.path.join(ood_dir, "ood.json")))["out"]["n"] == 10


def test_idx_pair_and_holdout(tmp_path):
    digits = data.synthetic_digits(300, seed=7)[:, 0]
    data.write_idx(tmp_path / "all.gz", digits)
    run = str(tmp_path / "run")
    assert cli.main(["train", "--data", f"idx:{tmp_path / 'all.gz'}", "--holdout", "60", "--out", run,
                     "--steps", "2", *TINY]) == 0
    resolved = json.load(open(os.path.join(run, "config.json")))["resolved"]["data"]
    assert (resolved["train"], resolved["test"]) == (240, 60)


@pytest.mark.distributed
def test_torchrun_two_processes_gloo(tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): DDP, a DistributedSampler, rank-0 files;
    both ranks end with the same parameters (each rank's hash lands in summary.json)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flowkern", "train", "--data", "synthetic:400", "--out", run, "--steps", "5", "--log-every", "1",
           "--norm", "actnorm", *TINY]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["world_size"] == 2 and summary["step"] == 5
    hashes = summary["param_sha256_per_rank"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert p.stderr.count("done: step 5/5") + p.stdout.count("done: step 5/5") == 1  # rank 0 reports alone
    config = json.load(open(os.path.join(run, "config.json")))["resolved"]
    assert config["world_size"] == 2 and config["local_batch"] == 16
    ckpt = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # each rank its own noise
    # The parameters in the checkpoint are the ones both ranks hold.
    from flowkern import train as T

    model, _ = T.load_model(T.load_checkpoint(os.path.join(run, "checkpoint.pt")), torch.device("cpu"))
    assert T.param_hash(model) == hashes[0]
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # written once, by rank 0


@pytest.mark.distributed
def test_torchrun_resume_is_exact(tmp_path):
    """2 ranks, 6 steps straight == 3 steps, stop, resume to 6: every rank's RNG stream and the
    sampler position come back from the checkpoint, so the parameters match bit for bit."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "flowkern", "train", *args]
        p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180, cwd=str(tmp_path))
        assert p.returncode == 0, p.stdout + p.stderr

    common = ["--data", "synthetic:400", "--steps", "6", "--eval-every", "2", *TINY]
    torchrun(*common, "--out", str(tmp_path / "straight"))
    torchrun(*common, "--out", str(tmp_path / "split"), "--stop-at", "3")
    torchrun("--out", str(tmp_path / "split"), "--resume", "--quiet")
    a, b = (json.load(open(tmp_path / name / "summary.json")) for name in ("straight", "split"))
    assert b["step"] == 6 and a["param_sha256_per_rank"] == b["param_sha256_per_rank"]
