"""The strong view (dycon/views.py): intensities change, geometry does not; the draws are keyed."""
import pytest
import torch

from dycon import config as C
from dycon.views import gaussian_blur, strong_view

IDENTITY = {"strong": True, "gamma": [1.0, 1.0], "contrast": [1.0, 1.0], "bias_field": [0.0, 0.0],
            "noise": [0.0, 0.0], "blur": [0.0, 0.0]}


def cube_batch(n=3, size=24):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, 1, size, size, size, dtype=torch.bool)
    for i in range(n):   # a bright cube at a different place in each volume
        a = 3 + 4 * i
        mask[i, :, a:a + 8, a + 1:a + 9, a + 2:a + 10] = True
    image = 3.0 * mask + 0.1 * torch.randn(mask.shape, generator=g)
    return (image - image.mean()) / image.std(), mask


def test_without_ranges_the_strong_view_is_the_input():
    image, _ = cube_batch()
    torch.testing.assert_close(strong_view(image, IDENTITY, 1, 0, [0, 1, 2]), image, rtol=1e-5, atol=1e-5)


def test_the_strong_view_changes_intensities_only():
    image, mask = cube_batch()
    views = C.DEFAULTS["views"]
    view = strong_view(image, views, seed=1, number=5, slots=[0, 1, 2])
    assert view.shape == image.shape and view.dtype == image.dtype
    for i in range(len(image)):
        assert (view[i] - image[i]).abs().mean() > 0.05            # intensities did change
        # the bright cube is where it was: thresholding the view half-way between the cube's and the
        # background's medians recovers the cube (no shift, flip or rotation)
        inside, outside = view[i][mask[i]].median(), view[i][~mask[i]].median()
        found = view[i] > (inside + outside) / 2
        iou = (found & mask[i]).sum() / (found | mask[i]).sum()
        assert iou > 0.9, (i, float(iou))
    ranked = torch.corrcoef(torch.stack([view.flatten(), image.flatten()]))[0, 1]
    assert ranked > 0.8


def test_each_draw_is_keyed_by_seed_batch_and_slot():
    image, _ = cube_batch(2)
    views = C.DEFAULTS["views"]
    a = strong_view(image, views, 1, 5, [0, 1])
    torch.testing.assert_close(strong_view(image, views, 1, 5, [0, 1]), a, rtol=0, atol=0)
    assert not torch.allclose(strong_view(image, views, 1, 6, [0, 1]), a)
    # a volume's view depends on its slot, not on its position in this process's share
    torch.testing.assert_close(strong_view(image[1:], views, 1, 5, [1]), a[1:], rtol=0, atol=0)


def test_blur_keeps_the_mean_and_smooths():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 16, 16, generator=g)
    y = gaussian_blur(x, 1.0)
    assert y.shape == x.shape and y.std() < 0.6 * x.std()
    assert abs(float(y.mean() - x.mean())) < 0.05
    assert gaussian_blur(x, 0.0) is x


@pytest.mark.parametrize("bad", [{"gamma": [0.0, 1.0]}, {"noise": [0.2, 0.1]}, {"blur": [1.0]}, {"strong": "yes"}])
def test_bad_ranges_name_the_key(bad):
    cfg = C.apply_overrides(C.load_config("demo"), {"data.root": "x", **{f"views.{k}": v for k, v in bad.items()}})
    with pytest.raises(ValueError, match="views."):
        C.check_config(cfg)
