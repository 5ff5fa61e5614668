"""Sliding-window inference against the full-volume computation and the released loop."""
import math

import numpy as np
import pytest
import torch

from dycon.inference import keep_largest_component, probabilities_to_labels, segment, sliding_window_inference


class Pointwise(torch.nn.Module):
    """Logits that depend on each voxel alone, so windows must reproduce the full volume exactly.
    Returns (logits, embeddings) like the DyCON networks; records the mode it ran in."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(-1.0, 2.0, num_classes))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return x[:, :1] * self.weight.view(1, -1, 1, 1, 1) + x[:, 1:].sum(1, keepdim=True), torch.zeros(len(x), 4)


class WindowMean(torch.nn.Module):
    """Logits that depend on the whole window (minus its mean), so overlaps disagree and the
    averaging and the window placement both matter. Returns plain logits."""

    def forward(self, x):
        centred = x[:, :1] - x[:, :1].mean(dim=(2, 3, 4), keepdim=True)
        return torch.cat([-centred, centred], 1)


def released_test_single_case(net, image, stride_xy, stride_z, patch_size, num_classes):
    """numpy transcription of the released SSL4MIS / DyCON ``test_single_case`` (score map part)."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for p, s in zip(patch_size, (w, h, d))]
    image = np.pad(image, [(p // 2, p - p // 2) for p in pads])
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape, np.float32)
    cnt = np.zeros(image.shape, np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch_size[2])
                patch = image[xs:xs + patch_size[0], ys:ys + patch_size[1], zs:zs + patch_size[2]]
                with torch.no_grad():
                    out = torch.softmax(net(torch.from_numpy(patch[None, None].astype(np.float32))), 1)
                window = (slice(xs, xs + patch_size[0]), slice(ys, ys + patch_size[1]), slice(zs, zs + patch_size[2]))
                score_map[(slice(None),) + window] += out[0].numpy()
                cnt[window] += 1
    score_map /= cnt[None]
    return score_map[:, pads[0] // 2:pads[0] // 2 + w, pads[1] // 2:pads[1] // 2 + h, pads[2] // 2:pads[2] // 2 + d]


@pytest.mark.parametrize("shape", [(20, 17, 11), (6, 10, 3)])   # larger than the window, and smaller
def test_pointwise_model_equals_full_volume(shape):
    torch.manual_seed(0)
    image = torch.randn(1, 2, *shape)
    model = Pointwise()
    expected = torch.softmax(model(image)[0], 1)[0].detach()
    probs = sliding_window_inference(model, image, (8, 8, 4), stride_xy=5, stride_z=3, num_classes=3)
    assert probs.shape == (3, *shape) and probs.device == image.device
    assert not probs.requires_grad
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, batch_size", [((21, 18, 13), 1), ((21, 18, 13), 4), ((7, 19, 3), 3)])
def test_matches_released_loop_with_overlaps_and_padding(shape, batch_size):
    image = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    expected = released_test_single_case(WindowMean(), image, 5, 3, (8, 8, 4), 2)
    probs = sliding_window_inference(WindowMean(), torch.from_numpy(image)[None, None], (8, 8, 4),
                                     stride_xy=5, stride_z=3, num_classes=2, batch_size=batch_size)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_eval_mode_inside_and_mode_restored():
    model = Pointwise().train()
    sliding_window_inference(model, torch.randn(1, 2, 8, 8, 8), (8, 8, 4), 4, 2, num_classes=3)
    assert model.modes and not any(model.modes)
    assert model.training
    model.eval()
    sliding_window_inference(model, torch.randn(1, 2, 8, 8, 8), (8, 8, 4), 4, 2, num_classes=3)
    assert not model.training


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"image must be \(1, C, X, Y, Z\), got \(2, 1, 8, 8, 8\)"):
        sliding_window_inference(Pointwise(), torch.randn(2, 1, 8, 8, 8), (8, 8, 8), 4, 4, 3)
    with pytest.raises(ValueError, match=r"model output \(1, 3, 8, 8, 8\) does not match.*num_classes=2"):
        sliding_window_inference(Pointwise(), torch.randn(1, 2, 8, 8, 8), (8, 8, 8), 4, 4, 2)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_inference(Pointwise(), torch.randn(1, 2, 8, 8, 8), (8, 8, 8), 0, 4, 3)


def test_largest_component_uses_full_connectivity():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[1:3, 1:3, 1:3] = 1          # 8 voxels
    mask[3, 3, 3] = mask[4, 4, 4] = 1  # + 2 touching it only by corners: 10 with 26-connectivity
    mask[8:11, 8:11, 8] = 1          # 9 voxels: the largest with 6-connectivity
    kept = keep_largest_component(mask)
    assert kept.dtype == np.uint8 and kept.sum() == 10 and kept[4, 4, 4] == 1 and kept[9, 9, 8] == 0
    empty = np.zeros((4, 4, 4), bool)
    assert not keep_largest_component(empty).any()


def test_labels_from_probabilities():
    probs = torch.zeros(2, 6, 6, 6)
    probs[1, :2] = 0.9                # a 2x6x6 slab
    probs[1, 4, 0, 0] = 0.6           # an isolated voxel
    probs[1, 5, 5, 5] = 0.5           # a tie stays background (P > 0.5)
    probs[0] = 1 - probs[1]
    labels = probabilities_to_labels(probs, largest_component=False)
    assert labels.dtype == np.uint8 and labels.sum() == 73 and labels[5, 5, 5] == 0
    assert probabilities_to_labels(probs).sum() == 72
    # three classes: argmax, and the largest component per class
    probs3 = torch.zeros(3, 6, 6, 6)
    probs3[0] = 1.0
    probs3[1, :2], probs3[2, 3:5], probs3[2, 0, 5, 5] = 2.0, 2.0, 3.0
    labels3 = probabilities_to_labels(probs3)
    assert (labels3 == 1).sum() == 71 and (labels3 == 2).sum() == 72   # the class-2 voxel in the slab is gone


def test_segment_numpy_volume():
    image = np.zeros((1, 10, 9, 7), np.float32)
    image[0, 2:5, 2:5, 2:5] = 1.0

    class Threshold(torch.nn.Module):
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), 10 * (x - 0.5)], 1)

    labels = segment(Threshold(), image, (8, 8, 8), 4, 4, num_classes=2)
    assert labels.shape == (10, 9, 7) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, image[0] > 0.5)
