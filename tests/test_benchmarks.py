"""The benchmark suite's own machinery (benchmarks/): the data it trains on, the peers' models,
the memory measurement and a tiny end-to-end run. No test asserts a time."""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import training
from benchmarks.peers import GLOW_PEERS, PEERS
from flowkern import data as fkdata
from flowkern.models import Glow, RealNVP


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_load_images_reads_mnist_from_root_and_says_so(tmp_path):
    images = fkdata.synthetic_digits(20, seed=3)
    fkdata.write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images[:, 0])
    fkdata.write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), images[:5, 0])
    got, desc = training.load_images.__wrapped__(8, str(tmp_path))
    assert desc.startswith("MNIST from") and torch.equal(got, images[:8])


def test_load_images_falls_back_to_synthetic_digits_and_says_why(tmp_path):
    got, desc = training.load_images.__wrapped__(8, str(tmp_path))
    assert got.shape == (8, 1, 28, 28) and got.dtype == torch.uint8
    assert "synthetic" in desc and "no usable MNIST" in desc
    got, desc = training.load_images.__wrapped__(8, None)
    assert "synthetic" in desc and "--root" not in desc


@pytest.mark.parametrize("peer", sorted(PEERS))
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_realnvp_peers_build_flowkerns_architecture(peer, coupling):
    model = PEERS[peer](784, 2, 16, coupling)
    if model is None:
        pytest.skip(f"{peer} is not installed")
    assert _params(model) == _params(RealNVP(784, layers=2, hidden=16, coupling=coupling))
    x = torch.randn(5, 784)
    lp = model.log_prob(x)
    assert lp.shape == (5,) and lp.isfinite().all()
    lp.sum().backward()
    with torch.no_grad():
        assert model.sample(3).shape == (3, 784)


def test_glow_peer_builds_flowkerns_architecture():
    model = GLOW_PEERS["normflows"]((1, 28, 28), 2, 1, 8)
    if model is None:
        pytest.skip("normflows is not installed")
    assert _params(model) == _params(Glow((1, 28, 28), levels=2, steps=1, hidden=8))
    x = torch.randn(2, 1, 28, 28)
    assert model.log_prob(x).shape == (2,)
    with torch.no_grad():
        assert model.sample(2).shape == (2, 1, 28, 28)


def test_step_peak_bytes_follows_live_tensors():
    x = torch.randn(1000, 1000)  # 4 MB

    def step():
        y = x * 2
        z = y + 1
        del y
        return z.sum()

    assert training.step_peak_bytes(step, "cpu") == 8_000_000  # y and z at once


@pytest.mark.parametrize("norm, first_needs_grad", [(None, False), ("actnorm", True)])
def test_conditioner_floor_steps_the_conditioners_alone(norm, first_needs_grad):
    from flowkern.models import RealNVP

    torch.manual_seed(0)
    model = RealNVP(12, layers=3, hidden=5, coupling="affine", norm=norm)
    x = torch.randn(4, 12)
    with torch.no_grad():
        model.log_prob(x)  # ActNorm's initialisation
    nets = [m.conditioner for m in model.modules() if hasattr(m, "conditioner")]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = training.conditioner_floor_step(model, x)
    seen = []
    for net in nets:
        net[0].register_forward_hook(lambda mod, args, out: seen.append((tuple(args[0].shape), args[0].requires_grad)))
    step()
    # What log_prob feeds them: the first reads the data, unless a layer with parameters sits before it.
    assert seen == [((4, 6), first_needs_grad), ((4, 6), True), ((4, 6), True)]
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (".conditioner." in name), name  # AdamW stepped the conditioners, nothing else


def test_conditioner_floor_of_glow_runs_its_convnets():
    from flowkern.models import Glow

    model = Glow((1, 8, 8), levels=2, steps=1, hidden=4)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        model.log_prob(x)
    shapes = []
    for m in model.modules():
        if hasattr(m, "conditioner"):
            m.conditioner.register_forward_hook(lambda mod, args, out: shapes.append(args[0].dim()))
    training.conditioner_floor_step(model, x)()
    assert shapes and set(shapes) == {4}
    assert training.conditioner_floor_step(torch.nn.Linear(2, 2), x) is None


