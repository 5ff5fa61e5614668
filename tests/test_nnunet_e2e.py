"""nnUNetTrainerDyCON end to end on the CPU, with nnU-Net's own commands, on a tiny synthetic
dataset in nnU-Net's raw format: plan and preprocess, train (a handful of iterations), resume
with --c, predict, evaluate; the teacher checkpoint as nnU-Net's predictor loads it; one step of
every trainer in process, the supervised fallback and a checkpoint round trip."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]')")

import torch  # noqa: E402

from dycon.nnunet import trainer_folder  # noqa: E402
from dycon.nnunet.dataset import ENDING, write_raw_dataset  # noqa: E402
from dycon.nnunet.trainers import TEACHER_CHECKPOINT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset990_DyconTiny"


def _volume(rng, shape=(36, 40, 32)):
    """A noisy image with one bright sphere, and its label."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array([rng.integers(10, s - 10) for s in shape])[:, None, None, None]
    label = (((grid - centre) ** 2).sum(0) < rng.integers(5, 8) ** 2).astype(np.uint8)
    return (label * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32), label


def write_dataset(raw: Path, labelled=4, unlabelled=4, test=2, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    cases = lambda prefix, n: [(f"{prefix}_{i:03d}", *_volume(rng)) for i in range(n)]
    return write_raw_dataset(raw / DATASET, cases("tr", labelled), cases("unlabelled", unlabelled), cases("ts", test))


def _command(name):
    path = shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        pytest.skip(f"{name} is not installed next to {sys.executable}")
    return path


def plan_and_preprocess(env):
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must not be 0 there
    env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run(env, "nnUNetv2_plan_and_preprocess", "-d", 990, "-c", "3d_fullres", "-np", 1, "-npfp", 1)
    # a narrower network than planned (nnU-Net's plans are meant to be edited): seconds per step here
    plans_file = Path(env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8 * 2 ** i for i in range(arch["n_stages"])]
    plans_file.write_text(json.dumps(plans))
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


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The tiny dataset, planned and preprocessed once for the tests of this file."""
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"), "nnUNet_extTrainer": trainer_folder(),
        "nnUNet_n_proc_DA": "0",              # training: no augmentation worker processes
        "nnUNet_compile": "f",
        "nnUNet_def_n_proc": "1",             # validation and export: one worker process
        "DYCON_NNUNET_EPOCHS": "2", "DYCON_NNUNET_ITERATIONS": "2",
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    })
    write_dataset(root / "raw")
    plan_and_preprocess(env)
    return root, env


def test_dycon_trains_resumes_predicts_and_evaluates(planned, monkeypatch):
    root, env = planned
    raw = root / "raw" / DATASET
    train = ["nnUNetv2_train", DATASET, "3d_fullres", 0, "-tr", "nnUNetTrainerDyCON", "-device", "cpu"]
    log = run(env, *train)
    assert "4 unlabelled case(s)" in log
    # each epoch's unsupervised terms, in the line benchmarks/nnunet_demo.py reads back
    sys.path.insert(0, str(REPO / "benchmarks"))
    import nnunet_demo
    terms = nnunet_demo.last_terms(log).split(", ")
    assert sorted(t.split()[0] for t in terms if re.fullmatch(r"\w+ \S+ -> \S+", t)) == ["fecl", "uncl"], log[-2000:]
    unlabelled = root / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres_unlabelled"
    assert sorted(p.name for p in unlabelled.glob("*[0-9].b2nd")) == [f"unlabelled_{i:03d}.b2nd" for i in range(4)]

    fold = root / "results" / DATASET / "nnUNetTrainerDyCON__nnUNetPlans__3d_fullres" / "fold_0"
    first = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert first["dycon"]["step"] == 4 and first["current_epoch"] == 2
    student, teacher = first["network_weights"], first["dycon"]["teacher"]
    assert student.keys() == teacher.keys()
    assert any(not torch.equal(student[k], teacher[k]) for k in student)   # the teacher is its own network

    # --c picks the final checkpoint up (teacher, heads and step) and trains the third epoch
    run({**env, "DYCON_NNUNET_EPOCHS": "3"}, *train, "--c")
    resumed = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["dycon"]["step"] == 6 and resumed["current_epoch"] == 3
    assert any(not torch.equal(teacher[k], resumed["dycon"]["teacher"][k]) for k in teacher)

    predict = ["nnUNetv2_predict", "-i", raw / "imagesTs", "-d", 990, "-c", "3d_fullres", "-f", 0,
               "-tr", "nnUNetTrainerDyCON", "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1]
    run(env, *predict, "-o", root / "student")
    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    assert_predictor_loads_the_teacher(fold.parent, resumed["dycon"]["teacher"])
    summary = root / "student.json"
    run(env, "nnUNetv2_evaluate_folder", raw / "labelsTs", root / "student", "-djfile", fold.parent / "dataset.json",
        "-pfile", fold.parent / "plans.json", "-o", summary, "-np", 1)
    dice = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    assert 0.0 <= dice <= 1.0   # six iterations: the numbers are not the point, the pipeline is


def assert_predictor_loads_the_teacher(model_folder, teacher):
    """``nnUNetv2_predict -chk checkpoint_final_teacher.pth`` runs nnUNetPredictor with that name."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(model_folder), (0,), checkpoint_name=TEACHER_CHECKPOINT)
    loaded = predictor.network.state_dict()
    assert loaded.keys() == teacher.keys() and all(torch.equal(loaded[k], teacher[k]) for k in teacher)


def _in_process(planned, monkeypatch, tmp_path, raw=None):
    root, env = planned
    for key in ("nnUNet_preprocessed", "nnUNet_extTrainer", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("nnUNet_raw", str(raw or root / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path))


def _one_step(name):
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(DATASET, "3d_fullres", 0, name, device=torch.device("cpu"))
    assert type(trainer).__name__ == name
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    loss = trainer.train_step(next(trainer.dataloader_train))["loss"]
    assert np.isfinite(loss)
    return trainer, before


@pytest.mark.parametrize("name", ["nnUNetTrainerMeanTeacher", "nnUNetTrainerDyCONOfficial"])
def test_every_trainer_takes_a_step(planned, monkeypatch, tmp_path, name):
    _in_process(planned, monkeypatch, tmp_path)
    trainer, before = _one_step(name)
    assert trainer.dycon_step == 1
    # the step's unsupervised terms are recorded for the epoch's log line (one step each)
    assert trainer.epoch_terms and all(n == 1 for _, _, n in trainer.epoch_terms.values())
    # summed without the graph (a step's graph must not live until the epoch's log line)
    assert all(not raw.requires_grad and not w.requires_grad and np.isfinite(float(w))
               for raw, w, _ in trainer.epoch_terms.values())
    # the first EMA update (alpha = 0) makes the teacher the student after its step
    after, student = trainer.teacher.state_dict(), trainer.network.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(student[k], after[k]) for k in after)


def test_one_seed_gives_the_baseline_and_dycon_the_same_initial_network(planned, monkeypatch, tmp_path):
    """What makes the seeded comparison paired (benchmarks/nnunet_demo.py); another seed, another network."""
    from nnunetv2.run.run_training import get_trainer_from_args
    _in_process(planned, monkeypatch, tmp_path)

    def initial(name, seed):
        monkeypatch.setenv("DYCON_NNUNET_SEED", str(seed))
        trainer = get_trainer_from_args(DATASET, "3d_fullres", 0, name, device=torch.device("cpu"))
        trainer.initialize()
        return trainer.network.state_dict()

    baseline, dycon, other = (initial("nnUNetTrainerBudget", 0), initial("nnUNetTrainerDyCON", 0),
                              initial("nnUNetTrainerBudget", 1))
    assert all(torch.equal(baseline[k], dycon[k]) for k in baseline)
    assert not all(torch.equal(baseline[k], other[k]) for k in baseline)


def test_without_unlabelled_folder_trains_supervised(planned, monkeypatch, tmp_path):
    raw = tmp_path / "raw"
    (raw / DATASET).mkdir(parents=True)    # a raw dataset folder without imagesUnlabelled/
    _in_process(planned, monkeypatch, tmp_path / "results", raw=raw)
    trainer, before = _one_step("nnUNetTrainerDyCON")
    assert trainer.dataloader_unlabelled is None and trainer.dycon_step == 0
    assert "training as supervised nnU-Net" in Path(trainer.log_file).read_text()


def test_checkpoint_restores_teacher_heads_step_and_optimiser(planned, monkeypatch, tmp_path):
    from nnunetv2.run.run_training import get_trainer_from_args
    _in_process(planned, monkeypatch, tmp_path)
    trainer, _ = _one_step("nnUNetTrainerDyCON")
    trainer.train_step(next(trainer.dataloader_train))
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    monkeypatch.setenv("DYCON_NNUNET_SEED", "7")
    fresh = get_trainer_from_args(DATASET, "3d_fullres", 0, "nnUNetTrainerDyCON", device=torch.device("cpu"))
    first_epoch_draw = np.random.rand()              # the seeded run's first draw
    fresh.load_checkpoint(path)
    assert fresh.dycon_step == trainer.dycon_step == 2 and fresh.current_epoch == 1
    # the resumed run samples on from its epoch's own stream, not the first epoch's again
    resumed_draw = np.random.rand()
    fresh.load_checkpoint(path)
    assert resumed_draw == np.random.rand() != first_epoch_draw
    for name in ("teacher", "head", "teacher_head"):
        want, got = getattr(trainer, name).state_dict(), getattr(fresh, name).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    # the head's momentum buffers are part of the optimiser state that --c restores
    head_params = list(fresh.head.parameters())
    assert all(torch.equal(fresh.optimizer.state[p]["momentum_buffer"], trainer.optimizer.state[q]["momentum_buffer"])
               for p, q in zip(head_params, trainer.head.parameters()))


def test_an_ignore_label_is_refused_with_a_reason(planned, monkeypatch, tmp_path):
    from dycon.nnunet.trainers import nnUNetTrainerDyCON
    root, _ = planned
    _in_process(planned, monkeypatch, tmp_path)
    plans = json.loads((root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((root / "preprocessed" / DATASET / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "lesion": 1, "ignore": 2}
    with pytest.raises(ValueError, match="needs a dataset of plain labels"):
        nnUNetTrainerDyCON({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json, torch.device("cpu"))
