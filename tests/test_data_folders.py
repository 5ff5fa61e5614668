"""Folders as users keep them: nnU-Net v2 and MSD data sets with unlabelled images, leak-free
splits and folds, the released LA layout, and the checks that name the files."""
import json
import sys

import h5py
import numpy as np
import pytest
import torch

from dycon import predict
from dycon.data import DataError, crossval_folds, list_cases, record_splits, split_ids, training_cases
from dycon.batches import PatchDataset

nib = pytest.importorskip("nibabel")

SHAPE = (6, 5, 4)


def _image(seed, shape=SHAPE):
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _label(seed, shape=SHAPE):
    return (np.random.default_rng(seed + 100).random(shape) > 0.6).astype(np.uint8)


def nnunet_folder(root, labelled=("a", "b", "c", "d"), unlabelled=("u1",), test=("t1",), channels=2,
                  ending=".nii.gz", affine=np.eye(4), extra=()):
    """An nnU-Net v2 raw data set: every case in imagesTr, labels only for ``labelled``."""
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for n, case in enumerate(labelled + unlabelled):
        for c in range(channels):
            nib.save(nib.Nifti1Image(_image(n * 10 + c), affine), root / "imagesTr" / f"{case}_{c:04d}{ending}")
        if case in labelled:
            nib.save(nib.Nifti1Image(_label(n), affine), root / "labelsTr" / f"{case}{ending}")
    for case in test:
        for c in range(channels):
            nib.save(nib.Nifti1Image(_image(99 + c), affine), root / "imagesTs" / f"{case}_{c:04d}{ending}")
    meta = {"channel_names": {str(c): ["T1", "CT", "T2"][c] for c in range(channels)},
            "labels": {"background": 0, "atrium": 1}, "numTraining": len(labelled + unlabelled),
            "file_ending": ending, **dict(extra)}
    (root / "dataset.json").write_text(json.dumps(meta))
    return {"layout": "nifti", "root": str(root)}


def ids(cases):
    return [c.id for c in cases]


def test_nnunet_folder_with_unlabelled_images_and_nii_ending(tmp_path):
    cfg = nnunet_folder(tmp_path, ending=".nii")
    (tmp_path / "imagesUnlabelled").mkdir()
    for c in range(2):
        nib.save(nib.Nifti1Image(_image(7 + c), np.eye(4)), tmp_path / "imagesUnlabelled" / f"x9_{c:04d}.nii")
    assert ids(list_cases(cfg, "train")) == ["a", "b", "c", "d"]
    assert ids(list_cases(cfg, "unlabelled")) == ["u1", "x9"]
    assert ids(list_cases(cfg, "test")) == ["t1"]
    pool = list_cases(cfg, "unlabelled")[1].load()
    assert pool.label is None and pool.image.shape == (2, *SHAPE)
    np.testing.assert_allclose(pool.image[1], _image(8))

    cases, labelled, unlabelled = training_cases(cfg, labelnum=2)
    assert [cases[i].id for i in labelled] == ["a", "b"]
    assert [cases[i].id for i in unlabelled] == ["c", "d", "u1", "x9"]
    record = json.loads(record_splits(tmp_path, cfg, cases, labelled, unlabelled).read_text())
    assert record["labelled"] == ["a", "b"] and record["unlabelled"] == ["c", "d", "u1", "x9"]
    assert record["test"] == ["t1"] and record["val"] is None

    # the trainer's dataset takes pool cases: their label slots are -1 (no label)
    data = PatchDataset(cases, (4, 4, 4))
    item = data[(unlabelled[-1], 3)]
    assert item["image"].shape == (2, 4, 4, 4) and torch.all(item["label"] == -1)
    assert set(data[(labelled[0], 3)]["label"].unique().tolist()) <= {0, 1}


