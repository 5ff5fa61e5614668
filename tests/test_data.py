"""Data layouts, labelled split, the two-stream sampler, patches, the demo generator, bad files."""
import gzip
import json

import h5py
import numpy as np
import pytest

from dycon.data import DataError, labelled_split, list_cases
from dycon.batches import PatchDataset, TwoStreamBatchSampler, random_crop, rot_flip
from dycon.demo import ensure_demo_data


def write_h5(path, image, label, label_key="label"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"] = image
        f[label_key] = label


def volume(shape=(4, 5, 6), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), (rng.random(shape) > 0.7).astype(np.uint8)


def test_brats_layout_transposes(tmp_path):
    image, label = volume()
    for i in ("a", "b"):
        write_h5(tmp_path / "data" / f"{i}.h5", image, label)
    (tmp_path / "train.txt").write_text("a\n")
    (tmp_path / "test.txt").write_text("b\n")
    cases = list_cases({"layout": "brats", "root": str(tmp_path)}, "train") + \
        list_cases({"layout": "brats", "root": str(tmp_path)}, "test")
    assert [c.id for c in cases] == ["a", "b"]
    vol = cases[0].load()
    assert vol.image.shape == (1, 6, 5, 4) and vol.image.dtype == np.float32
    np.testing.assert_array_equal(vol.image[0], image.transpose(2, 1, 0))
    np.testing.assert_array_equal(vol.label, label.transpose(2, 1, 0))
    assert vol.label.dtype == np.uint8 and vol.affine is None and vol.spacing is None
    assert list_cases({"layout": "brats", "root": str(tmp_path)}, "unlabelled") == []


def test_la_pancreas_isles_layouts(tmp_path):
    image, label = volume()
    write_h5(tmp_path / "la" / "c1" / "mri_norm2.h5", image, label)
    (tmp_path / "la" / "train.list").write_text("c1\n")
    write_h5(tmp_path / "pan" / "Pancreas_data" / "p1.h5", image, label)
    (tmp_path / "pan" / "train.list").write_text("p1.h5\n")          # released lists carry .h5
    write_h5(tmp_path / "isles" / "s1.h5", np.stack([image, image]), label, label_key="mask")
    (tmp_path / "isles" / "train.list").write_text("s1\n")
    for layout, folder, channels in (("la", "la", 1), ("pancreas", "pan", 1), ("isles", "isles", 2)):
        (case,) = list_cases({"layout": layout, "root": str(tmp_path / folder)}, "train")
        vol = case.load()
        assert vol.image.shape == (channels, 4, 5, 6)
        np.testing.assert_array_equal(vol.label, label)   # no transpose outside BraTS
    assert case.id == "s1"


def test_holdout_val(tmp_path):
    (tmp_path / "train.list").write_text("".join(f"c{i}\n" for i in range(10)))
    cfg = {"layout": "la", "root": str(tmp_path), "holdout_val": 3}
    assert [c.id for c in list_cases(cfg, "val")] == ["c7", "c8", "c9"]
    assert len(list_cases(cfg, "train")) == 7


def test_nifti_layout(tmp_path):
    nib = pytest.importorskip("nibabel")
    image, label = volume((6, 5, 4))
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    for d in ("imagesTr", "labelsTr"):
        (tmp_path / d).mkdir()
    for c in range(2):
        nib.save(nib.Nifti1Image(image + c, affine), tmp_path / "imagesTr" / f"k1_{c:04d}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "labelsTr" / "k1.nii.gz")
    (tmp_path / "dataset.json").write_text('{"channel_names": {"0": "T1", "1": "T2"}, "labels": {}}')
    (case,) = list_cases({"layout": "nifti", "root": str(tmp_path)}, "train")
    vol = case.load()
    assert vol.image.shape == (2, 6, 5, 4)
    np.testing.assert_allclose(vol.image[1], image + 1)
    np.testing.assert_array_equal(vol.label, label)
    np.testing.assert_allclose(vol.affine, affine)
    assert vol.spacing == (1.5, 2.0, 3.0) and vol.header is not None
    with pytest.raises(FileNotFoundError, match="val"):
        list_cases({"layout": "nifti", "root": str(tmp_path)}, "val")


def test_clear_errors(tmp_path):
    cfg = {"layout": "brats", "root": str(tmp_path)}
    with pytest.raises(FileNotFoundError, match="train.txt"):
        list_cases(cfg, "train")
    (tmp_path / "train.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="train.txt.*empty"):
        list_cases(cfg, "train")
    (tmp_path / "train.txt").write_text("gone\nbroken\nnokey\n")
    gone, broken, nokey = list_cases(cfg, "train")
    with pytest.raises(FileNotFoundError, match="gone.h5"):
        gone.load()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.h5").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match="broken.h5"):
        broken.load()
    with h5py.File(tmp_path / "data" / "nokey.h5", "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="nokey.h5.*'label'"):
        nokey.load()
    with pytest.raises(ValueError, match="layout"):
        list_cases({"layout": "acdc", "root": str(tmp_path)}, "train")
    with pytest.raises(ValueError, match="split"):
        list_cases(cfg, "training")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_cases({"layout": "la", "root": str(tmp_path / "nowhere")}, "train")



def raises_naming(path, case_id, pattern, error=ValueError):
    """pytest.raises for an error whose message names ``path``, the case and the problem."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(error, match=pattern)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            done = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert str(path) in message, message
            assert repr(case_id) in message, message
            return done
    return Check()


def _cut(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])


def _h5_case(tmp_path, build):
    """A BraTS-layout case 'bad' whose file is written by ``build(path)``."""
    path = tmp_path / "data" / "bad.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    build(path)
    (tmp_path / "train.txt").write_text("bad\n")
    (case,) = list_cases({"layout": "brats", "root": str(tmp_path)}, "train")
    return case


def _good(path):
    write_h5(path, *volume((8, 8, 8)))


def _truncated(path):
    _good(path)
    _cut(path)


def _only(key, image, label):
    def build(path):
        with h5py.File(path, "w") as f:
            if key != "label":
                f["image"] = image
            if key != "image":
                f["label"] = label
    return build


IMAGE, LABEL = volume((4, 5, 6))
NAN_IMAGE, INF_IMAGE = IMAGE.copy(), IMAGE.copy()
NAN_IMAGE[1, 2, 3], INF_IMAGE[0, 0, 0] = np.nan, np.inf


def _group_image(path):
    with h5py.File(path, "w") as f:
        f.create_group("image")
        f["label"] = LABEL


BAD_H5 = {   # name: (build the file, what the message must say)
    "truncated": (_truncated, r"cannot read as HDF5.*truncated"),
    "not_hdf5": (lambda p: p.write_bytes(b"\x89PNG this is no HDF5 file" * 20), r"cannot read as HDF5"),
    "missing_image": (_only("label", IMAGE, LABEL), r"missing key 'image'"),
    "missing_label": (_only("image", IMAGE, LABEL), r"missing key 'label'"),
    "image_is_group": (_group_image, r"'image' is a Group, not an array"),
    "shape_mismatch": (lambda p: write_h5(p, IMAGE, LABEL[:, :, :5]),
                       r"'label' must be \(X, Y, Z\) of the image's size; got \(4, 5, 5\) for image \(4, 5, 6\)"),
    "image_2d": (lambda p: write_h5(p, IMAGE[0], LABEL), r"\(X, Y, Z\) or \(C, X, Y, Z\).*\(5, 6\)"),
    "image_5d": (lambda p: write_h5(p, IMAGE[None, None], LABEL), r"\(C, X, Y, Z\).*\(1, 1, 4, 5, 6\)"),
    "label_4d": (lambda p: write_h5(p, IMAGE, LABEL[None]), r"'label' must be \(X, Y, Z\).*got \(1, 4, 5, 6\)"),
    "label_fractional": (lambda p: write_h5(p, IMAGE, LABEL * 0.5), r"label holds \d+ non-integer value.*0\.5"),
    "label_nan": (lambda p: write_h5(p, IMAGE, np.where(LABEL, np.nan, 0.0)), r"non-integer value.*nan"),
    "label_negative": (lambda p: write_h5(p, IMAGE, LABEL.astype(np.int16) - 1), r"negative values \(min -1\)"),
    "label_over_255": (lambda p: write_h5(p, IMAGE, LABEL.astype(np.uint16) * 300), r"up to 300.*255"),
    "image_nan": (lambda p: write_h5(p, NAN_IMAGE, LABEL), r"image has 1 NaN/Inf value"),
    "image_inf": (lambda p: write_h5(p, INF_IMAGE, LABEL), r"image has 1 NaN/Inf value"),
    "image_overflows_float32": (lambda p: write_h5(p, IMAGE.astype(np.float64) * 1e300, LABEL),
                                r"NaN/Inf.*beyond the float32 range"),
    "image_strings": (lambda p: write_h5(p, np.full((4, 5, 6), b"x"), LABEL), r"image has dtype \|S1"),
    "empty": (lambda p: write_h5(p, np.zeros((0, 5, 6), np.float32), np.zeros((0, 5, 6), np.uint8)),
              r"image is empty"),
    "empty_channels": (lambda p: write_h5(p, np.zeros((0, 4, 5, 6), np.float32), LABEL), r"image is empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_H5))
def test_bad_h5_files_name_the_file_and_the_problem(tmp_path, kind):
    build, pattern = BAD_H5[kind]
    case = _h5_case(tmp_path, build)
    with raises_naming(case.path, "bad", pattern, DataError) as info:
        case.load()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("image_dtype", [np.int16, np.uint8, np.float64, np.float16, bool])
@pytest.mark.parametrize("label_dtype", [np.uint8, np.int64, np.float32, np.float64, bool])
def test_h5_other_dtypes_are_converted(tmp_path, image_dtype, label_dtype):
    image = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 7).astype(image_dtype)
    label = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 2).astype(label_dtype)
    case = _h5_case(tmp_path, lambda p: write_h5(p, image, label))
    vol = case.load()
    assert vol.image.dtype == np.float32 and vol.label.dtype == np.uint8
    np.testing.assert_array_equal(vol.image[0], image.astype(np.float32).transpose(2, 1, 0))
    np.testing.assert_array_equal(vol.label, label.astype(np.uint8).transpose(2, 1, 0))


def test_label_values_checked_against_num_classes(tmp_path):
    image, label = volume((20, 20, 20))
    label[3, 4, 5] = 2
    write_h5(tmp_path / "data" / "three.h5", image, label)
    (tmp_path / "train.txt").write_text("three\n")
    cases = list_cases({"layout": "brats", "root": str(tmp_path)}, "train")
    for cache in (False, True):
        ds = PatchDataset(cases, (16, 16, 16), cache=cache, num_classes=2)
        with raises_naming(cases[0].path, "three", r"up to 2 but num_classes is 2 \(labels must be 0 \.\. 1"):
            ds[(0, 1)]
    assert PatchDataset(cases, (16, 16, 16), num_classes=3)[(0, 1)]["label"].max() <= 2
    assert PatchDataset(cases, (16, 16, 16))[(0, 1)]["image"].shape == (1, 16, 16, 16)   # default: no check
    with raises_naming(cases[0].path, "three", r"num_classes is 2"):
        cases[0].load(num_classes=2)


def _nifti_case(tmp_path, nib, channels=2, image=None, label=None, shapes=None, size=(6, 5, 4)):
    """A NIfTI data set with one case 'k1'; returns (case, channel paths, label path)."""
    for d in ("imagesTr", "labelsTr"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    default_image, default_label = volume(size)
    paths = [tmp_path / "imagesTr" / f"k1_{c:04d}.nii.gz" for c in range(channels)]
    for c, path in enumerate(paths):
        data = image[c] if image is not None and image[c] is not None else default_image
        if shapes and shapes[c]:
            data = np.zeros(shapes[c], np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    label_path = tmp_path / "labelsTr" / "k1.nii.gz"
    nib.save(nib.Nifti1Image(default_label if label is None else label, np.eye(4)), label_path)
    names = {str(c): f"m{c}" for c in range(channels)}
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": names, "labels": {}}))
    (case,) = list_cases({"layout": "nifti", "root": str(tmp_path)}, "train")
    return case, paths, label_path


def test_bad_nifti_files_name_the_file_and_the_problem(tmp_path):
    nib = pytest.importorskip("nibabel")
    _, base_label = volume((6, 5, 4))
    nan_image = volume((6, 5, 4))[0]
    nan_image[2, 2, 2] = np.nan
    checks = [   # (files to build, which file breaks, what to do to it, pattern)
        # cut in the data, not the header: nibabel opens the file and decodes its first voxels
        (dict(size=(40, 40, 40)), 1, _cut, r"cannot read as NIfTI \(EOFError"),
        (dict(size=(40, 40, 40)), "label", _cut, r"cannot read as NIfTI"),
        (dict(), 0, lambda p: _cut(p, 0.3), r"cannot read as NIfTI"),   # header cut too
        (dict(), 0, lambda p: p.write_text("just some text, not an image"), r"cannot read as NIfTI"),
        (dict(), 0, lambda p: p.write_bytes(gzip.compress(b"no NIfTI header here" * 40)), r"cannot read as NIfTI"),
        (dict(shapes=[(6, 5, 4, 2), None]), 0, None, r"must be a 3D volume, got shape \(6, 5, 4, 2\)"),
        (dict(shapes=[None, (6, 5, 3)]), 1, None, r"channel shape \(6, 5, 3\) != image shape \(6, 5, 4\) of .*k1_0000"),
        (dict(image=[None, nan_image]), 1, None, r"image has 1 NaN/Inf value"),
        (dict(label=base_label.astype(np.float32) * 0.5), "label", None, r"non-integer value.*0\.5"),
        (dict(label=base_label.astype(np.int16) - 1), "label", None, r"negative values \(min -1\)"),
        (dict(label=base_label[:, :, :3]), "label", None, r"label shape \(6, 5, 3\) != image shape \(6, 5, 4\)"),
    ]
    for n, (files, which, damage, pattern) in enumerate(checks):
        root = tmp_path / str(n)
        root.mkdir()
        case, paths, label_path = _nifti_case(root, nib, **files)
        target = label_path if which == "label" else paths[which]
        if damage:
            damage(target)
        with raises_naming(target, "k1", pattern, DataError):
            case.load()
    case, paths, label_path = _nifti_case(tmp_path / "ok", nib, label=(base_label * 2).astype(np.float64))
    assert case.load().label.dtype == np.uint8          # whole-number float labels are fine
    with raises_naming(label_path, "k1", r"up to 2 but num_classes is 2"):
        case.load(num_classes=2)
    paths[1].unlink()
    with raises_naming(paths[1], "k1", "does not exist", FileNotFoundError):
        case.load()


def test_labelled_split():
    assert labelled_split(5, 2) == ([0, 1], [2, 3, 4])
    with pytest.raises(ValueError, match="labelnum"):
        labelled_split(5, 0)


def test_sampler_streams():
    sampler = TwoStreamBatchSampler(list(range(4)), list(range(4, 10)), 2, 3, seed=7)
    assert len(sampler) == 2
    epochs = [list(sampler) for _ in range(3)]
    for epoch in epochs:                    # each epoch: one pass over the labelled list
        assert len(epoch) == 2
        assert sorted(i for batch in epoch for i, _ in batch[:2]) == [0, 1, 2, 3]
    unlabelled = [i for epoch in epochs for batch in epoch for i, _ in batch[2:]]
    assert sorted(unlabelled[:6]) == sorted(unlabelled[6:12]) == list(range(4, 10))   # cycled
    assert epochs[0] != epochs[1]           # reshuffled
    seeds = [s for epoch in epochs for batch in epoch for _, s in batch]
    assert len(set(seeds)) == len(seeds)


def test_sampler_state_resumes_exactly():
    a = TwoStreamBatchSampler(list(range(5)), list(range(5, 12)), 2, 2, seed=3)
    it = iter(a)
    next(it)                                 # stop in the middle of an epoch
    b = TwoStreamBatchSampler(list(range(5)), list(range(5, 12)), 2, 2, seed=3)
    b.load_state_dict(a.state_dict())
    rest_a = list(it) + [x for _ in range(2) for x in a]
    rest_b = list(b) + [x for _ in range(2) for x in b]
    assert rest_a == rest_b and a.state_dict() == b.state_dict() == {"batches": 6, "seed": 3}
    with pytest.raises(ValueError, match="seed"):
        TwoStreamBatchSampler([0, 1], [], 2, 0, seed=4).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="labeled_bs"):
        TwoStreamBatchSampler([0], [1, 2], 2, 1)


def test_crop_pads_small_volumes_and_augmentation_keeps_alignment():
    rng = np.random.default_rng(0)
    label = (rng.random((10, 20, 6)) > 0.5).astype(np.uint8)
    image = label[None].astype(np.float32) + 1          # image marks the label (and is never 0)
    img, lab = random_crop(image, label, (16, 16, 16), rng)
    assert img.shape == (1, 16, 16, 16) and lab.shape == (16, 16, 16)
    assert ((img[0] > 0) == ((img[0] - 1) >= 0)).all()  # padding is zero, in both arrays alike
    for _ in range(8):
        a, b = rot_flip(img, lab, rng)
        np.testing.assert_array_equal(a[0] == 2, b == 1)


def test_augmentation_keeps_non_square_patches_whole():
    rng = np.random.default_rng(1)
    label = (rng.random((16, 12, 8)) > 0.5).astype(np.uint8)
    image = label[None].astype(np.float32) + 1
    seen = set()
    for _ in range(32):
        a, b = rot_flip(image, label, rng)
        assert a.shape == (1, 16, 12, 8) and b.shape == (16, 12, 8)
        np.testing.assert_array_equal(a[0] == 2, b == 1)
        # a half turn and a flip along one axis is a flip along the other
        seen.add("X" if np.array_equal(b, label[::-1]) else "Y" if np.array_equal(b, label[:, ::-1]) else "?")
    assert seen == {"X", "Y"}


def test_patch_dataset(tmp_path):
    image, label = volume((20, 20, 20))
    write_h5(tmp_path / "data" / "a.h5", image, label)
    (tmp_path / "train.txt").write_text("a\n")
    ds = PatchDataset(list_cases({"layout": "brats", "root": str(tmp_path)}, "train"), (16, 16, 16), cache=True)
    x, y = ds[(0, 1)], ds[(0, 1)]
    assert x["image"].shape == (1, 16, 16, 16) and x["label"].shape == (16, 16, 16)
    assert (x["image"] == y["image"]).all()             # same seed, same patch


def test_demo_data(tmp_path):
    root = ensure_demo_data(tmp_path, size=32, splits={"train": 3, "val": 1, "test": 2})
    stamp = (root / "demo_version.txt").stat().st_mtime_ns
    assert ensure_demo_data(tmp_path, size=32, splits={"train": 3, "val": 1, "test": 2}) == root
    assert (root / "demo_version.txt").stat().st_mtime_ns == stamp        # cached, not rebuilt
    train = list_cases({"layout": "demo", "root": str(root)}, "train")
    test = list_cases({"layout": "demo", "root": str(root)}, "test")
    assert len(train) == 3 and not {c.id for c in train} & {c.id for c in test}
    vol = test[0].load()
    assert vol.image.shape == (1, 32, 32, 32)
    assert 0.003 < vol.label.mean() < 0.06
