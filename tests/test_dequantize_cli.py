"""flowkern train --dequantize uniform|variational|none and eval --samples K (issue: variational
dequantization), on tiny synthetic digits."""
from __future__ import annotations

import json

import pytest

from flowkern import cli

pytest.importorskip("torchvision")

TINY = ["--data", "synthetic:300", "--layers", "2", "--hidden", "16", "--batch-size", "32", "--warmup", "2",
        "--n-samples", "0", "--quiet", "--threads", "1"]


def test_none_diverges_with_the_seed_explanation(tmp_path, capsys):
    """Raw integer pixels: the density piles onto the 256 values, the loss runs to -inf and the
    non-finite guard stops training with a message saying the data must be dequantized."""
    code = cli.main(["train", "--out", str(tmp_path / "none"), "--dequantize", "none", "--steps", "400",
                     "--scale", "exp", "--norm", "none", *TINY])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "non-finite" in err and "must be dequantized" in err and "--dequantize uniform" in err


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_train_and_importance_weighted_eval(tmp_path, capsys, kind):
    run = str(tmp_path / kind)
    assert cli.main(["train", "--out", run, "--dequantize", kind, "--steps", "4", *TINY]) == 0
    capsys.readouterr()
    out_json = str(tmp_path / "eval.json")
    assert cli.main(["eval", "--checkpoint", run, "--samples", "4", "--limit", "40", "--json", out_json]) == 0
    out = capsys.readouterr().out
    assert "4-sample importance-weighted estimate" in out
    r = json.load(open(out_json))
    assert r["samples"] == 4 and r["bpd_iw"] <= r["bpd"] + 0.05  # K draws: at or below the bound, on average
    assert cli.main(["sample", "--checkpoint", run, "--n", "4", "--out", str(tmp_path / "s.png")]) == 0


def test_time_limit_stops_after_the_step_that_passes_it(tmp_path, capsys):
    run = str(tmp_path / "timed")
    # A limit of ~0.06 s: the first step passes it; the run stops there with a checkpoint.
    assert cli.main(["train", "--out", run, "--steps", "50", "--time-limit", "0.001", *TINY]) == 0
    summary = json.load(open(f"{run}/summary.json"))
    assert summary["stopped_early"] and 1 <= summary["step"] < 50
    assert cli.main(["train", "--out", run, "--time-limit", "-1", *TINY]) == 2
