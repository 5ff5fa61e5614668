"""Pictures (dycon.viz, dycon.plot): contour pixels where the masks' edges are, PNGs holding the
panels unchanged, the empty and multi-class cases, snapshots from evaluation, curves."""
import csv
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import ndimage

from dycon import evaluate, plot, viz
from dycon_kernels.reference import uncl_voxel_loss

import torch

SHAPE = (14, 12, 10)


def box(start, stop, shape=SHAPE):
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = 1
    return mask


def taxicab_distance_to(target, beyond):
    """Each pixel's number of 4-connected steps to the nearest ``target`` pixel; pixels beyond the
    array count as targets when ``beyond``."""
    padded = np.pad(~target, 1, constant_values=not beyond)
    return ndimage.distance_transform_cdt(padded, metric="taxicab")[1:-1, 1:-1]


def expected_edges(mask2d, reps, width, outside):
    """The contour pixels of a displayed slice (X right, Y up; each voxel a ``reps`` block), derived
    from distances rather than erosion: outside = background pixels within ``width`` steps of
    the mask, inside = mask pixels within ``width`` steps of the background."""
    shown = np.kron(np.flipud(mask2d.T), np.ones(reps, int)).astype(bool)
    assert shown.any() and not shown.all()
    if outside:
        return ~shown & (taxicab_distance_to(shown, beyond=False) <= width)
    return shown & (taxicab_distance_to(~shown, beyond=True) <= width)


def is_colour(rgb, colour):
    return (rgb == viz.colour_rgb(colour)).all(-1)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])   # width, height


def test_mask_edges_by_hand():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    inside = mask.copy()
    inside[3:5, 3:5] = False                       # the 12-pixel ring of the 4x4 square
    np.testing.assert_array_equal(viz.mask_edges(mask), inside)
    outside = np.zeros((8, 8), bool)
    outside[1, 2:6] = outside[6, 2:6] = outside[2:6, 1] = outside[2:6, 6] = True   # no corners (4 steps)
    np.testing.assert_array_equal(viz.mask_edges(mask, outside=True), outside)
    touching = np.ones((3, 3), bool)               # beyond the border is background
    assert viz.mask_edges(touching).sum() == 8


def test_lesion_centre_largest_component_then_prediction_then_middle():
    label = box((1, 1, 1), (3, 3, 3)) | box((6, 2, 2), (12, 10, 5))   # the larger box decides
    label[8, 3:9, 4] = 0     # cross-sections of x = 8, of y = 3..8 and of z = 4 lose voxels: first maxima win
    assert viz.lesion_centre(label) == (6, 2, 2)
    empty = np.zeros(SHAPE, np.uint8)
    assert viz.lesion_centre(empty, box((4, 5, 6), (5, 6, 7))) == (4, 5, 6)
    assert viz.lesion_centre(empty, empty) == (7, 6, 5)


def test_contour_pixels_exactly_on_the_mask_edges():
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    gt, pred = box((3, 3, 2), (10, 9, 8)), box((5, 2, 2), (12, 8, 7))
    gt[6, 9, 2:8] = 1        # x = 6 has the largest cross-section; y = 3 and z = 2 are first of equals
    rows = viz.case_panels(image, gt, pred)
    assert len(rows) == 1 and [p.title for p in rows[0]] == ["Z = 2", "Y = 3", "X = 6"]
    reps = viz.pixel_reps(SHAPE)
    width = viz.contour_width(reps)
    assert reps == (17, 17, 17) and width == 2
    centre = (6, 3, 2)
    for panel, axis in zip(rows[0], (2, 1, 0)):
        a, b = (k for k in range(3) if k != axis)
        cut = tuple(centre[axis] if k == axis else slice(None) for k in range(3))
        gt_edge = expected_edges(gt[cut].astype(bool), (reps[b], reps[a]), width, outside=True)
        pred_edge = expected_edges(pred[cut].astype(bool), (reps[b], reps[a]), width, outside=False)
        assert panel.rgb.shape == (SHAPE[b] * reps[b], SHAPE[a] * reps[a], 3)
        assert pred_edge.any() and (gt_edge & ~pred_edge).any()
        np.testing.assert_array_equal(is_colour(panel.rgb, viz.PRED_COLOUR), pred_edge)
        np.testing.assert_array_equal(is_colour(panel.rgb, viz.GT_COLOUR), gt_edge & ~pred_edge)
        rest = ~(gt_edge | pred_edge)
        assert (panel.rgb[rest] == panel.rgb[rest][:, :1]).all()     # grey elsewhere
        assert panel.extent == (0.0, SHAPE[a], 0.0, SHAPE[b])


