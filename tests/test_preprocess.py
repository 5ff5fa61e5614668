"""Preprocessing as nnU-Net does it: fingerprint from labelled training cases only, RAS
reorientation, normalisation, resampling, the cache, and predictions mapped back onto the
input's own grid (shape and affine) whatever the orientation it was stored in."""
import json

import numpy as np
import pytest
import torch

from dycon import predict
from dycon.data import Volume, list_cases, training_cases
from dycon.preprocess import (PreprocessedCase, apply_auto, apply_plan, fingerprint, main, make_plan, normalize,
                              predict_labels, prepare, suggest_patch_size, to_input_grid)

nib = pytest.importorskip("nibabel")

SHAPE = (12, 10, 8)
SPACING = (1.0, 1.5, 2.5)


def blob(shape=SHAPE, centre=(5, 4, 3), radius=3.0):
    grid = np.indices(shape)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2).astype(np.uint8)


def mri(label, seed):
    """Scanner units: background ~200, foreground ~900, a zero rim outside the body."""
    rng = np.random.default_rng(seed)
    image = 200 + 700 * label.astype(np.float64) + rng.normal(0, 30, label.shape)
    image[0] = 0
    return image.astype(np.float32)


def ras_affine(spacing=SPACING, origin=(-7.0, 3.0, 11.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def las_copy(array, affine):
    """The same voxels stored left-to-right (first axis flipped): same positions in space."""
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = array.shape[0] - 1
    return array[::-1].copy(), affine @ flip


def oblique_copy(array, affine, degrees=12.0):
    """Axes stored as (y, z, x), the grid turned by ``degrees`` about z: an oblique, permuted case."""
    perm = np.zeros((4, 4))
    perm[1, 0] = perm[2, 1] = perm[0, 2] = perm[3, 3] = 1   # new voxel axes (j, k, i) -> old (i, j, k)
    t = np.deg2rad(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return array.transpose(1, 2, 0).copy(), turn @ affine @ perm


def save(path, data, affine, int16_slope=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    if int16_slope:   # stored as int16 with an intensity scaling
        img.header.set_data_dtype(np.int16)
        img.header.set_slope_inter(int16_slope, 0.0)
    nib.save(img, str(path))


def dataset(root, cases, channels=("MRI",), test=()):
    """``cases``: {id: (image (X, Y, Z), label or None, affine)}; ``test``: ids of cases to put in imagesTs."""
    for case_id, (image, label, affine) in cases.items():
        folder = "imagesTs" if case_id in test else "imagesTr"
        save(root / folder / f"{case_id}_0000.nii.gz", image, affine)
        if label is not None:
            save(root / ("labelsTs" if case_id in test else "labelsTr") / f"{case_id}.nii.gz", label, affine)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": {"background": 0, "fg": 1},
        "file_ending": ".nii.gz"}))
    return {"layout": "nifti", "root": str(root)}


class Oriented(torch.nn.Module):
    """A stand-in network whose output depends on the axis directions (a random 3x3x3 kernel): a
    case fed in another orientation than trained on would be segmented differently."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x), None


class Bright(torch.nn.Module):
    """A stand-in network: foreground where the normalised image is bright."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 4 * (x - 0.5)], 1), None


def settings(plan, **kw):
    return dict(patch_size=(8, 8, 8), stride_xy=4, stride_z=4, num_classes=2, largest_component=False,
                device="cpu", batch_size=4, preprocessing=plan, **kw)


def test_reorientation_undoes_any_axis_order():
    rng = np.random.default_rng(0)
    image = rng.random((1, *SHAPE)).astype(np.float32)
    plan = {"normalization": [{"scheme": "none"}], "target_spacing": None}
    ref, _, _ = apply_plan(Volume(image, None, ras_affine(), SPACING), plan)
    for data, affine in (las_copy(image[0], ras_affine()), oblique_copy(image[0], ras_affine())):
        volume = Volume(data[None], None, affine, tuple(np.sqrt((affine[:3, :3] ** 2).sum(0))))
        moved, _, geometry = apply_plan(volume, plan)
        np.testing.assert_array_equal(moved, ref)   # the RAS array, whatever the stored order
        np.testing.assert_array_equal(to_input_grid(moved, geometry), data[None])   # and back


def test_las_and_oblique_cases_predict_like_their_ras_copy(tmp_path):
    label = blob()
    image = mri(label, 0)
    stored = {"ras": (image, ras_affine()), "las": las_copy(image, ras_affine()),
              "obl": oblique_copy(image, ras_affine())}
    cfg = dataset(tmp_path, {k: (v[0], None, v[1]) for k, v in stored.items()} | {
        "lab": (image, label, ras_affine())})
    plan = prepare(cfg, list_cases(cfg, "train"))
    assert plan["target_spacing"] == list(SPACING)
    preds = {c.id: predict_labels(Oriented(), c.load(), settings(plan), c.id) for c in list_cases(cfg, "unlabelled")}
    ras = preds["ras"]
    assert 0 < ras.sum() < ras.size   # an informative map, not all one class
    np.testing.assert_array_equal(preds["las"], ras[::-1])
    np.testing.assert_array_equal(preds["obl"], ras.transpose(1, 2, 0))
    # without reorientation the stored LAS array would be segmented differently
    plain = predict_labels(Oriented(), list_cases(cfg, "unlabelled")[0].load(), settings(None))
    assert not np.array_equal(plain[::-1], preds["ras"])


def test_prediction_is_on_the_input_grid_with_its_affine(tmp_path):
    """An anisotropic int16 case with a scaling slope, stored LAS, resampled to another spacing:
    the written label map has the input's shape, affine and matches the blob up to interpolation."""
    label = blob((16, 12, 6), (8, 6, 3), 3.5)
    image, affine = las_copy(mri(label, 1), ras_affine((0.8, 0.8, 3.0)))
    save(tmp_path / "in" / "p1_0000.nii.gz", np.round(image / 0.5).astype(np.int16), affine, int16_slope=0.5)
    plan = {"normalization": [{"scheme": "zscore"}], "target_spacing": [1.2, 1.2, 1.5]}

    (case,) = predict.find_inputs(tmp_path / "in")
    out = predict.predict_case(Bright(), case, tmp_path, settings(plan, in_channels=1, h5_transpose=None))
    written = nib.load(str(out))
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, affine)
    pred, truth = np.asarray(written.dataobj), label[::-1]
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.85


