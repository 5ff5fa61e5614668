"""Data layouts, labelled split, the two-stream sampler, patches, the demo generator."""
import h5py
import numpy as np
import pytest

from dycon.data import (PatchDataset, TwoStreamBatchSampler, labelled_split, list_cases, random_crop,
                        rot_flip)
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
    (tmp_path / "train.txt").write_text("a\nb\n")
    (tmp_path / "test.txt").write_text("b\n")
    cases = list_cases({"layout": "brats", "root": str(tmp_path)}, "train")
    assert [c.id for c in cases] == ["a", "b"]
    vol = cases[0].load()
    assert vol.image.shape == (1, 6, 5, 4) and vol.image.dtype == np.float32
    np.testing.assert_array_equal(vol.image[0], image.transpose(2, 1, 0))
    np.testing.assert_array_equal(vol.label, label.transpose(2, 1, 0))
    assert vol.label.dtype == np.uint8 and vol.affine is None and vol.spacing is None
    assert [c.id for c in list_cases({"layout": "brats", "root": str(tmp_path)}, "test")] == ["b"]


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