def test_msd_folder_with_4d_multichannel_images(tmp_path):
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / d).mkdir()
    image = np.stack([_image(0), _image(1)], -1)
    affine = np.diag([1.25, 1.25, 2.5, 1.0])
    training = []
    for case in ("BRATS_001", "BRATS_002"):
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(_label(0), affine), tmp_path / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "imagesTs" / "BRATS_900.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "edema"},
        "training": training, "test": ["./imagesTs/BRATS_900.nii.gz"]}))
    cfg = {"layout": "nifti", "root": str(tmp_path)}
    assert ids(list_cases(cfg, "train")) == ["BRATS_001", "BRATS_002"]
    assert ids(list_cases(cfg, "test")) == ["BRATS_900"]
    vol = list_cases(cfg, "train")[1].load()
    assert vol.image.shape == (2, *SHAPE) and vol.spacing == (1.25, 1.25, 2.5)
    np.testing.assert_allclose(vol.image[1], _image(1))
    test = list_cases(cfg, "test")[0].load()
    assert test.label is None and test.image.shape == (2, *SHAPE)


def test_nrrd_through_simpleitk_matches_nifti(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    cfg = nnunet_folder(tmp_path / "nii", labelled=("a",), unlabelled=(), test=(), channels=1,
                        affine=np.array([[-0.8, 0, 0, 10], [0, 1.2, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1.0]]))
    ref = list_cases(cfg, "train")[0].load()
    root = tmp_path / "nrrd"
    for sub, src in (("imagesTr", ref.image[0]), ("labelsTr", ref.label)):
        (root / sub).mkdir(parents=True)
        img = sitk.GetImageFromArray(np.ascontiguousarray(src.transpose(2, 1, 0)))
        # LPS: the NIfTI affine's x and y axes flipped
        img.SetSpacing((0.8, 1.2, 2.5))
        img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
        img.SetOrigin((-10, 5, 3))
        sitk.WriteImage(img, str(root / sub / ("a_0000.nrrd" if sub == "imagesTr" else "a.nrrd")))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"bg": 0, "fg": 1},
                                                   "file_ending": ".nrrd"}))
    vol = list_cases({"layout": "nifti", "root": str(root)}, "train")[0].load()
    np.testing.assert_allclose(vol.affine, ref.affine)
    np.testing.assert_allclose(vol.image, ref.image)
    np.testing.assert_array_equal(vol.label, ref.label)


def test_nrrd_without_simpleitk_names_the_extra(tmp_path, monkeypatch):
    root = tmp_path
    (root / "imagesTr").mkdir()
    (root / "imagesTr" / "a_0000.mha").write_bytes(b"x")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".mha"}))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)   # import fails as if not installed
    (case,) = list_cases({"layout": "nifti", "root": str(root)}, "unlabelled")
    with pytest.raises(ImportError, match=r"a_0000\.mha needs SimpleITK.*pip install dycon\[sitk\]"):
        case.load()


def test_splits_cannot_leak(tmp_path):
    cfg = nnunet_folder(tmp_path)
    (tmp_path / "val.txt").write_text("b\n")
    # val.txt alone: training is the rest, never the validation case
    assert ids(list_cases(cfg, "train")) == ["a", "c", "d"]
    assert ids(list_cases(cfg, "val")) == ["b"]
    (tmp_path / "train.txt").write_text("a\nb\nc\nu1\n")
    with pytest.raises(DataError, match=r"training split shares 1 case\(s\) with the val split: \['b'\]"):
        list_cases(cfg, "train")
    (tmp_path / "train.txt").write_text("a\nc\nt1\n")
    with pytest.raises(DataError, match=r"shares 1 case\(s\) with the test split: \['t1'\]"):
        list_cases(cfg, "val")
    (tmp_path / "train.txt").write_text("a\nc\nu1\n")
    assert ids(list_cases(cfg, "train")) == ["a", "c"] and ids(list_cases(cfg, "unlabelled")) == ["u1"]
    with pytest.raises(ValueError, match="a val list exists and data.fold is set too"):
        list_cases({**cfg, "fold": 0}, "train")