def test_normalisation_statistics_come_from_labelled_training_cases_only(tmp_path):
    label = blob()
    ct = {k: (mri(label, i) - 1000 * (i > 1), label, ras_affine()) for i, k in enumerate(["a", "b", "c"])}
    other = {"u": (mri(label, 7) * 50, None, ras_affine()), "t": (mri(label, 8) * 80, label, ras_affine())}
    cfg = dataset(tmp_path, ct | other, channels=("CT",), test=("t",))
    (tmp_path / "val.txt").write_text("c\n")
    cases, labelled, unlabelled = training_cases(cfg, labelnum=1)
    assert [cases[i].id for i in labelled] == ["a"] and [cases[i].id for i in unlabelled] == ["b", "u"]
    plan = prepare(cfg, [cases[i] for i in labelled], tmp_path)
    # nnU-Net's draws, with replacement, RandomState(1234); 10^5 in the tests (conftest.py)
    foreground = np.random.RandomState(1234).choice(ct["a"][0][label > 0].astype(np.float32), 10 ** 5)
    scheme = plan["normalization"][0]
    assert scheme["scheme"] == "ct"
    np.testing.assert_allclose([scheme["lower"], scheme["upper"], scheme["mean"], scheme["std"]],
                               [np.percentile(foreground, 0.5), np.percentile(foreground, 99.5),
                                foreground.mean(), foreground.std()], rtol=1e-6)
    saved = json.loads((tmp_path / "fingerprint.json").read_text())
    assert saved["cases"] == ["a"] and saved == plan["fingerprint"]
    assert json.loads((tmp_path / "preprocessing.json").read_text()) == {k: v for k, v in plan.items()
                                                                         if k != "fingerprint"}
    # CT: clipped to the percentiles, then standardised
    out = normalize(np.array([[[[-5000.0, scheme["mean"], 1e6]]]]), plan["normalization"])
    np.testing.assert_allclose(out.ravel(), [(scheme["lower"] - scheme["mean"]) / scheme["std"], 0,
                                             (scheme["upper"] - scheme["mean"]) / scheme["std"]], rtol=1e-5)