def check_png_holds_panels(fig, path):
    """The PNG has the figure's size and every panel's pixels unchanged at its axes' place;
    returns the panels' pixels as read from the PNG, all in one row (the legend left out)."""
    viz.save_figure(fig, path)
    width, height = png_size(path)
    assert (width, height) == tuple(np.round(fig.get_size_inches() * viz.DPI).astype(int))
    pixels = np.round(imread(path)[..., :3] * 255).astype(np.uint8)
    panels = []
    for ax in fig.axes:
        panel = ax.images[0].get_array()
        box_ = ax.get_position()
        left, top = round(box_.x0 * width), round((1 - box_.y1) * height)
        panels.append(pixels[top:top + panel.shape[0], left:left + panel.shape[1]])
        np.testing.assert_array_equal(panels[-1], panel)
    return np.concatenate([p.reshape(-1, 3) for p in panels])


def test_case_figure_png_with_spacing_in_mm(tmp_path):
    image = np.random.default_rng(1).normal(size=SHAPE)
    gt, pred = box((3, 3, 2), (10, 9, 8)), box((4, 3, 2), (10, 9, 8))
    fig = viz.case_figure(image, gt, pred, "c1 — Dice 0.9", spacing=(0.5, 0.5, 2.0))
    assert [ax.get_xlabel() for ax in fig.axes] == ["X (mm)", "X (mm)", "Y (mm)"]
    assert tuple(fig.axes[1].images[0].get_extent()) == (0.0, 7.0, 0.0, 20.0)    # X 14 x 0.5, Z 10 x 2 mm
    assert viz.pixel_reps(SHAPE, (0.5, 0.5, 2.0)) == (6, 6, 24)
    pixels = check_png_holds_panels(fig, tmp_path / "c1.png")
    assert is_colour(pixels, viz.GT_COLOUR).any() and is_colour(pixels, viz.PRED_COLOUR).any()
    assert fig.get_suptitle() == "c1 — Dice 0.9"


def test_empty_ground_truth_and_both_empty(tmp_path):
    image = np.random.default_rng(2).normal(size=SHAPE)
    empty = np.zeros(SHAPE, np.uint8)
    fig = viz.case_figure(image, empty, box((4, 4, 4), (8, 8, 8)), "no lesion")
    pixels = check_png_holds_panels(fig, tmp_path / "empty_gt.png")
    assert is_colour(pixels, viz.PRED_COLOUR).any() and not is_colour(pixels, viz.GT_COLOUR).any()
    fig = viz.case_figure(image, empty, empty, "nothing")
    assert [ax.get_title() for ax in fig.axes] == ["Z = 5", "Y = 6", "X = 7"]
    pixels = check_png_holds_panels(fig, tmp_path / "both_empty.png")
    assert not (is_colour(pixels, viz.PRED_COLOUR) | is_colour(pixels, viz.GT_COLOUR)).any()


def test_multi_class_one_colour_per_class_with_legend(tmp_path):
    image = np.random.default_rng(3).normal(size=SHAPE)
    gt = box((2, 2, 2), (11, 10, 8)) + box((4, 4, 2), (8, 8, 8))        # class 2 inside class 1
    pred = gt.copy()
    pred[9:11] = 0
    rows = viz.case_panels(image, gt, pred, num_classes=3)
    assert [[p.title for p in row] for row in rows] == [
        ["ground truth, Z = 2", "ground truth, Y = 2", "ground truth, X = 2"],
        ["prediction, Z = 2", "prediction, Y = 2", "prediction, X = 2"]]
    reps = viz.pixel_reps(SHAPE)
    for row, mask in zip(rows, (gt, pred)):
        for c in (1, 2):   # the axial panel: inside edges of each class, in its own colour
            expected = expected_edges(mask[:, :, 2] == c, (reps[1], reps[0]), 2, outside=False)
            np.testing.assert_array_equal(is_colour(row[0].rgb, viz.class_colour(c)), expected)
    fig = viz.case_figure(image, gt, pred, "three classes", num_classes=3)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["class 1", "class 2"]
    check_png_holds_panels(fig, tmp_path / "multi.png")


