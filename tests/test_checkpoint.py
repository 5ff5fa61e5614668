"""Checkpoint files: interrupted writes keep the previous checkpoint; every reader refuses files
that carry Python objects and names the file when one is unreadable."""
import pytest
import torch

from dycon import evaluate
from dycon.checkpoint import load_checkpoint, save_checkpoint
from dycon.networks import build_model

MODEL = {"arch": "unet3d", "in_channels": 1, "num_classes": 2, "base_filters": 4, "feature_scaler": 2,
         "embed_dim": 8}


class NotATensor:
    pass


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    old = {"step": 1, "student": {"w": torch.randn(64, 64)}}
    save_checkpoint(path, old)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        raise KeyboardInterrupt   # e.g. Ctrl-C or a job scheduler's signal mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "student": {"w": torch.randn(64, 64)}})
    monkeypatch.setattr(torch, "save", real_save)
    kept = load_checkpoint(path)
    assert kept["step"] == 1 and torch.equal(kept["student"]["w"], old["student"]["w"])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*latest\.pt\.tmp"):   # the half-written file
        load_checkpoint(tmp_path / "latest.pt.tmp")
    save_checkpoint(path, {"step": 3})                      # and the next save goes through
    assert load_checkpoint(path)["step"] == 3


def test_pickled_object_is_refused_and_named(tmp_path):
    torch.save({"student": {}, "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt: it holds a Python object \(.*NotATensor\)"):
        load_checkpoint(tmp_path / "evil.pt")


@pytest.mark.parametrize("content", [b"junk", b"\x80\x02garbage", b""])
def test_unreadable_file_is_named(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*bad\.pt"):
        load_checkpoint(tmp_path / "bad.pt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_evaluation_reads_through_the_same_checks(tmp_path):
    model = build_model(MODEL)
    save_checkpoint(tmp_path / "good.pt", {"student": model.state_dict(), "config": {"model": MODEL}})
    loaded, config = evaluate.load_model(tmp_path / "good.pt")
    assert config["model"] == MODEL and not loaded.training
    torch.save({"student": model.state_dict(), "config": {"model": MODEL}, "extra": NotATensor()},
               tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt"):
        evaluate.load_model(tmp_path / "evil.pt")
