"""Prediction on NIfTI and h5 files, and the evaluate / predict command lines end to end."""
import csv
import json

import h5py
import numpy as np
import pytest
import torch

from dycon import evaluate, predict
from dycon.networks import build_model


class Threshold(torch.nn.Module):
    """Stand-in network: foreground where the sum of the channels is above 0.5."""

    def forward(self, x):
        fg = 20 * (x.sum(1, keepdim=True) - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], 1), None


def pred_cfg(**overrides):
    cfg = dict(patch_size=(8, 8, 8), stride_xy=4, stride_z=4, num_classes=2, in_channels=1,
               largest_component=False, device="cpu", batch_size=2, h5_transpose=None)
    return {**cfg, **overrides}


def blob_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) > 0.7).astype(np.float32)


def write_nifti(path, data, affine, scale=None):
    nib = pytest.importorskip("nibabel")
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = b"dycon test"
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    if scale:  # stored as int16 with an intensity scaling, as CT often is
        img.header.set_data_dtype(np.int16)
        img.header.set_slope_inter(*scale)
    nib.save(img, str(path))
    return nib.load(str(path))


AFFINE = np.array([[0.0, -0.8, 0.0, 10.0],
                   [1.2, 0.0, 0.0, -5.0],
                   [0.0, 0.0, 2.5, 30.0],
                   [0.0, 0.0, 0.0, 1.0]])


def test_nifti_two_channels_round_trip_keeps_affine_and_header(tmp_path):
    nib = pytest.importorskip("nibabel")
    shape = (11, 9, 7)
    c0, c1 = blob_image(shape, 0) * 0.4, blob_image(shape, 1) * 0.4   # foreground where both are set
    (tmp_path / "in").mkdir()
    ref = write_nifti(tmp_path / "in" / "case1_0000.nii.gz", c0 * 10, AFFINE, scale=(0.1, 0.0))
    write_nifti(tmp_path / "in" / "case1_0001.nii.gz", c1, AFFINE)

    cases = predict.find_inputs(tmp_path / "in" / "case1_0001.nii.gz")   # one file finds its siblings
    assert [(c.id, [p.name for p in c.image_files]) for c in cases] == [
        ("case1", ["case1_0000.nii.gz", "case1_0001.nii.gz"])]
    out = predict.predict_case(Threshold(), cases[0], tmp_path, pred_cfg(in_channels=2))
    assert out.name == "case1.nii.gz"

    written = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(written.dataobj), (c0 + c1) > 0.5)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, ref.affine)
    for key in ("descrip", "xyzt_units", "qform_code", "sform_code", "pixdim", "dim", "srow_x", "quatern_b"):
        np.testing.assert_array_equal(written.header[key], ref.header[key], err_msg=key)


def test_folder_groups_cases_and_single_channel_files(tmp_path):
    pytest.importorskip("nibabel")
    shape = (9, 8, 8)
    write_nifti(tmp_path / "b_0000.nii.gz", blob_image(shape), np.eye(4))
    write_nifti(tmp_path / "a.nii", blob_image(shape, 2), np.eye(4))
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["image"] = blob_image(shape, 3)
    (tmp_path / "notes.txt").write_text("ignored")
    cases = predict.find_inputs(tmp_path)
    found = [(c.id, c.layout, len(c.image_files)) for c in cases]
    assert found == [("a", "nifti", 1), ("b", "nifti", 1), ("c", "h5", 1)]


def test_h5_input_to_nifti_with_identity_affine_and_to_h5(tmp_path):
    nib = pytest.importorskip("nibabel")
    stored = blob_image((12, 10, 9))
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f["image"] = stored
        f["label"] = np.zeros(stored.shape, np.uint8)
    case = predict.find_inputs(tmp_path / "vol.h5")[0]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # the BraTS layout transposes (2, 1, 0) for the network; outputs keep the file's axis order
    cfg = pred_cfg(h5_transpose=(2, 1, 0))
    nifti = nib.load(str(predict.predict_case(Threshold(), case, out_dir, cfg)))
    np.testing.assert_array_equal(nifti.affine, np.eye(4))
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), stored > 0.5)

    out = predict.predict_case(Threshold(), case, out_dir, cfg, h5_out=True)
    with h5py.File(out, "r") as f:
        assert f["prediction"].dtype == np.uint8
        np.testing.assert_array_equal(f["prediction"][()], stored > 0.5)