def test_folds_from_splits_final_and_generated(tmp_path):
    cfg = nnunet_folder(tmp_path, labelled=tuple("abcdefg"))
    generated = [split_ids({**cfg, "fold": k}) for k in range(5)]
    vals = [g["val"] for g in generated]
    assert sorted(sum(vals, [])) == list("abcdefg")    # every labelled training case validated once
    for g in generated:
        assert not set(g["train"]) & set(g["val"]) and "t1" not in g["train"] + g["val"]
        assert g["unlabelled"] == ["u1"]                  # the image without a label always trains
    assert split_ids({**cfg, "fold": 2}) == generated[2]      # the same split every time
    folds = [{"train": ["a", "b", "c"], "val": ["d", "e"]}, {"train": ["d", "e", "f", "u1"], "val": ["a"]}]
    (tmp_path / "splits_final.json").write_text(json.dumps(folds))
    ids1 = split_ids({**cfg, "fold": 1})
    assert (ids1["train"], ids1["val"], ids1["unlabelled"]) == (["d", "e", "f"], ["a"], ["u1"])
    with pytest.raises(ValueError, match=r"data.fold=2 but .*splits_final.json has folds 0 .. 1"):
        split_ids({**cfg, "fold": 2})


@pytest.mark.parametrize("n", [2, 7, 13, 24])
def test_generated_folds_are_nnunets(n):
    """Fold k here is fold k of nnU-Net for the same ids: its own split function (sklearn's
    KFold(5, shuffle=True, random_state=12345)) over the sorted ids."""
    ids = sorted(f"case_{i:03d}" for i in np.random.default_rng(n).permutation(100)[:n])
    ours = crossval_folds(ids)
    model_selection = pytest.importorskip("sklearn.model_selection", reason="sklearn is not installed")
    kfold = model_selection.KFold(min(5, n), shuffle=True, random_state=12345)
    assert ours == [{"train": [ids[i] for i in tr], "val": [ids[i] for i in va]} for tr, va in kfold.split(ids)]
    if n >= 5:   # nnU-Net's KFold needs as many ids as folds
        crossval = pytest.importorskip("nnunetv2.utilities.crossval_split", reason="nnunetv2 is not installed")
        theirs = crossval.generate_crossval_split(ids, seed=12345, n_splits=5)
        assert ours == [{"train": [str(i) for i in f["train"]], "val": [str(i) for i in f["val"]]} for f in theirs]


def test_folds_without_sklearn_or_nnunetv2():
    """The folds nnunetv2 2.8.1's generate_crossval_split gives ids a .. g (recorded from it), so
    that the split is pinned where neither library is installed."""
    assert [f["val"] for f in crossval_folds(list("abcdefg"))] == [["d", "g"], ["a", "e"], ["b"], ["f"], ["c"]]


def test_fold_of_a_folder_is_nnunets_fold_over_its_labelled_cases(tmp_path):
    cfg = nnunet_folder(tmp_path, labelled=tuple("gfedcba"))   # listed unsorted: nnU-Net sorts
    expected = crossval_folds(list("abcdefg"))
    for k in range(5):
        got = split_ids({**cfg, "fold": k})
        assert (got["train"], got["val"]) == (expected[k]["train"], expected[k]["val"])


def test_splits_final_from_nnunet_preprocessed(tmp_path, monkeypatch):
    """nnU-Net writes splits_final.json to $nnUNet_preprocessed/<data set>/, not the raw folder."""
    cfg = nnunet_folder(tmp_path / "Dataset042_Toy", labelled=tuple("abcdef"))
    preprocessed = tmp_path / "preprocessed"
    (preprocessed / "Dataset042_Toy").mkdir(parents=True)
    folds = [{"train": ["a", "b", "c", "d"], "val": ["e", "f"]}]
    (preprocessed / "Dataset042_Toy" / "splits_final.json").write_text(json.dumps(folds))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert split_ids({**cfg, "fold": 0})["val"] == crossval_folds(list("abcdef"))[0]["val"]
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    got = split_ids({**cfg, "fold": 0})
    assert (got["train"], got["val"]) == (["a", "b", "c", "d"], ["e", "f"])
    with pytest.raises(ValueError, match=r"data.fold=1 but .*preprocessed/Dataset042_Toy/splits_final.json"):
        split_ids({**cfg, "fold": 1})