def test_zscore_over_the_nonzero_region_and_int16_slope(tmp_path):
    label = blob()
    image = mri(label, 2)
    save(tmp_path / "i.nii.gz", np.round(image / 0.25).astype(np.int16), ras_affine(), int16_slope=0.25)
    stored = nib.load(str(tmp_path / "i.nii.gz"))
    assert stored.get_data_dtype() == np.int16 and stored.dataobj.slope == 0.25
    as_int = np.asarray(stored.dataobj, np.float32)
    np.testing.assert_allclose(as_int, image, atol=0.125 + 1e-4)   # the slope is applied on reading
    out = normalize(as_int[None], [{"scheme": "zscore"}])[0]
    inside = as_int != 0
    assert np.all(out[~inside] == 0)
    np.testing.assert_allclose([out[inside].mean(), out[inside].std()], [0, 1], atol=1e-5)


def test_fingerprint_plan_and_patch_size(tmp_path):
    label = blob()
    cfg = dataset(tmp_path, {"a": (mri(label, 0), label, ras_affine((1, 1, 2))),
                             "b": (mri(label, 1), label, ras_affine((1, 1, 4)))})
    fp = fingerprint(list_cases(cfg, "train"))
    assert fp["spacings"] == [[1, 1, 2], [1, 1, 4]] and fp["median_spacing"] == [1, 1, 3]
    plan = make_plan(fp, json.loads((tmp_path / "dataset.json").read_text()))
    assert (plan["in_channels"], plan["num_classes"]) == (1, 2)
    assert plan["normalization"] == [{"scheme": "zscore", "use_mask": False}]   # no zero background to leave out
    assert suggest_patch_size([300, 300, 90]) == [96, 96, 96]   # 128, 128, 96 shrunk to the voxel budget
    assert suggest_patch_size([20, 40, 7]) == [32, 48, 32]
    image, label_pp, _ = apply_plan(list_cases(cfg, "train")[1].load(), plan)
    assert image.shape == (1, 12, 10, 11) and label_pp.shape == (12, 10, 11)   # z: 8 slices of 4 mm -> 3 mm


def test_cache_and_command_line(tmp_path):
    label = blob()
    cfg = dataset(tmp_path / "data", {k: (mri(label, i), label if k != "u" else None, ras_affine())
                                      for i, k in enumerate("abu")})
    folder = main(["--root_path", cfg["root"], "--labelnum", "1"])
    assert sorted(p.name for p in folder.iterdir()) == ["a.npz", "b.npz", "fingerprint.json", "preprocessing.json",
                                                        "u.npz"]
    plan = json.loads((folder / "preprocessing.json").read_text())
    case = PreprocessedCase(list_cases(cfg, "train")[0], plan, folder)
    cached = case.load()
    np.testing.assert_array_equal(cached.image, apply_plan(case.case.load(), plan)[0])
    save(tmp_path / "data" / "imagesTr" / "a_0000.nii.gz", mri(label, 5), ras_affine())   # the source changed
    assert not np.array_equal(case.load().image, cached.image)
    assert PreprocessedCase(list_cases(cfg, "unlabelled")[0], plan, folder).load().label is None