def test_unreadable_and_malformed_inputs_name_the_file(tmp_path):
    (tmp_path / "broken.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match=r"broken\.h5 \(case 'broken'\): cannot read as HDF5"):
        predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "broken.h5")[0], tmp_path, pred_cfg())
    with h5py.File(tmp_path / "nokey.h5", "w") as f:
        f["volume"] = np.zeros((8, 8, 8))
    with pytest.raises(ValueError, match=r"nokey\.h5 \(case 'nokey'\): missing key 'image' \(keys: \['volume'\]\)"):
        predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "nokey.h5")[0], tmp_path, pred_cfg())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported file type"):
        predict.find_inputs(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        predict.find_inputs(tmp_path / "missing.nii.gz")
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["image"] = np.zeros((2, 8, 8, 8))
    with pytest.raises(ValueError, match=r"2 channel\(s\) in .*two\.h5.*the model takes 1"):
        predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "two.h5")[0], tmp_path, pred_cfg())
    image = np.random.rand(8, 8, 8)
    image[2, 3, 4] = np.nan
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["image"] = image
    with pytest.raises(ValueError, match=r"nan\.h5 \(case 'nan'\): image has 1 NaN/Inf value"):
        predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "nan.h5")[0], tmp_path, pred_cfg())


def test_unreadable_nifti_and_channel_gaps(tmp_path):
    pytest.importorskip("nibabel")
    (tmp_path / "bad_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match=r"bad_0000\.nii\.gz \(case 'bad'\): cannot read as NIfTI"):
        predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "bad_0000.nii.gz")[0], tmp_path, pred_cfg())
    write_nifti(tmp_path / "gap_0000.nii.gz", blob_image((8, 8, 8)), np.eye(4))
    write_nifti(tmp_path / "gap_0002.nii.gz", blob_image((8, 8, 8)), np.eye(4))
    with pytest.raises(ValueError, match=r"case 'gap': channel files must be numbered _0000 to _0001, found \[0, 2\]"):
        predict.find_inputs(tmp_path / "gap_0000.nii.gz")
    write_nifti(tmp_path / "same.nii.gz", blob_image((8, 8, 8)), np.eye(4))
    with pytest.raises(ValueError, match="would overwrite its input"):
        predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "same.nii.gz")[0], tmp_path, pred_cfg())


# ---- command lines, with a real (tiny, untrained) network ---------------------------------------

