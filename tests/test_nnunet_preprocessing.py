"""dycon.preprocess against nnU-Net v2's own functions on the same input: resampling (images,
labels, probabilities; with and without the separate coarse axis), cropping to the non-zero
region and the normalisation schemes, the z-score region rule, the fingerprint's foreground
draws and the target spacing with its 10th-percentile rule. Where nnunetv2 is installed dycon
calls those functions itself; these tests check that its own versions, used where nnunetv2 is
not, give the same numbers (they skip without nnunetv2; CI installs it)."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dycon import preprocess
from dycon.preprocess import (_foreground_samples_like_nnunet, _target_spacing_like_nnunet, make_plan,
                              nonzero_box, normalize, resample_like_nnunet, resampled_shape)


def nnunetv2(module):
    return pytest.importorskip(f"nnunetv2.{module}", reason="nnunetv2 is not installed (CI installs it)")


SPACINGS = st.sampled_from([0.5, 0.8, 1.0, 1.5, 3.0, 5.0])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 16), shape=st.tuples(*[st.integers(3, 9)] * 3),
       spacing=st.tuples(SPACINGS, SPACINGS, SPACINGS), new_spacing=st.tuples(SPACINGS, SPACINGS, SPACINGS))
def test_resampling_equals_nnunets(seed, shape, spacing, new_spacing):
    resampling = nnunetv2("preprocessing.resampling.default_resampling")
    rng = np.random.default_rng(seed)
    new_shape = resampled_shape(shape, spacing, new_spacing)
    assert new_shape == [max(1, int(n)) for n in resampling.compute_new_shape(shape, spacing, new_spacing)]
    image = rng.normal(0, 1, (2, *shape)).astype(np.float32)
    label = rng.integers(0, 4, (1, *shape)).astype(np.uint8)
    probs = rng.dirichlet(np.ones(3), shape).transpose(3, 0, 1, 2).astype(np.float32)
    # nnU-Net's default plans: images cubic, labels linear per label, probabilities linear
    for array, is_seg, order in ((image, False, 3), (label, True, 1), (probs, False, 1)):
        ours = resample_like_nnunet(array, new_shape, spacing, new_spacing, is_seg, order)
        theirs = resampling.resample_data_or_seg_to_shape(array, new_shape, spacing, new_spacing, is_seg=is_seg,
                                                          order=order, order_z=0, force_separate_z=None)
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(ours, theirs)


def test_label_resampling_is_per_label_not_by_value():
    """Labels [0, 2] upsampled 4 times: interpolating the values would pass through 1 (0.25 .. 1.75);
    each label interpolated on its own, then the largest, gives 0s then 2s, split in the middle."""
    label = np.zeros((1, 4, 4, 2), np.uint8)
    label[0, :, :, 1] = 2
    values = resample_like_nnunet(label.astype(float), (4, 4, 8), (1, 1, 1), (1, 1, 0.25), False, 1)
    assert set(np.round(values[0, 0, 0]).tolist()) == {0, 1, 2}
    out = resample_like_nnunet(label, (4, 4, 8), (1, 1, 1), (1, 1, 0.25), True, 1)
    assert (out[0, 0, 0] == [0, 0, 0, 0, 2, 2, 2, 2]).all()


def background_image(seed):
    """Two channels with a zero background and a hole inside (filled by nnU-Net's mask)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((2, 12, 10, 8), np.float32)
    image[:, 2:9, 3:8, 1:6] = rng.normal(50, 10, (2, 7, 5, 5))
    image[:, 5, 5, 3] = 0
    label = np.zeros(image.shape[1:], np.int16)
    label[4:7, 4:7, 2:5] = 1
    label[10, 0, 0] = 1                       # outside the box: cropped away by nnU-Net
    return image, label


@pytest.mark.parametrize("use_mask", [True, False])
def test_crop_and_zscore_equal_nnunets(use_mask):
    cropping = nnunetv2("preprocessing.cropping.cropping")
    schemes = nnunetv2("preprocessing.normalization.default_normalization_schemes")
    image, label = background_image(0)
    data, seg, bbox = cropping.crop_to_nonzero(image.copy(), label[None].copy())
    mask, box = nonzero_box(image)
    assert box == tuple(slice(a, b) for a, b in bbox)
    ours = normalize(image, [{"scheme": "zscore", "use_mask": use_mask}] * 2, label)
    for c in range(2):
        theirs = schemes.ZScoreNormalization(use_mask_for_norm=use_mask, intensityproperties={}).run(data[c].copy(), seg[0])
        np.testing.assert_allclose(ours[c][box], theirs, rtol=1e-6, atol=1e-6)
    if use_mask:   # outside the non-zero region and the labelled voxels of the box: left 0
        inside = np.zeros_like(mask)
        inside[box] = True
        assert (ours[:, ~(mask | ((label != 0) & inside))] == 0).all()


def test_ct_normalisation_equals_nnunets():
    schemes = nnunetv2("preprocessing.normalization.default_normalization_schemes")
    image, _ = background_image(1)
    stats = {"mean": 48.0, "std": 9.0, "percentile_00_5": 30.0, "percentile_99_5": 70.0}
    ours = normalize(image[:1], [{"scheme": "ct", "lower": 30.0, "upper": 70.0, "mean": 48.0, "std": 9.0}])
    theirs = schemes.CTNormalization(intensityproperties=stats).run(image[0].copy())
    np.testing.assert_array_equal(ours[0], theirs)


@pytest.mark.parametrize("relative_size", [0.5, 0.74, 0.76, 1.0])
def test_zscore_region_rule_equals_nnunets(relative_size):
    planners = nnunetv2("experiment_planning.experiment_planners.default_experiment_planner")
    meta = {"channel_names": {"0": "T2", "1": "CT", "2": "noNorm"}, "labels": {"background": 0, "lesion": 1}}
    stats = {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}
    fp = {"foreground_intensity": [stats] * 3, "median_spacing": [1, 1, 1], "median_shape": [40, 40, 40],
          "median_relative_size_after_cropping": relative_size}
    plan = make_plan(fp, meta, target=None)
    planner = SimpleNamespace(dataset_json=meta, dataset_fingerprint=fp)
    names, use_mask = planners.ExperimentPlanner.determine_normalization_scheme_and_whether_mask_is_used_for_norm(
        planner)
    assert names == ["ZScoreNormalization", "CTNormalization", "NoNormalization"]
    assert [s.get("use_mask", False) for s in plan["normalization"]] == use_mask


def test_foreground_draws_equal_nnunets():
    extractor = nnunetv2("experiment_planning.dataset_fingerprint.fingerprint_extractor")
    image, label = background_image(2)
    ours = _foreground_samples_like_nnunet(label, image, 5000)
    theirs, _ = extractor.DatasetFingerprintExtractor.collect_foreground_intensities(label[None], image,
                                                                                     num_samples=5000)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


FINGERPRINTS = [
    # isotropic-ish: the median
    {"spacings": [[1, 1, 1.2], [0.9, 0.9, 1.0], [1.1, 1.1, 1.5]], "shapes_after_crop": [[100, 100, 90]] * 3},
    # ACDC-like thick slices, few of them: the 10th percentile of the coarse axis
    {"spacings": [[1.5, 1.5, 10], [1.4, 1.4, 5], [1.6, 1.6, 10], [1.5, 1.5, 6.5], [1.5, 1.5, 10]],
     "shapes_after_crop": [[200, 220, 9]] * 5},
    # thick slices but many of them: the median
    {"spacings": [[0.7, 0.7, 5], [0.7, 0.7, 2.5], [0.8, 0.8, 5]], "shapes_after_crop": [[512, 512, 200]] * 3},
    # 10th percentile below the in-plane spacing: clamped just above it
    {"spacings": [[2, 2, 1]] * 2 + [[2, 2, 10]] * 8, "shapes_after_crop": [[160, 160, 12]] * 10},
]


@pytest.mark.parametrize("fp", FINGERPRINTS)
def test_target_spacing_equals_nnunets(fp):
    planners = nnunetv2("experiment_planning.experiment_planners.default_experiment_planner")
    planner = SimpleNamespace(overwrite_target_spacing=None, anisotropy_threshold=3, dataset_fingerprint=fp)
    theirs = planners.ExperimentPlanner.determine_fullres_target_spacing(planner)
    np.testing.assert_allclose(_target_spacing_like_nnunet(fp), theirs, rtol=0, atol=0)
    np.testing.assert_allclose(preprocess.target_spacing(fp), theirs, rtol=0, atol=0)


def test_coarse_axis_takes_the_10th_percentile():
    """Without nnunetv2 too: ACDC-like spacings (z 5 .. 10 mm, 9 slices) give z = 10th percentile."""
    fp = FINGERPRINTS[1]
    z = np.percentile([10, 5, 10, 6.5, 10], 10)   # 5.6
    assert _target_spacing_like_nnunet(fp) == pytest.approx([1.5, 1.5, z])
    assert _target_spacing_like_nnunet(FINGERPRINTS[2]) == pytest.approx([0.7, 0.7, 5.0])   # 200 slices: median
    assert _target_spacing_like_nnunet(FINGERPRINTS[3])[2] == pytest.approx(2 + 1e-5)
