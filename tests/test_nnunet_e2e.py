"""nnUNetTrainerDyCON end to end on the CPU, with nnU-Net's own commands, on a tiny synthetic
dataset in nnU-Net's raw format: plan and preprocess, train (a handful of iterations), resume
with --c, predict (student and teacher), evaluate. About 2-3 minutes on two cores."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]')")
sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (an nnunetv2 dependency) is not installed")

import torch  # noqa: E402

from dycon.nnunet import trainer_folder  # noqa: E402
from dycon.nnunet.trainers import TEACHER_CHECKPOINT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset990_DyconTiny"
ENDING = ".nii.gz"


def _volume(rng, shape=(32, 40, 36)):
    """A noisy image with one bright sphere, and its label."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([rng.integers(10, s - 10) for s in shape])[:, None, None, None]
    label = (((grid - centre) ** 2).sum(0) < rng.integers(5, 8) ** 2).astype(np.uint8)
    image = (label * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
    return image, label


def _write(array, path):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


def write_dataset(raw: Path, labelled=4, unlabelled=4, test=2, seed=0) -> Path:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    rng = np.random.default_rng(seed)
    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesUnlabelled", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    for kind, n in (("Tr", labelled), ("Unlabelled", unlabelled), ("Ts", test)):
        for i in range(n):
            image, label = _volume(rng)
            case = f"{kind.lower()}_{i:03d}"
            _write(image, folder / f"images{kind}" / f"{case}_0000{ENDING}")
            if kind != "Unlabelled":
                _write(label, folder / f"labels{kind if kind == 'Ts' else 'Tr'}" / f"{case}{ENDING}")
    generate_dataset_json(str(folder), {0: "MRI"}, {"background": 0, "lesion": 1}, labelled, ENDING)
    return folder


def _command(name):
    path = shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return path


def plan_and_preprocess(env):
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must not be 0 there
    env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run(env, "nnUNetv2_plan_and_preprocess", "-d", 990, "-c", "3d_fullres", "-np", 1, "-npfp", 1)
    # one fold of our own: nnU-Net's default 5-fold split needs 5 labelled cases
    cases = sorted(p.name[:-len(ENDING)] for p in (Path(env["nnUNet_raw"]) / DATASET / "labelsTr").iterdir())
    split = [{"train": cases[:-1], "val": cases[-1:]}]
    (Path(env["nnUNet_preprocessed"]) / DATASET / "splits_final.json").write_text(json.dumps(split))


def run(env, name, *args):
    start = time.perf_counter()
    out = subprocess.run([_command(name), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    assert out.returncode == 0, f"{name} {' '.join(map(str, args))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture
def nnunet_env(tmp_path):
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
        "nnUNet_results": str(tmp_path / "results"), "nnUNet_extTrainer": trainer_folder(),
        "nnUNet_n_proc_DA": "0",              # training: no augmentation worker processes
        "nnUNet_compile": "f",
        "nnUNet_def_n_proc": "1",             # validation and export: one worker process
        "DYCON_NNUNET_EPOCHS": "2", "DYCON_NNUNET_ITERATIONS": "2",
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    })
    return env


def test_dycon_trains_resumes_predicts_and_evaluates(tmp_path, nnunet_env):
    env = nnunet_env
    raw = write_dataset(tmp_path / "raw")
    plan_and_preprocess(env)
    train = ["nnUNetv2_train", DATASET, "3d_fullres", 0, "-tr", "nnUNetTrainerDyCON", "-device", "cpu"]
    log = run(env, *train)
    assert "unlabelled case(s)" in log
    unlabelled = tmp_path / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres_unlabelled"
    assert sorted(p.name for p in unlabelled.glob("*[0-9].b2nd")) == [f"unlabelled_{i:03d}.b2nd" for i in range(4)]

    fold = tmp_path / "results" / DATASET / "nnUNetTrainerDyCON__nnUNetPlans__3d_fullres" / "fold_0"
    first = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert first["dycon"]["step"] == 4 and first["current_epoch"] == 2
    student, teacher = first["network_weights"], first["dycon"]["teacher"]
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)   # the teacher is its own network

    # --c picks the final checkpoint up (teacher, heads and step) and trains the third epoch
    log = run({**env, "DYCON_NNUNET_EPOCHS": "3"}, *train, "--c")
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["dycon"]["step"] == 6 and resumed["current_epoch"] == 3
    assert any(not torch.equal(first["dycon"]["teacher"][k], resumed["dycon"]["teacher"][k]) for k in teacher)

    predict = ["nnUNetv2_predict", "-i", raw / "imagesTs", "-d", 990, "-c", "3d_fullres", "-f", 0,
               "-tr", "nnUNetTrainerDyCON", "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1]
    run(env, *predict, "-o", tmp_path / "student")
    run(env, *predict, "-o", tmp_path / "teacher", "-chk", TEACHER_CHECKPOINT)
    for name in ("student", "teacher"):
        summary = tmp_path / f"{name}.json"
        run(env, "nnUNetv2_evaluate_folder", raw / "labelsTs", tmp_path / name, "-djfile", fold.parent / "dataset.json",
            "-pfile", fold.parent / "plans.json", "-o", summary, "-np", 1)
        dice = json.loads(summary.read_text())["foreground_mean"]["Dice"]
        assert 0.0 <= dice <= 1.0   # six iterations: the numbers are not the point, the pipeline is


def test_without_unlabelled_folder_trains_supervised(tmp_path, nnunet_env):
    env = {**nnunet_env, "DYCON_NNUNET_EPOCHS": "1"}
    write_dataset(tmp_path / "raw", labelled=4, unlabelled=0, test=0)
    shutil.rmtree(tmp_path / "raw" / DATASET / "imagesUnlabelled")
    plan_and_preprocess(env)
    log = run(env, "nnUNetv2_train", DATASET, "3d_fullres", 0, "-tr", "nnUNetTrainerDyCON", "-device", "cpu")
    assert "training as supervised nnU-Net" in log
