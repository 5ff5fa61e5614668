"""The pure parts of benchmarks/nnunet_demo.py: the Dice it reads from nnU-Net's evaluation (on
label files of known overlap, through the one-thread launcher), the paired t-interval, the log
parsing, the environment of a seed, and the resume rule's bookkeeping."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import nnunet_demo  # noqa: E402


def _rows(dice: dict) -> list[dict]:
    return [{"seed": str(s), "trainer": t, "dice": str(d)} for (s, t), d in dice.items()]


def test_paired_keeps_the_seeds_both_trainers_finished_in_seed_order():
    rows = _rows({(2, "B"): 0.5, (0, "B"): 0.7, (0, "M"): 0.8, (2, "M"): 0.4, (1, "B"): 0.6})
    assert nnunet_demo.paired(rows, "B", "M") == [(0, 0.7, 0.8), (2, 0.5, 0.4)]


def test_summary_has_the_paired_difference_and_its_t_interval():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653 -> half width 0.248414
    pairs = [(0, 0.5, 0.6), (1, 0.5, 0.7), (2, 0.4, 0.7)]
    text = "\n".join(nnunet_demo.summary_lines(pairs, "B", "M"))
    assert "| 1 | 0.5000 | 0.7000 | +0.2000 |" in text
    assert "| mean (sd) | 0.4667 (0.0577) | 0.6667 (0.0577) | +0.2000 (0.1000) |" in text
    assert "+0.2000, 95 % t-interval [-0.0484, +0.4484]" in text


def test_summary_of_one_seed_has_no_interval():
    text = "\n".join(nnunet_demo.summary_lines([(0, 0.5, 0.6)], "B", "M"))
    assert "n/a (one seed)" in text


def test_last_terms_is_the_last_epoch_the_trainer_logged():
    log = ("2026-12-06 09:00:00.0: DyCON: the epoch's mean unsupervised terms (raw -> weighted): fecl 6 -> 3, uncl 5 -> 2.5\n"
           "2026-12-06 09:00:01.0: train_loss 1.2\n"
           "2026-12-06 09:01:00.0: DyCON: the epoch's mean unsupervised terms (raw -> weighted): fecl 4 -> 2, uncl 1 -> 0.5\n")
    assert nnunet_demo.last_terms(log) == "fecl 4 -> 2, uncl 1 -> 0.5"
    assert nnunet_demo.last_terms("2026-12-06 09:00:01.0: train_loss 1.2\n") == ""


def test_foreground_dice_names_a_summary_without_it():
    with pytest.raises(ValueError, match="foreground_mean"):
        nnunet_demo.foreground_dice({"mean": {}})


def test_a_seed_has_its_own_results_one_thread_and_no_loader_workers(tmp_path):
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]')")
    env = nnunet_demo.nnunet_env(tmp_path, 7, 3, 4, 1)
    assert env["nnUNet_results"] == str(tmp_path / "seed7" / "results")
    assert (env["DYCON_NNUNET_SEED"], env["DYCON_NNUNET_EPOCHS"], env["DYCON_NNUNET_ITERATIONS"]) == ("7", "3", "4")
    assert (env["OMP_NUM_THREADS"], env["nnUNet_n_proc_DA"]) == ("1", "0")


def test_the_trainers_seed_sets_the_generators_nnunet_draws_from(monkeypatch):
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]')")
    import torch

    from dycon.nnunet.trainers import SEED_ENV, apply_seed

    def draws(seed):
        monkeypatch.setenv(SEED_ENV, str(seed))
        apply_seed()
        return torch.rand(3).tolist(), np.random.randint(0, 1 << 30, 3).tolist()

    assert draws(1) == draws(1)
    first, second = draws(1), draws(2)
    assert first[0] != second[0] and first[1] != second[1]


@pytest.mark.parametrize("name", ["DYCON_NNUNET_SEED", "DYCON_NNUNET_EPOCHS", "DYCON_NNUNET_ITERATIONS"])
def test_a_setting_that_is_not_an_integer_is_an_error_naming_it(monkeypatch, name):
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]')")
    from types import SimpleNamespace

    from dycon.nnunet.trainers import SEED_ENV, apply_budget, apply_seed

    monkeypatch.setenv(name, "2x")
    with pytest.raises(ValueError, match=rf"^{name}='2x': not an integer$"):
        apply_seed() if name == SEED_ENV else apply_budget(SimpleNamespace())


def test_a_finished_run_is_not_trained_again(tmp_path):
    fold = tmp_path / "results" / "Dataset991_DyconDemo" / "T__nnUNetPlans__3d_fullres" / "fold_all"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"")
    (tmp_path / "seed3" / "logs").mkdir(parents=True)
    (tmp_path / "seed3" / "logs" / "train_T.json").write_text('{"train_s": 12.5}')
    # env={} would fail any nnU-Net command: the stored seconds come back without one
    assert nnunet_demo.train(tmp_path, 3, "T", {"nnUNet_results": str(tmp_path / "results")}) == 12.5


def test_a_failing_nnunet_command_names_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="nnUNetv2_nothing.*log.txt"):
        nnunet_demo.nnunet("nnUNetv2_nothing", env={}, log=tmp_path / "log.txt")


def test_dice_of_nnunets_evaluation_on_labels_of_known_overlap(tmp_path):
    """Reference: 27 voxels, prediction: 18 of them + 9 others -> Dice 2 * 18 / 54 = 2/3 in case a;
    case b is predicted exactly (Dice 1): the foreground mean is 5/6."""
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]')")
    from dycon.nnunet.dataset import _write_nifti
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[1:4, 1:4, 1:4] = 1
    shifted = np.roll(truth, 1, axis=0)   # 18 voxels in common
    for folder, a in ((ref, truth), (pred, shifted)):
        _write_nifti(a, folder / "a.nii.gz")
        _write_nifti(truth, folder / "b.nii.gz")
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz", '
                                          '"channel_names": {"0": "image"}, "numTraining": 2}')
    (tmp_path / "plans.json").write_text('{"image_reader_writer": "SimpleITKIO", "dataset_name": "x", '
                                        '"plans_name": "p", "configurations": {}}')
    env = {**nnunet_demo.nnunet_env(tmp_path, 0, 1, 1, 1), "nnUNet_def_n_proc": "1"}
    nnunet_demo.nnunet("nnUNetv2_evaluate_folder", ref, pred, "-djfile", tmp_path / "dataset.json",
                       "-pfile", tmp_path / "plans.json", "-o", tmp_path / "summary.json", "-np", 1,
                       env=env, log=tmp_path / "log.txt")
    assert math.isclose(nnunet_demo.foreground_dice(json.loads((tmp_path / "summary.json").read_text())), 5 / 6,
                        rel_tol=1e-6)


HELP_THEN_MODULES = """
import runpy, sys
sys.argv = [{script!r}, "--help"]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exit_:
    print(exit_.code)
print(sorted({{"torch", "nnunetv2"}} & set(sys.modules)))
"""


def test_help_runs_without_nnunet_or_torch():
    """The script as ``python benchmarks/nnunet_demo.py --help`` runs it: usage, status 0, and
    neither torch nor nnunetv2 imported."""
    code = HELP_THEN_MODULES.format(script=nnunet_demo.__file__)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "--epochs" in out.stdout and out.stdout.strip().splitlines()[-2:] == ["0", "[]"], out.stdout + out.stderr
