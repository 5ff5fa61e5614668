"""A user's NIfTI folder end to end, as the README shows it: train (two iterations) with
``--config nifti``, evaluate, predict. Checks that the unlabelled images are trained on as
unlabelled volumes, that the run records its splits and preprocessing, and that predictions
land on the input's grid."""
import json

import numpy as np
import pytest
import yaml

from dycon import evaluate, predict, train

nib = pytest.importorskip("nibabel")


def _case(seed, shape=(20, 18, 10)):
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    label[5:14, 4:12, 3:8] = 1
    image = (300 + 600 * label.astype(np.float64) + rng.normal(0, 40, shape)).astype(np.float32)
    return image, label


def _folder(root):
    spacings = {"a": (0.9, 0.9, 2.0), "b": (1.1, 1.1, 2.6), "c": (1.0, 1.0, 1.6), "d": (1.0, 1.0, 2.0)}
    for n, case in enumerate("abcdefg"):
        image, label = _case(n)
        affine = np.diag([*spacings.get(case, (1.0, 1.0, 2.0)), 1.0])
        if case in "bf":   # stored LAS
            image, label, affine = image[::-1].copy(), label[::-1].copy(), affine @ np.diag([-1.0, 1, 1, 1])
        folder = "imagesTs" if case == "g" else "imagesTr"
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), root / folder / f"{case}_0000.nii")
        if case not in "ef":   # e, f: training images without a label file
            (root / folder.replace("images", "labels")).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(label, affine), root / folder.replace("images", "labels") / f"{case}.nii")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii",
                                                   "labels": {"background": 0, "lesion": 1}}))
    (root / "splits_final.json").write_text(json.dumps([{"train": ["a", "b", "c", "e", "f"], "val": ["d"]}]))


def test_train_evaluate_predict_on_a_nifti_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, run = tmp_path / "Dataset001", tmp_path / "run"
    _folder(root)
    train.main(["--config", "nifti", "--root_path", str(root), "--labelnum", "2", "--fold", "0",
                "--max_iterations", "2", "--batch_size", "2", "--labeled_bs", "1", "--base_filters", "2",
                "--val_every", "2", "--device", "cpu", "--num_workers", "0", "--output", str(run)])
    splits = json.loads((run / "splits.json").read_text())
    assert (splits["labelled"], splits["unlabelled"]) == (["a", "b"], ["c", "e", "f"])
    assert (splits["val"], splits["test"], splits["fold"]) == (["d"], ["g"], 0)
    assert "5 training cases (2 labelled, 3 unlabelled)" in (run / "train.log").read_text()
    fp = json.loads((run / "fingerprint.json").read_text())
    assert fp["cases"] == ["a", "b"] and fp["median_spacing"] == pytest.approx([1.0, 1.0, 2.3])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["in_channels"] == 1 and cfg["model"]["num_classes"] == 2
    assert cfg["train"]["patch_size"] == [32, 32, 32] and cfg["val"]["stride_xy"] == 16
    assert cfg["data"]["preprocessing"]["normalization"] == [{"scheme": "zscore", "use_mask": False}]
    assert (run / "eval_test_student" / "summary.json").is_file()
    record = [(run / name).read_text() for name in ("fingerprint.json", "preprocessing.json")]
    # a resumed run keeps its plan: no new fingerprint of changed intensities
    nib.save(nib.Nifti1Image(_case(0)[0] * 3, np.diag([0.9, 0.9, 2.0, 1])), root / "imagesTr" / "a_0000.nii")
    train.main(["--resume", str(run), "--max_iterations", "3", "--no-test"])
    assert [(run / name).read_text() for name in ("fingerprint.json", "preprocessing.json")] == record

    summary = evaluate.main(["--run", str(run), "--split", "val", "--device", "cpu"])
    assert summary["n_cases"] == 1
    written = predict.main(["--run", str(run), "--input", str(root / "imagesTs"), "--output", str(tmp_path / "p"),
                            "--device", "cpu"])
    source, out = nib.load(str(root / "imagesTs" / "g_0000.nii")), nib.load(str(written[0]))
    assert written[0].name == "g.nii.gz" and out.shape == source.shape
    np.testing.assert_allclose(out.affine, source.affine)
