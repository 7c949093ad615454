"""flowkern train / sample / eval / ood fixes from an audit: resumes that change the batch size
or the working folder, runs that would overwrite another, stale files under --overwrite,
eval's default split, and output paths checked before any work."""
from __future__ import annotations

import os

import pytest
import torch

from flowkern import data as fkdata
from flowkern import train as T

pytest.importorskip("torchvision")

TINY = {"data": "synthetic:600", "layers": 2, "hidden": 16, "batch_size": 64, "warmup": 3, "lr": 2e-3,
        "quiet": True, "n_samples": 0, "eval_limit": 40, "log_every": 0}


def run(tmp_path, name="run", **overrides):
    return T.train(dict(TINY, out=str(tmp_path / name), **overrides))


def ckpt_of(tmp_path, name="run"):
    return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)


def test_resume_with_another_batch_size_continues_at_the_next_epoch(tmp_path):
    # 540 training images: 33 batches of 16 an epoch, 8 of 64. Batch 20 of 33 has no counterpart.
    run(tmp_path, batch_size=16, steps=60, stop_at=20)
    assert ckpt_of(tmp_path)["batch_in_epoch"] == 20
    logs = []
    T.train(dict(TINY, out=str(tmp_path / "run"), resume=str(tmp_path / "run"), batch_size=64, steps=24, quiet=False,
                 eval_every=0), log=logs.append)
    c = ckpt_of(tmp_path)
    assert c["step"] == 24 and c["epoch"] == 1 and c["batch_in_epoch"] == 4  # epoch 1 from its start
    assert any("continues at the start of the next epoch" in line for line in logs)


def test_resume_asking_for_fewer_steps_than_done_is_refused(tmp_path):
    run(tmp_path, steps=6)
    with pytest.raises(T.UsageError, match="at step 6, past the 4 steps"):
        T.train(dict(TINY, out=str(tmp_path / "run"), resume=str(tmp_path / "run"), steps=4))


def test_resume_into_another_runs_folder_needs_overwrite(tmp_path):
    run(tmp_path, "a", steps=4)
    run(tmp_path, "b", steps=2)
    with pytest.raises(T.UsageError, match="already holds another run"):
        T.train(dict(TINY, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint.pt"), steps=6))
    assert ckpt_of(tmp_path, "b")["step"] == 2  # untouched
    T.train(dict(TINY, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint.pt"), steps=6,
                 overwrite=True))
    assert ckpt_of(tmp_path, "b")["step"] == 6


def test_overwrite_removes_the_old_runs_files_first(tmp_path, monkeypatch):
    run(tmp_path, steps=4, n_samples=4)
    folder = tmp_path / "run"
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(T._BitsPerDim, "forward", lambda self, pixels: torch.full((pixels.shape[0],), float("nan"),
                                                                                  requires_grad=True))
    with pytest.raises(T.TrainingDiverged, match="no checkpoint had been written yet"):
        run(tmp_path, steps=3, overwrite=True)
    names = set(os.listdir(folder))
    assert "checkpoint.pt" not in names and "summary.json" not in names  # no old run to --resume by mistake
    assert not [n for n in names if n.startswith("samples_t")]
    assert "notes.txt" in names  # only the files a run writes


def test_relative_data_paths_resume_from_another_folder(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    fkdata.write_idx(str(tmp_path / "d" / "imgs.gz"), fkdata.synthetic_digits(600, seed=1)[:, 0])
    monkeypatch.chdir(tmp_path)
    run(tmp_path, data="idx:d/imgs.gz", steps=4)
    monkeypatch.chdir("/")
    summary = T.train(dict(TINY, out=str(tmp_path / "run"), resume=str(tmp_path / "run"), steps=6))
    assert summary["step"] == 6


def test_eval_of_the_training_spec_holds_out_the_runs_split(tmp_path):
    run(tmp_path, steps=2, holdout=0.05)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    assert T.evaluate(ckpt)["images"] == 30
    assert T.evaluate(ckpt, data="synthetic:600")["images"] == 30  # not the default 10%, 60
    assert T.evaluate(ckpt, data="synthetic:600", holdout=0.1)["images"] == 60


def test_output_paths_are_checked_before_any_work(tmp_path):
    run(tmp_path, steps=2)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(T.UsageError, match="is a file, not a folder"):
        T.ood(ckpt, "noise:100", limit=10, out_dir=str(afile))
    with pytest.raises(T.UsageError, match="is a file, not a folder"):
        run(tmp_path, "afile", steps=2)
    with pytest.raises(T.UsageError, match="name a .png file"):
        T.sample(ckpt, str(tmp_path / "grid.txt"), n=4)
    assert T.sample(ckpt, str(tmp_path / "grid"), n=4) == [str(tmp_path / "grid.png")]
    assert os.path.getsize(tmp_path / "grid.png") > 0
    with pytest.raises(T.UsageError, match="is a folder"):
        T.check_output_file(str(tmp_path), "--json")


@pytest.mark.parametrize("channels", [2, 5])
def test_sample_grids_of_any_channel_count(tmp_path, channels):
    pixels = torch.randint(0, 256, (6, channels, 8, 8), dtype=torch.uint8)
    path = T.save_grid(pixels, str(tmp_path / "g.png"))
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 8 and im.size[1] > 8