@pytest.mark.slow
def test_compiled_rows_measure_their_flow_from_the_compiled_ceiling(monkeypatch):
    tiny = training.Config("realnvp", "affine", None, 2, 8, 4)  # compile=True
    monkeypatch.setitem(training.CONFIGS, "quick", [tiny])
    timer = training._time_interleaved
    monkeypatch.setattr(training, "_time_interleaved", lambda fns, device, budget_s: timer(fns, device, 1e-4))
    rows, table = training.train_suite("cpu", True, 0.0)
    ms = {r.impl: r.median_us / 1e3 for r in rows}
    flow = {r.impl: r.extra["flow_ms"] for r in rows}
    assert {"compile", training.FLOOR, training.FLOOR_COMPILED} <= set(ms)
    for name in ms:
        if name in (training.FLOOR, training.FLOOR_COMPILED):
            assert flow[name] is None
        else:
            floor = training.FLOOR_COMPILED if "compile" in name else training.FLOOR
            assert flow[name] == pytest.approx(ms[name] - ms[floor])
    assert training.FLOOR_COMPILED in table


def test_no_compile_leaves_out_every_compiled_row(tmp_path, monkeypatch):
    from benchmarks import __main__ as cli
    from benchmarks import common

    monkeypatch.setattr(common, "COMPILE", True)  # main sets it; restored after the test
    monkeypatch.setitem(training.CONFIGS, "quick", [training.Config("realnvp", "affine", None, 2, 8, 4)])
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    timer = training._time_interleaved
    monkeypatch.setattr(training, "_time_interleaved", lambda fns, device, budget_s: timer(fns, device, 1e-4))
    assert cli.main(["--only", "train", "--no-compile", "--name", "nc"]) == 0
    rows = json.loads((tmp_path / "nc.json").read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"eager", "flowkern", training.FLOOR} <= impls
    assert not [i for i in impls if "compile" in i]
    assert common.compiled(lambda x: x) is None