def fake_case(case_id, image, label, spacing=None):
    volume = SimpleNamespace(image=image[None].astype(np.float32), label=label, spacing=spacing,
                             path=f"/data/{case_id}.h5")
    return SimpleNamespace(id=case_id, load=lambda num_classes=None: volume)


class Threshold(torch.nn.Module):
    """Stand-in network: foreground where the image is above 0.5."""

    def forward(self, x):
        fg = 20 * (x - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], 1), None


def test_snapshots_from_evaluate_cases(tmp_path):
    # the prediction (image > 0.5) misses i voxel layers of the lesion: Dice falls with i
    cases = [fake_case(f"c{i}", box((2, 2, 2), (8 - i, 8, 8)), box((2, 2, 2), (8, 8, 8))) for i in range(3)]
    snapshots = viz.Snapshots(tmp_path / "snaps", count=2, montage_cases=1)
    cfg = dict(patch_size=(8, 8, 8), stride_xy=4, stride_z=4, num_classes=2, device="cpu", largest_component=False)
    rows, _ = evaluate.evaluate_cases(Threshold(), cases, cfg, on_case=snapshots)
    assert [r["dice"] for r in rows] == sorted((r["dice"] for r in rows), reverse=True) and rows[0]["dice"] == 1
    montage = snapshots.finish()
    assert [p.name for p in snapshots.written] == ["c0.png", "c1.png", "montage.png"]
    for path in snapshots.written:
        assert png_size(path)[0] > 300
    assert montage == tmp_path / "snaps" / "montage.png"


def test_montage_keeps_best_and_worst(tmp_path):
    snapshots = viz.Snapshots(tmp_path, count=0, montage_cases=2)
    assert snapshots.finish() is None
    snapshots = viz.Snapshots(tmp_path, count=1, montage_cases=2)
    for i, dice in enumerate([0.5, 0.9, 0.1, 0.7, 0.3]):
        label = box((2, 2, 2), (6, 6, 6))
        snapshots(SimpleNamespace(id=f"c{i}"), SimpleNamespace(image=label[None] * 1.0, label=label, spacing=None),
                  label, [{"class": 1, "dice": dice, "hd95": float("nan")}])
    assert [t.case_id for t in snapshots._tiles] == ["c1", "c3", "c4", "c2"]
    assert png_size(snapshots.finish())[0] > 300


def test_case_title():
    rows = [{"class": 1, "dice": 0.8123, "hd95": 2.5}, {"class": 2, "dice": 0.0, "hd95": float("nan")}]
    assert viz.case_title("x", rows[:1], "mm") == "x — Dice 0.812, HD95 2.50 mm"
    assert viz.case_title("x", rows, "vox") == ("x — class 1: Dice 0.812, HD95 2.50 vox; "
                                                "class 2: Dice 0.000, HD95 undefined (empty ground truth)")


from test_predict import brats_root, run_dir  # noqa: E402,F401  (fixtures: a run folder, two h5 cases)


def test_evaluate_cli_snapshots(run_dir, brats_root, tmp_path):  # noqa: F811
    args = ["--run", str(run_dir), "--root_path", str(brats_root), "--device", "cpu"]
    evaluate.main(args + ["--snapshots", "1", "--output", str(tmp_path / "one")])
    assert sorted(p.name for p in (tmp_path / "one" / "snapshots").iterdir()) == ["case0.png", "montage.png"]
    evaluate.main(args + ["--snapshots", "0", "--output", str(tmp_path / "none")])
    assert not (tmp_path / "none" / "snapshots").exists()


# ---- curves ------------------------------------------------------------------------------------

