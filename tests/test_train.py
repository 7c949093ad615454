"""flowkern.train: the training loop, exact resume, divergence, checkpoints, AUROC, histograms.

Every run here is a tiny model on synthetic digits for a few steps on the CPU."""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import flowkern
import flowkern.data
from flowkern import train as T

pytest.importorskip("torchvision")

TINY = {"data": "synthetic:600", "layers": 2, "hidden": 16, "batch_size": 64, "warmup": 3, "lr": 2e-3,
        "quiet": True, "n_samples": 4, "eval_limit": 40, "log_every": 2}


def run(tmp_path, name="run", **overrides):
    cfg = dict(TINY, out=str(tmp_path / name), **overrides)
    return T.train(cfg)


def state(path):
    return torch.load(os.path.join(path, "checkpoint.pt"), weights_only=True)


def assert_same_tensors(a, b, what):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


# ------------------------------------------------------------------------------- small pieces


def auroc_pairs(a, b):
    """The definition: P(out > in) + P(out == in) / 2 over all pairs."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    greater = (b[None, :] > a[:, None]).mean()
    ties = (b[None, :] == a[:, None]).mean()
    return greater + ties / 2


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, rng.integers(1, 40)).astype(float)  # many ties
        b = rng.integers(1, 8, rng.integers(1, 40)).astype(float)
        assert T.auroc(a, b) == pytest.approx(auroc_pairs(a, b), abs=1e-12)
    a, b = rng.normal(size=300), rng.normal(0.5, 1, size=200)
    assert T.auroc(a, b) == pytest.approx(auroc_pairs(a, b), abs=1e-12)


def test_auroc_edge_cases():
    assert T.auroc([1, 2, 3], [4, 5]) == 1.0
    assert T.auroc([4, 5], [1, 2, 3]) == 0.0
    assert T.auroc([2, 2], [2, 2, 2]) == 0.5
    assert T.auroc([1.0, np.inf], [np.inf, 3.0]) == pytest.approx(auroc_pairs([1, np.inf], [np.inf, 3]))
    with pytest.raises(ValueError, match="NaN"):
        T.auroc([1.0, np.nan], [2.0])
    with pytest.raises(ValueError, match="both sets"):
        T.auroc([], [1.0])


def test_lr_schedule():
    f = [T.lr_factor(s, 4, 20, "cosine") for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x >= y for x, y in zip(f[3:], f[4:]))  # non-increasing after warmup
    assert 0 < f[-1] < 0.01
    assert [T.lr_factor(s, 2, 20, "constant") for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]
    assert T.lr_factor(0, 0, 10, "cosine") == 1.0


def test_histogram_png_draws_both_sets(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = T.histogram_png(str(tmp_path / "h.png"), [("in", rng.normal(1.5, 0.2, 500)),
                                                      ("out", np.append(rng.normal(3, 0.3, 300), np.inf))], "title")
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert img.shape == (460, 760, 3)

    def has(colour):
        return (np.abs(img - np.array(colour)).sum(-1) < 30).sum() > 50

    assert has((31, 119, 180)) and has((255, 127, 14))  # the two series' colours
    # Degenerate input (one value, or nothing finite) still draws.
    T.histogram_png(str(tmp_path / "d.png"), [("a", np.ones(5)), ("b", np.array([np.inf]))], "t")


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with T.atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary file left behind
    with T.atomic_path(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(T.CheckpointError, match="no checkpoint"):
        T.load_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(T.CheckpointError, match="not a flowkern checkpoint"):
        T.load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(T.CheckpointError, match="not a readable"):
        T.load_checkpoint(str(tmp_path / "junk.pt"))


# ------------------------------------------------------------------------------------ training


def test_train_writes_the_run_folder(tmp_path):
    summary = run(tmp_path, steps=12, eval_every=5)
    out = tmp_path / "run"
    names = set(os.listdir(out))
    assert {"checkpoint.pt", "config.json", "metrics.jsonl", "metrics.csv", "summary.json",
            "samples_t1.0.png", "samples_t0.7.png", "samples_t0.5.png", "samples"} <= names
    assert sorted(os.listdir(out / "samples")) == ["epoch_001_t0.5.png", "epoch_001_t0.7.png", "epoch_001_t1.0.png"]
    assert not [n for n in names if n.endswith(".tmp") or ".tmp." in n]

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8, 10, 12]  # log every 2, eval every 5, epoch (8), end
    assert set(rows[0]) == set(T.METRIC_FIELDS)
    evaluated = [r["step"] for r in rows if r["test_bpd"] is not None]
    assert evaluated == [5, 8, 10, 12]
    assert all(math.isfinite(r["train_bpd"]) and r["img_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert rows[-1]["epoch"] == pytest.approx(12 / 8, abs=1e-3)
    with open(out / "metrics.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == ",".join(T.METRIC_FIELDS) and len(lines) == len(rows) + 1

    config = json.load(open(out / "config.json"))
    assert config["config"]["steps"] == 12 and config["resolved"]["total_steps"] == 12
    assert config["resolved"]["steps_per_epoch"] == 8 and config["resolved"]["optimizer"].startswith("AdamW")
    assert summary["step"] == 12 and summary["test_bpd"] == rows[-1]["test_bpd"]
    assert json.load(open(out / "summary.json"))["param_sha256_per_rank"] == summary["param_sha256_per_rank"]

    ckpt = T.load_checkpoint(str(out / "checkpoint.pt"))
    assert ckpt["step"] == 12 and ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 4
    assert ckpt["model"]["kind"] == "realnvp" and ckpt["model"]["data_shape"] == [1, 28, 28]
    assert set(ckpt["rng"][0]) >= {"torch", "python", "numpy"}
    assert ckpt["metrics"] == rows
    # The checkpoint alone rebuilds the trained model.
    model, spec = T.load_model(ckpt, torch.device("cpu"))
    assert T.param_hash(model) == summary["param_sha256_per_rank"][0]
    assert any(isinstance(m, flowkern.nn.ActNorm) and bool(m.initialized) for m in model.modules())


def test_training_lowers_bits_per_dim(tmp_path):
    run(tmp_path, steps=40, eval_every=0, log_every=0, lr=3e-3, warmup=5)
    rows = state(tmp_path / "run")["metrics"]
    assert rows[-1]["test_bpd"] < rows[0]["test_bpd"]
    assert rows[-1]["test_bpd"] < 4.0  # far below 8 bits/dim (a uniform model)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_resume_is_exact(tmp_path, schedule):
    """N steps straight == N/2 (stopped mid-epoch, as if interrupted) + resume to N: same
    parameters, optimizer state, RNG state and metrics, bit for bit."""
    args = dict(steps=14, schedule=schedule, eval_every=4, checkpoint_every=3)
    run(tmp_path, "straight", **args)
    run(tmp_path, "split", stop_at=5, **args)  # epoch 0, batch 5 of 8
    assert state(tmp_path / "split")["step"] == 5 and state(tmp_path / "split")["batch_in_epoch"] == 5
    # An interrupted run may have logged past its last checkpoint: resume drops those rows.
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 999}) + "\n")
    cfg = dict(TINY, out=str(tmp_path / "split"), resume=str(tmp_path / "split" / "checkpoint.pt"), **args)
    T.train(cfg)
    a, b = state(tmp_path / "straight"), state(tmp_path / "split")
    assert a["step"] == b["step"] == 14
    assert_same_tensors(a["model_state"], b["model_state"], "model")
    assert_same_tensors(a["optimizer_state"], b["optimizer_state"], "optimizer")
    assert_same_tensors(a["scheduler_state"], b["scheduler_state"], "scheduler")
    assert_same_tensors(a["rng"][0]["torch"], b["rng"][0]["torch"], "rng")

    # The same numbers at the same steps; the split run also logged its stop (step 5), which
    # shortens the train-bpd window of its next row.
    def numbers(rows):
        return [(r["step"], r["test_bpd"], r["lr"]) for r in rows if r["step"] != 5]

    assert numbers(a["metrics"]) == numbers(b["metrics"])
    def later_train_bpd(rows):
        return [r["train_bpd"] for r in rows if r["step"] > 6]

    assert later_train_bpd(a["metrics"]) == later_train_bpd(b["metrics"])
    assert [json.loads(line)["step"] for line in open(tmp_path / "split" / "metrics.jsonl")] == \
        [r["step"] for r in b["metrics"]]
    assert 999 not in [r["step"] for r in b["metrics"]]


def test_resume_extends_and_refuses_a_different_model(tmp_path):
    run(tmp_path, steps=4)
    base = dict(TINY, out=str(tmp_path / "run"), resume=str(tmp_path / "run"))
    summary = T.train(dict(base, steps=6))
    assert summary["step"] == 6
    assert T.train(dict(base, steps=6))["step"] == 6  # nothing left to do
    with pytest.raises(T.UsageError, match="hidden=16, not 32"):
        T.train(dict(base, steps=8, hidden=32))
    with pytest.raises(T.UsageError, match="already holds a run"):
        run(tmp_path, steps=2)
    assert run(tmp_path, steps=2, overwrite=True)["step"] == 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    forward = T._BitsPerDim.forward
    calls = itertools.count(1)

    def poisoned(self, pixels):
        bpd = forward(self, pixels)
        return bpd * float("nan") if next(calls) == 7 else bpd

    monkeypatch.setattr(T._BitsPerDim, "forward", poisoned)
    with pytest.raises(T.TrainingDiverged) as info:
        run(tmp_path, steps=20, checkpoint_every=5)
    msg = str(info.value)
    assert "non-finite loss at step 7" in msg and "step 5" in msg and "checkpoint.pt" in msg and "--lr" in msg
    assert info.value.step == 7
    ckpt = state(tmp_path / "run")
    assert ckpt["step"] == 5
    assert all(torch.isfinite(t).all() for t in ckpt["model_state"].values() if t.is_floating_point())
    # The kept checkpoint resumes.
    monkeypatch.setattr(T._BitsPerDim, "forward", forward)
    assert T.train(dict(TINY, out=str(tmp_path / "run"), resume=str(tmp_path / "run"), steps=8))["step"] == 8


def test_non_finite_gradient_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(T.TrainingDiverged, match="non-finite gradient norm at step 1 .*no checkpoint"):
        run(tmp_path, steps=3)


@pytest.mark.parametrize("options", [
    dict(coupling="additive", norm="batchnorm"),
    dict(coupling="spline", norm="none", bins=4),
    dict(model="glow", levels=2, layers=1, hidden=8),
], ids=["additive-batchnorm", "spline", "glow"])
def test_model_variants_train_sample_and_score(tmp_path, options):
    summary = run(tmp_path, steps=3, **options)
    assert math.isfinite(summary["test_bpd"])
    ckpt = T.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    model, spec = T.load_model(ckpt, torch.device("cpu"))
    pixels = T.sample_pixels(model, spec, 5, 0.7, device=torch.device("cpu"))
    assert pixels.shape == (5, 1, 28, 28) and pixels.dtype == torch.uint8
    paths = T.sample(str(tmp_path / "run"), str(tmp_path / "s.png"), n=6, temperatures=(0.5, 1.0))
    assert [os.path.basename(p) for p in paths] == ["s_t0.5.png", "s_t1.png"]


def test_memory_saving_trains_the_same_model(tmp_path, monkeypatch):
    """--memory-saving: backprop through the inverses, the same parameters after training
    (to float32 round-off), and the flow really ran that way."""
    from flowkern.nn import memory

    calls = []
    forward = memory.memory_saving_forward
    monkeypatch.setattr(memory, "memory_saving_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    args = dict(steps=4, eval_every=0, log_every=0, n_samples=0)
    run(tmp_path, "standard", **args)
    assert not calls
    run(tmp_path, "saving", memory_saving=True, **args)
    assert len(calls) >= 4
    a, b = state(tmp_path / "standard")["model_state"], state(tmp_path / "saving")["model_state"]
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-4, msg=k)
    config = json.load(open(tmp_path / "saving" / "config.json"))["config"]
    assert config["memory_saving"] is True
    # The checkpoint's model is the plain model: it loads and samples as any other.
    model, _ = T.load_model(T.load_checkpoint(str(tmp_path / "saving" / "checkpoint.pt")), torch.device("cpu"))
    assert model.memory_saving is False


@pytest.mark.slow
def test_compiled_objective_has_the_eager_gradients():
    """The objective --compile trains, compiled, gives eager's loss and gradients. Without
    dequantization: a traced step draws its noise with torch.rand instead of the kernel's
    counter noise (another stream)."""
    torch._dynamo.reset()
    spec = T.model_spec(dict(T.TRAIN_DEFAULTS, layers=2, hidden=8, dequantize="none"), (1, 28, 28))
    torch.manual_seed(0)
    model = T.build_model(spec)
    pixels = flowkern.data.synthetic_digits(16)
    with torch.no_grad():
        T.bits_per_dim(model, spec, pixels)  # ActNorm's initialisation
    net = T._BitsPerDim(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    eager_loss = net(pixels).mean()
    eager = torch.autograd.grad(eager_loss, params)
    compiled_loss = torch.compile(net, dynamic=False)(pixels).mean()
    compiled = torch.autograd.grad(compiled_loss, params)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    for p, a, b in zip(params, eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-30)


@pytest.mark.slow
def test_compile_runs_and_resumes_as_one_graph(tmp_path):
    """flowkern train --compile: no graph break, fresh or resumed (a loaded ActNorm re-reads its
    initialised flag, which must not happen inside the graph); a resumed compiled run ends where
    a straight one does; the compile step stays out of img/s."""
    from torch._dynamo.utils import counters

    args = dict(steps=3, eval_every=0, log_every=1, n_samples=0, layers=1, hidden=8, dequantize="none", compile=True)
    torch._dynamo.reset()
    counters.clear()
    run(tmp_path, "straight", **args)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] >= 1
    rows = state(tmp_path / "straight")["metrics"]
    assert rows[0]["img_per_s"] is None and rows[1]["img_per_s"] > 0
    run(tmp_path, "split", stop_at=2, **args)
    torch._dynamo.reset()
    counters.clear()
    T.train(dict(TINY, out=str(tmp_path / "split"), resume=str(tmp_path / "split"), **args))
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Bit-equal (was rtol 1e-6 / atol 1e-7): both runs execute the same compiled graph on the same
    # batches in the same process and CPU, so any difference is a resume bug, not rounding.
    a, b = state(tmp_path / "straight")["model_state"], state(tmp_path / "split")["model_state"]
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_option_errors(tmp_path):
    with pytest.raises(T.UsageError, match="--out"):
        T.train(dict(TINY))
    with pytest.raises(T.UsageError, match="not both"):
        run(tmp_path, steps=2, epochs=1)
    with pytest.raises(T.UsageError, match="fewer than --batch-size"):
        run(tmp_path, steps=2, batch_size=4096)
    with pytest.raises(T.UsageError, match="glow uses affine"):
        run(tmp_path, steps=2, model="glow", coupling="spline")
    with pytest.raises(T.UsageError, match="divisible by 2"):
        run(tmp_path, steps=2, model="glow", levels=3)
    with pytest.raises(T.UsageError, match="--lr"):
        run(tmp_path, steps=2, lr=-1.0)
    with pytest.raises(T.UsageError, match="unknown training options"):
        run(tmp_path, steps=2, learning_rate=1.0)
    with pytest.raises(T.UsageError, match="--memory-saving takes an int >= 1"):
        run(tmp_path, steps=2, memory_saving=0)
    with pytest.raises(T.UsageError, match="choose one"):
        run(tmp_path, steps=2, memory_saving=True, compile=True)


def test_evaluate_and_ood(tmp_path):
    run(tmp_path, steps=10, lr=3e-3)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    r = T.evaluate(ckpt, limit=30)
    assert r["images"] == 30 and r["split"] == "test" and 0 < r["bpd"] < 8 and r["bpd_std_error"] > 0
    assert T.evaluate(ckpt, limit=30, seed=3)["bpd"] != r["bpd"]  # another noise draw
    assert T.evaluate(ckpt, limit=30)["bpd"] == r["bpd"]  # the same one
    o = T.ood(ckpt, "noise:200", limit=20)
    assert o["auroc"] > 0.9 and not o["out_more_likely"]
    out = tmp_path / "run" / "ood"
    assert sorted(os.listdir(out)) == ["bpd_in.npy", "bpd_out.npy", "ood.json", "ood_histogram.png", "ood_scores.csv"]
    bpd_in, bpd_out = np.load(out / "bpd_in.npy"), np.load(out / "bpd_out.npy")
    assert bpd_in.shape == (20,) and bpd_out.shape == (20,)
    assert o["auroc"] == T.auroc(bpd_in, bpd_out) and o["in"]["mean"] == pytest.approx(bpd_in.mean())
    from flowkern import data

    data.write_idx(tmp_path / "small.gz", torch.zeros(20, 14, 14, dtype=torch.uint8))
    with pytest.raises(T.UsageError, match=r"shape \(1, 14, 14\), the model takes \(1, 28, 28\)"):
        T.evaluate(ckpt, data=f"idx:{tmp_path / 'small.gz'}")