@pytest.mark.slow
def test_ceiling_suite_on_tiny_models(tmp_path, monkeypatch):
    from benchmarks import ceiling, common

    tiny = [training.Config("realnvp", "affine", None, 2, 8, 4), training.Config("realnvp", "affine", "actnorm", 2, 8, 4)]
    monkeypatch.setitem(training.CONFIGS, "quick", tiny)
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    assert ceiling.main(["--budget", "0.01", "--only", "RealNVP"]) == 0
    rows = json.loads((tmp_path / "ceiling-cpu.json").read_text())["rows"]
    assert [r["case"] for r in rows] == [c.name for c in tiny]
    for r in rows:
        e = r["extra"]
        assert {"eager", "flowkern", ceiling.EAGER_FLOOR, ceiling.COMPILED_FLOOR} <= set(e)
        assert r["median_us"] == pytest.approx(1e3 * min(e[ceiling.EAGER_FLOOR], e[ceiling.COMPILED_FLOOR]))
        assert e["ceiling_vs_eager"] == pytest.approx(e["eager"] / (r["median_us"] / 1e3))
    with pytest.raises(SystemExit):
        ceiling.main(["--only", "no such model"])
    installed = any(build(784, 2, 8, "affine") is not None for build in training.PEERS.values())
    assert (rows[0]["extra"]["best_peer"] is not None) == installed  # peers only on logits input
    assert rows[1]["extra"]["best_peer"] is None


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_every_result(tmp_path, monkeypatch):
    from benchmarks import __main__ as cli
    from benchmarks import common

    tiny = [training.Config("realnvp", "affine", None, 2, 8, 4, compile=False),
            training.Config("realnvp", "spline", "actnorm", 2, 8, 4, compile=False),
            training.Config("glow", layers=1, hidden=4, batch=2, compile=False)]
    monkeypatch.setitem(training.CONFIGS, "quick", tiny)
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    timer = training._time_interleaved
    monkeypatch.setattr(training, "_time_interleaved", lambda fns, device, budget_s: timer(fns, device, 1e-4))
    root = tmp_path / "mnist"
    root.mkdir()
    images = fkdata.synthetic_digits(8, seed=5)[:, 0]
    fkdata.write_idx(str(root / "train-images-idx3-ubyte"), images)
    fkdata.write_idx(str(root / "t10k-images-idx3-ubyte"), images[:2])
    assert cli.main(["--quick", "--only", "train", "--only", "sample", "--root", str(root), "--name", "t"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["machine"]["data"] == f"MNIST from {root}"
    rows = result["rows"]
    assert {r["suite"] for r in rows} == {"train", "sample"}
    for cfg in tiny:
        impls = {r["impl"] for r in rows if r["case"] == cfg.name and r["suite"] == "train"}
        assert {"eager"} <= impls
        assert training.FLOOR in impls  # the conditioners-only ceiling
        assert training.FLOOR_COMPILED not in impls  # only beside compiled rows (none in these configs)
        for r in rows:
            if r["case"] == cfg.name and r["suite"] == "train" and r["impl"] != training.FLOOR:
                assert r["extra"]["flow_ms"] is not None
        if cfg.model == "glow" and GLOW_PEERS["normflows"]((1, 28, 28), 1, 1, 2) is not None:
            assert "normflows" in impls
    md = (tmp_path / "t.md").read_text()
    assert "peak MB" in md and "Sampling" in md and f"MNIST from {root}" in md
    if os.path.exists(tmp_path / "t.png"):
        assert (tmp_path / "t.png").stat().st_size > 0


def test_lowdim_peers_build_the_same_maf():
    """nflows' MaskedAffineAutoregressiveTransform stack and flowkern's MAF hold the same
    parameters: MADEs of 3 masked hidden layers of 50 with a context layer, per layer."""
    pytest.importorskip("nflows")
    from benchmarks import lowdim

    ours = lowdim.flowkern_model("maf", 5, 20, "sigmoid")
    theirs = lowdim.nflows_model("maf", 5, 20)
    shapes = sorted(tuple(p.shape) for p in ours.parameters())
    assert shapes == sorted(tuple(p.shape) for p in theirs.parameters())


def test_lowdim_suite_on_tiny_sizes(monkeypatch):
    from benchmarks import lowdim

    monkeypatch.setattr(lowdim, "SIZES_QUICK", [(2, 3, 8)])
    monkeypatch.setattr(lowdim, "LAYERS", 2)
    rows, table = lowdim.lowdim_suite("cpu", True, 0.01)
    kinds = {r.case.split()[-1] for r in rows}
    assert kinds == {"maf", "nsf", "nsf-ar"}
    assert all(r.extra["aten_ops_per_step"] > 0 and r.extra["sample_per_s"] > 0 for r in rows)
    assert "aten ops / step" in table


def test_interop_suite_on_tiny_sizes(monkeypatch):
    pytest.importorskip("nflows")
    pytest.importorskip("zuko")
    from benchmarks import interop, lowdim

    monkeypatch.setattr(interop, "SIZES_QUICK", [(2, 3, 8)])
    monkeypatch.setattr(lowdim, "LAYERS", 2)
    rows, table = interop.interop_suite("cpu", True, 0.01)
    runs = {(r.case.split(" ", 3)[-1], r.impl) for r in rows}
    assert {("nflows nsf", "accelerated"), ("zuko nsf", "floor"), ("nflows maf_rqs", "plain"), ("nflows maf", "accelerated"),
            ("zuko maf", "accelerated")} <= runs
    fast = [r for r in rows if r.impl == "accelerated"]
    assert fast and all(r.extra["aten_ops_per_step"] > 0 and "gain_taken" in r.extra for r in fast)
    # the accelerated models run fewer aten ops than the plain ones
    plain = {r.case: r.extra["aten_ops_per_step"] for r in rows if r.impl == "plain"}
    assert all(r.extra["aten_ops_per_step"] < plain[r.case] for r in fast)
    assert "gain taken" in table
    assert all(r.extra["samples"] == 100 * 100 and r.extra["epoch_s"] > 0 for r in rows if r.impl != "floor")
    assert "epoch s" in table and "10^4 posterior samples" in table


def test_interop_mnist_row(monkeypatch):
    """--full's MNIST-size nflows spline RealNVP row, shrunk: accelerated, context-free sampling."""
    pytest.importorskip("nflows")
    from benchmarks import interop

    monkeypatch.setattr(interop, "SIZES_FULL", [])
    monkeypatch.setattr(interop, "MNIST_FEATURES", 12)
    monkeypatch.setattr(interop, "MNIST_BATCH", 8)
    monkeypatch.setattr(interop, "MNIST_DRAWS", 5)
    rows, table = interop.interop_suite("cpu", False, 0.01)
    assert {r.impl for r in rows} == {"plain", "accelerated", "floor"}
    assert all("MNIST size" in r.case for r in rows)
    fast = next(r for r in rows if r.impl == "accelerated")
    assert fast.extra["samples"] == 5 and fast.extra["aten_ops_per_step"] < next(
        r for r in rows if r.impl == "plain").extra["aten_ops_per_step"]