def write_metrics(run, rows):
    run.mkdir(parents=True)
    fields = ["step", "epoch", "lr", "beta", "total", "sup", "mse", "uncl", "fecl", "val_dice", "skipped"]
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)


def training_rows(scale):
    rows = [{"step": s, "epoch": 0, "lr": 0.01, "beta": 5 - s / 10, "total": scale / s, "sup": 0.5 / s,
             "uncl": 0.1, "fecl": 0.2 * scale} for s in range(1, 21)]
    return rows + [{"step": s, "val_dice": 0.1 * s / 5} for s in (10, 20)]


def test_read_metrics_skips_empty_cells(tmp_path):
    write_metrics(tmp_path / "run", training_rows(1.0))
    metrics = viz.read_metrics(tmp_path / "run" / "metrics.csv")
    assert set(metrics) == {"epoch", "lr", "beta", "total", "sup", "uncl", "fecl", "val_dice"}   # no mse, skipped
    steps, values = metrics["val_dice"]
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_allclose(values, [0.2, 0.4])
    with pytest.raises(FileNotFoundError, match="no metrics file .*nowhere"):
        viz.read_metrics(tmp_path / "nowhere" / "metrics.csv")


def test_curves_png_and_plot_cli(tmp_path):
    write_metrics(tmp_path / "run_a", training_rows(1.0))
    write_metrics(tmp_path / "run_b", [r for r in training_rows(2.0) if "beta" in r])   # never validated
    path = viz.write_curves(tmp_path / "run_a")
    assert path == tmp_path / "run_a" / "curves.png" and png_size(path) == (1000, 700)
    fig = viz.curves_figure(viz.read_metrics(path.parent / "metrics.csv"))
    assert [line.get_label() for line in fig.axes[0].lines] == ["total", "sup", "uncl", "fecl"]
    assert [ax.get_title() for ax in fig.axes] == ["training losses", "validation Dice", "UnCL beta", "learning rate"]

    out = tmp_path / "compare.png"
    assert plot.main([str(tmp_path / "run_a"), str(tmp_path / "run_b"), "-o", str(out)]) == [out]
    assert png_size(out) == (1100, 450)
    fig = viz.runs_figure([tmp_path / "run_a", tmp_path / "run_b"])
    assert [line.get_label() for line in fig.axes[0].lines] == ["run_a"]
    assert [line.get_label() for line in fig.axes[1].lines] == ["run_a", "run_b"]


def test_a_constant_series_gets_a_plain_axis_and_its_value():
    steps = np.arange(1, 21)
    fig = viz.curves_figure({"lr": (steps, np.full(20, 0.01)), "beta": (steps, 5 - steps / 10),
                             "total": (steps, 1 / steps), "fecl": (steps, np.zeros(20))})   # a zero loss term
    losses, _, beta, lr = fig.axes
    assert lr.get_ylim() == pytest.approx((0.005, 0.015))
    assert [t.get_text() for t in lr.texts] == ["constant: 0.01"]
    fig.canvas.draw()
    assert lr.yaxis.get_offset_text().get_text() == ""   # no "+1e-2"-style offset above the ticks
    assert not losses.texts and not beta.texts and beta.get_ylim()[0] < 3.0 and beta.get_ylim()[1] > 4.9   # varying: untouched
    flat_zero = viz.curves_figure({"lr": (steps, np.zeros(20))}).axes[3]
    assert flat_zero.get_ylim() == (-1.0, 1.0)