def _write_la(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"] = _image(seed, (12, 12, 8))
        f["label"] = _label(seed, (12, 12, 8))


def test_released_la_layout_from_either_level_and_predictions_named_by_case(tmp_path):
    for i in ("la_01", "la_02", "la_03"):
        _write_la(tmp_path / "LA_data" / i / "mri_norm2.h5", int(i[-1]))
    (tmp_path / "train.list").write_text("la_01\nla_02\n")
    (tmp_path / "test.list").write_text("la_03\n")
    for root in (tmp_path, tmp_path / "LA_data"):
        cases = list_cases({"layout": "la", "root": str(root)}, "train")
        assert ids(cases) == ["la_01", "la_02"]
        assert cases[1].path == tmp_path / "LA_data" / "la_02" / "mri_norm2.h5"
        assert cases[1].load().image.shape == (1, 12, 12, 8)
    uamt = tmp_path / "uamt"   # UA-MT: <data>/2018LA_Seg_Training Set/<id>/mri_norm2.h5, <data>/train.list
    _write_la(uamt / "2018LA_Seg_Training Set" / "la_01" / "mri_norm2.h5", 1)
    (uamt / "train.list").write_text("la_01\n")
    for root in (uamt, uamt / "2018LA_Seg_Training Set"):
        assert list_cases({"layout": "la", "root": str(root)}, "train")[0].load().label.shape == (12, 12, 8)

    from test_predict import Threshold, pred_cfg   # the stand-in network of the predict tests
    found = predict.find_inputs(tmp_path / "LA_data")
    assert ids(found) == ["la_01", "la_02", "la_03"]
    out = tmp_path / "pred"
    out.mkdir()
    written = [predict.predict_case(Threshold(), c, out, pred_cfg()) for c in found]
    assert [p.name for p in written] == ["la_01.nii.gz", "la_02.nii.gz", "la_03.nii.gz"]
    with pytest.raises(FileExistsError, match=r"la_01\.nii\.gz exists already \(--overwrite replaces it\)"):
        predict.predict_case(Threshold(), found[0], out, pred_cfg())
    assert predict.predict_case(Threshold(), found[0], out, pred_cfg(), overwrite=True) == written[0]


def test_checks_name_both_files_and_the_difference(tmp_path):
    cfg = nnunet_folder(tmp_path, labelled=("a", "b"), unlabelled=(), test=())
    moved = np.eye(4)
    moved[0, 3] = 2.0   # the label shifted by 2 mm
    nib.save(nib.Nifti1Image(_label(0), moved), tmp_path / "labelsTr" / "a.nii.gz")
    with pytest.raises(DataError, match=r"labelsTr/a\.nii\.gz \(case 'a'\): label affine differs from the image's "
                                        r"\(.*imagesTr/a_0000\.nii\.gz\) by up to 2 "):
        list_cases(cfg, "train")[0].load()
    nib.save(nib.Nifti1Image(_label(0) * 3, np.eye(4)), tmp_path / "labelsTr" / "a.nii.gz")
    with pytest.raises(DataError, match=r"a\.nii\.gz \(case 'a'\): label values \[3\] are not among "
                                        r"dataset.json's labels \[0, 1\]"):
        list_cases(cfg, "train")[0].load()
    (tmp_path / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case 'b': 1 of its 2 image file\(s\) are missing: .*b_0001\.nii\.gz.*"
                                        r"\['T1', 'CT'\]"):
        list_cases(cfg, "train")