def test_auto_config_values_come_from_the_plan():
    plan = {"in_channels": 2, "num_classes": 3, "patch_size": [64, 48, 16]}
    cfg = {"model": {"in_channels": "auto", "num_classes": 4}, "train": {"patch_size": "auto"},
           "val": {"stride_xy": "auto", "stride_z": "auto"}, "test": {"stride_xy": 8, "stride_z": "auto"}}
    apply_auto(cfg, plan)
    assert cfg["model"] == {"in_channels": 2, "num_classes": 4} and cfg["train"]["patch_size"] == [64, 48, 16]
    assert cfg["val"] == {"stride_xy": 24, "stride_z": 8} and cfg["test"] == {"stride_xy": 8, "stride_z": 8}
    with pytest.raises(ValueError, match="model.in_channels is 'auto' but the data set does not say it"):
        apply_auto({"model": {"in_channels": "auto"}, "train": {"patch_size": [16, 16, 16]}}, None)


def test_evaluation_scores_on_the_label_grid(tmp_path):
    """A LAS case evaluated through the plan: the prediction, back on the stored grid, is scored
    against the stored label (a perfect stand-in network scores Dice 1)."""
    from dycon.evaluate import evaluate_cases
    label = blob()
    image, affine = las_copy(mri(label, 3), ras_affine())
    cfg = dataset(tmp_path, {"a": (mri(label, 4), label, ras_affine()), "b": (image, label[::-1].copy(), affine)},
                  test=("b",))
    plan = prepare(cfg, list_cases(cfg, "train"))

    rows, summary = evaluate_cases(Bright(), list_cases(cfg, "test"), settings(plan))
    assert [r["case"] for r in rows] == ["b"] and rows[0]["dice"] == 1.0


def test_official_preset_refuses_images_without_labels(tmp_path):
    """The released preset reads the ground truth of the unlabelled volumes: a pool of images
    without label files cannot give it one."""
    from dycon.preprocess import training_data
    label = blob()
    cfg = dataset(tmp_path, {"a": (mri(label, 0), label, ras_affine()), "u": (mri(label, 1), None, ras_affine())})
    run = {"data": dict(cfg, labelnum=1), "train": {"preset": "official", "method": "dycon"}}
    with pytest.raises(ValueError, match=r"preset 'official'.*1 images without a label file \(\['u'\]"):
        training_data(run, None)
    run["train"]["preset"] = "dycon"
    cases, labelled, unlabelled = training_data(run, tmp_path)
    assert [c.id for c in cases] == ["a", "u"] and (labelled, unlabelled) == ([0], [1])
    assert json.loads((tmp_path / "splits.json").read_text())["unlabelled"] == ["u"]
    assert cases[1].load().label is None and cases[1].load().image.shape == (1, *SHAPE)


def test_anisotropic_axis_is_resampled_apart_with_nearest_neighbours():
    """Slices 4 mm apart, to 2 mm: the thick axis is not interpolated (every new slice is a copy
    of a stored one), the fine axes are (cubic)."""
    rng = np.random.default_rng(3)
    image = rng.random((1, 8, 8, 5)).astype(np.float32) + 1   # non-zero: the whole volume is z-scored
    plan = {"normalization": [{"scheme": "none"}], "target_spacing": [0.5, 1.0, 2.0]}
    out, _, geometry = apply_plan(Volume(image, None, ras_affine((1.0, 1.0, 4.0)), (1.0, 1.0, 4.0)), plan)
    assert out.shape == (1, 16, 8, 10)
    in_plane = out[0, :, :, ::2]
    np.testing.assert_array_equal(out[0, :, :, 1::2], in_plane)   # z: each slice doubled
    assert not np.isin(in_plane[1::2], image).all()                # x: new values between the old ones
    back = to_input_grid(out, geometry)
    assert back.shape == image.shape