def test_plot_does_not_import_torch(tmp_path):
    import os
    import subprocess
    import sys

    write_metrics(tmp_path / "run", training_rows(1.0))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; from dycon import plot; plot.main([{str(tmp_path / 'run')!r}, '-o', "
            f"{str(tmp_path / 'c.png')!r}]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip().splitlines()[-1] == "False" and png_size(tmp_path / "c.png") == (1100, 450)


# ---- uncertainty images ------------------------------------------------------------------------

def uncl_weight_by_reference(s_logits, t_logits, beta):
    """UnCL's weight recovered from the reference loss map alone: with p = q the squared term
    vanishes (l = 2 beta H), and at beta = 0 the weight is 1/2 (l = sum (p - q)^2 / 2)."""
    def loss(a, b, bt):
        return uncl_voxel_loss(a, b, bt).double()
    entropy_term = (loss(s_logits, s_logits, beta) + loss(t_logits, t_logits, beta)) / 2
    return (loss(s_logits, t_logits, beta) - entropy_term) / (2 * loss(s_logits, t_logits, 0.0))


def test_entropy_and_uncl_weight():
    certain, uniform = np.array([1.0, 0.0]), np.array([0.5, 0.5])
    np.testing.assert_allclose(viz.entropy(np.stack([certain, uniform], 1)), [0, np.log(2)], atol=1e-5)
    both = np.stack([certain, uniform], 1)
    np.testing.assert_allclose(viz.uncl_weight(both, both, 2.0), [0.5, 1 / 8], rtol=1e-5)
    rng = np.random.default_rng(4)
    s_logits, t_logits = (torch.from_numpy(rng.normal(size=(1, 3, 5, 4)) * 2) for _ in range(2))
    for beta in (0.5, 3.0):
        expected = uncl_weight_by_reference(s_logits, t_logits, beta)[0].numpy()
        got = viz.uncl_weight(s_logits.softmax(1)[0].numpy(), t_logits.softmax(1)[0].numpy(), beta)
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_uncertainty_images_shapes_colours_and_patch_grid():
    shape = (6, 4)                                  # a slice (a, b): shown 4 rows x 6 columns, x3
    image = np.arange(24, dtype=float).reshape(shape)
    label = np.zeros(shape, int)
    label[2:4, 1:3] = 1
    student = np.stack([1 - label, label]).astype(float)          # certain, right
    teacher = np.full((2, *shape), 0.5)                            # unsure everywhere...
    teacher[:, 0, 0] = (1.0, 0.0)                                  # ...but one pixel
    patches = np.array([[1, 0], [-1, 0], [0, 0]])                  # a 3 x 2 grid of 2 x 2 voxels
    out = viz.uncertainty_images(image, label, student, teacher, beta=1.0, loss_map=image,
                                 patch_labels=patches, reps=(3, 3))
    assert list(out) == ["image", "prediction", "teacher_entropy", "uncl_weight", "uncl_loss", "fecl_patches"]
    assert all(v.shape == (12, 18, 3) and v.dtype == np.uint8 for v in out.values())
    np.testing.assert_array_equal(is_colour(out["image"], viz.GT_COLOUR),
                                  expected_edges(label.astype(bool), (3, 3), 1, outside=True))
    np.testing.assert_array_equal(is_colour(out["prediction"], viz.PRED_COLOUR),
                                  expected_edges(label.astype(bool), (3, 3), 1, outside=False))
    # entropy 0 .. log 2: the one certain pixel (a = 0, b = 0: bottom left) at the colour map's start
    low, high = viz.scalar_rgb(np.array([0.0, np.log(2)]), 0, np.log(2))
    assert (out["teacher_entropy"][-3:, :3] == low).all() and (out["teacher_entropy"][:-3] == high).all()
    top = viz.scalar_rgb(np.array([0.5]), 0, 0.5)
    assert (out["uncl_weight"][-3:, :3] == top).all()        # both certain there: weight 1/2, the top
    # patches (a, b) of 2 x 2 voxels are 6 x 6 pixel blocks; b = 0 is the lower row of blocks
    grid = out["fecl_patches"]
    assert (grid[::6] == 0).all() and (grid[:, ::6] == 0).all()                  # lines between patches
    shown = viz.grey_rgb(np.flipud(image.T).repeat(3, 0).repeat(3, 1), viz.intensity_window(image))
    tint = grid.astype(int) - shown
    lesion, background, ignored = tint[7:12, 1:6], tint[1:6, 1:6], tint[7:12, 7:12]
    assert (ignored == 0).all()
    assert (lesion[..., 0] > lesion[..., 2] + 40).all() and (background[..., 2] > background[..., 0] + 40).all()


def test_lesion_window_centres_and_pads():
    label = np.zeros((40, 20, 36), np.uint8)
    label[34:37, 9:12, 2:5] = 1                                   # centre (34, 9, 2): first of equal sections
    volume = SimpleNamespace(image=np.random.default_rng(5).normal(size=(2, 40, 20, 36)), label=label)
    image, window, centre = viz.lesion_window(volume, (32, 32, 32))
    assert image.shape == (2, 32, 32, 32) and window.shape == (32, 32, 32)
    assert centre == (26, 9 + 6, 2)           # x window starts at 8 (the border), Y is padded 6 + 6, z at 0
    np.testing.assert_array_equal(window[:, 6:26], label[8:40, :, :32])
    np.testing.assert_array_equal(image[:, :, 6:26], volume.image[:, 8:40, :, :32])
    assert window.sum() == label.sum() and window[centre] == 1


@pytest.mark.parametrize("preset", ["dycon", "official"])
def test_validation_images_of_networks(preset):
    from dycon.networks import build_model

    torch.manual_seed(0)
    model_cfg = dict(arch="unet3d", in_channels=1, num_classes=2, base_filters=2, embed_dim=8, feature_scaler=2)
    student, teacher = build_model(model_cfg), build_model(model_cfg)
    cfg = {"model": model_cfg, "train": {"patch_size": [32, 32, 32], "kernel_backend": "auto", "preset": preset},
           "loss": {"patch_purity": 0.6, "teacher_confidence": 0.0}}
    label = box((5, 6, 7), (12, 14, 12), (20, 24, 18))
    volume = SimpleNamespace(image=label[None] + np.random.default_rng(6).normal(0, 0.2, (1, 20, 24, 18)), label=label)
    images = viz.validation_images(student, teacher, volume, cfg, 2.0, "cpu")
    assert list(images) == ["image", "prediction", "teacher_entropy", "uncl_weight", "uncl_loss", "fecl_patches"]
    assert all(v.shape == (192, 192, 3) for v in images.values())
    assert student.training and teacher.training                  # modes restored
    # the lesion's 4 x 4 patch grid (8-voxel patches): with confidence 0 no patch is ignored
    tinted = images["fecl_patches"].astype(int) - images["image"]
    assert (np.abs(tinted).sum(-1) > 0).mean() > 0.5
    only = viz.validation_images(student, None, volume, cfg, None, "cpu")
    assert list(only) == ["image", "prediction"]


# ---- the trainer's pictures ----------------------------------------------------------------------

from test_train import data_root, tiny_config  # noqa: E402,F401  (fixture: a small demo data set)


def test_training_writes_images_curves_and_test_snapshots(tmp_path, data_root):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    from dycon import loop

    cfg = tiny_config(data_root, max_iterations=2)                  # dycon method, one validation at step 2
    loop.train(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={IMAGES: 0}).Reload()
    names = ["image", "prediction", "teacher_entropy", "uncl_weight", "uncl_loss", "fecl_patches"]
    assert sorted(events.Tags()["images"]) == sorted(f"val_images/{n}" for n in names)
    shown = events.Images("val_images/uncl_weight")
    assert [e.step for e in shown] == [2] and (shown[0].width, shown[0].height) == (192, 192)
    assert png_size(tmp_path / "curves.png") == (1000, 700)

    (tmp_path / "curves.png").unlink()
    loop.train({**cfg, "train": {**cfg["train"], "max_iterations": 3}}, tmp_path, resume=True)
    assert png_size(tmp_path / "curves.png") == (1000, 700)                   # drawn again at the resumed end
    steps, _ = viz.read_metrics(tmp_path / "metrics.csv")["total"]
    np.testing.assert_array_equal(steps, [1, 2, 3])

    loop.test_run(cfg, tmp_path)
    snapshots = tmp_path / "eval_test_student" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["case_007.png", "case_008.png", "montage.png"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"3D arrays of one shape, got \(14, 12, 10\), \(14, 12, 9\)"):
        viz.case_panels(np.zeros(SHAPE), np.zeros((14, 12, 9)), np.zeros(SHAPE))
    with pytest.raises(ValueError, match=r"not a whole multiple of the patch grid \(3, 2\)"):
        viz.patch_grid_rgb(np.zeros((3, 2)), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="count >= 0 .* got -1"):
        viz.Snapshots("unused", -1)