MODEL_CFG = dict(arch="unet3d", in_channels=1, num_classes=2, base_filters=2, embed_dim=8, feature_scaler=2)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as dycon.train writes it: RUN/best.pt holding the merged config."""
    torch.manual_seed(0)
    model = build_model(MODEL_CFG)
    config = {"model": MODEL_CFG, "data": {"layout": "brats", "root": str(tmp_path / "elsewhere")},
              "train": {"patch_size": [32, 32, 32]},   # the U-Net needs > 1 bottleneck voxel
              "test": {"stride_xy": 8, "stride_z": 8, "largest_component": False}}
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"student": model.state_dict(), "teacher": model.state_dict(), "config": config,
                "step": 10, "best_dice": 0.5}, run / "best.pt")
    return run


@pytest.fixture
def brats_root(tmp_path):
    root = tmp_path / "brats"
    (root / "data").mkdir(parents=True)
    for i, shape in enumerate([(18, 20, 17), (16, 17, 19)]):
        label = np.zeros(shape, np.uint8)
        label[4:10, 5:12, 6:11] = 1
        with h5py.File(root / "data" / f"case{i}.h5", "w") as f:
            f["image"] = label + np.random.default_rng(i).normal(0, 0.1, shape).astype(np.float32)
            f["label"] = label
    (root / "test.txt").write_text("case0\ncase1\n")
    (root / "val.txt").write_text("case1\n")
    return root


def test_evaluate_cli(run_dir, brats_root, tmp_path, capsys):
    summary = evaluate.main(["--run", str(run_dir), "--root_path", str(brats_root), "--device", "cpu",
                             "--stride_xy", "16", "--hd", "monai", "--weights", "teacher"])
    out_dir = run_dir / "eval_test_teacher"
    with open(out_dir / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["case0", "case1"]
    assert set(rows[0]) == {"case", "class", "dice", "jaccard", "hd95", "asd", "empty"}
    saved = json.loads((out_dir / "summary.json").read_text())
    assert saved["hd_definition"] == "monai" and saved["split"] == "test" and saved["n_cases"] == 2
    # flags win over the run's test config, which wins over the released defaults
    assert (saved["stride_xy"], saved["stride_z"], saved["largest_component"], saved["units"]) == (16, 8, False, "voxel")
    assert saved == json.loads(json.dumps(summary))
    assert "MONAI" in capsys.readouterr().out

    evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--root_path", str(brats_root),
                   "--split", "val", "--device", "cpu", "--output", str(tmp_path / "report"), "--largest-component"])
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["largest_component"] is True and saved["n_cases"] == 1


def test_evaluate_cli_errors(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nowhere/best\.pt"):
        evaluate.main(["--run", str(tmp_path / "nowhere"), "--device", "cpu"])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*junk\.pt"):
        evaluate.main(["--checkpoint", str(tmp_path / "junk.pt"), "--device", "cpu"])
    torch.save({"student": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['config'\]"):
        evaluate.main(["--checkpoint", str(tmp_path / "partial.pt"), "--device", "cpu"])


def test_predict_cli_on_h5_and_nifti(run_dir, brats_root, tmp_path):
    nib = pytest.importorskip("nibabel")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_nifti(inputs / "scan_0000.nii.gz", blob_image((20, 18, 12)), AFFINE)
    written = predict.main(["--checkpoint", str(run_dir / "best.pt"), "--input", str(inputs),
                            "--output", str(tmp_path / "pred"), "--device", "cpu"])
    img = nib.load(str(written[0]))
    assert written[0].name == "scan.nii.gz" and img.shape == (20, 18, 12)
    np.testing.assert_allclose(img.affine, AFFINE)

    (run_dir / "best.pt").rename(run_dir / "latest.pt")   # a run that never validated
    written = predict.main(["--run", str(run_dir), "--h5",
                            "--input", str(brats_root / "data" / "case0.h5"), "--output", str(tmp_path / "pred"),
                            "--device", "cpu"])
    with h5py.File(written[0], "r") as f:
        assert f["prediction"].shape == (18, 20, 17)   # the stored shape, although BraTS runs transposed


def test_nifti2_input_gives_nifti2_output_and_4d_input_is_refused(tmp_path):
    nib = pytest.importorskip("nibabel")
    image = blob_image((9, 8, 7), 4)
    nib.save(nib.Nifti2Image(image, AFFINE), str(tmp_path / "n2.nii"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    written = nib.load(str(predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "n2.nii")[0],
                                                out_dir, pred_cfg())))
    assert isinstance(written, nib.Nifti2Image)
    np.testing.assert_allclose(written.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(written.dataobj), image > 0.5)
    nib.save(nib.Nifti1Image(np.stack([image, image], -1), AFFINE), str(tmp_path / "four.nii.gz"))
    with pytest.raises(ValueError, match=r"four\.nii\.gz \(case 'four'\): image must be a 3D volume.*\(9, 8, 7, 2\)"):
        predict.predict_case(Threshold(), predict.find_inputs(tmp_path / "four.nii.gz")[0], out_dir, pred_cfg())
