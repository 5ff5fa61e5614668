"""MONAI-style UnCLLoss / FeCLLoss and the hooked projection head (dycon.monai_losses).

The losses are checked against the dense references of dycon_kernels.reference on fresh random
inputs; the head against dycon.networks.ProjectionHead given the same weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dycon.monai_losses import FeCLLoss, UnCLLoss, attach_projection_head
from dycon.networks import ProjectionHead
from dycon_kernels import reference


def _logits(seed, shape=(2, 3, 6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_uncl_loss_matches_reference(reduction):
    student, teacher = _logits(0), _logits(1).detach()
    ours = UnCLLoss(beta=1.5, reduction=reduction, backend="reference" if reduction == "none" else "auto")
    got = ours(student, teacher)
    want = reference.uncl(student, teacher, 1.5, reduction=reduction)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g_got, g_want)
    # a beta given per call (a schedule) overrides the constructor's
    torch.testing.assert_close(ours(student, teacher, beta=0.5), reference.uncl(student, teacher, 0.5, reduction=reduction))


def _patches(seed, b=2, n=24, d=8):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(-1, 3, (b, n), generator=g)
    return z, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fecl_loss_matches_reference(reduction):
    z, y = _patches(2)
    zt = torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = FeCLLoss(reduction=reduction, teacher_top_k=4)(z, y, zt)
    want = reference.fecl(F.normalize(z, dim=-1), y, F.normalize(zt, dim=-1), teacher_top_k=4, reduction=reduction,
                          **{k: v for k, v in _dycon_preset().items() if k not in ("teacher_top_k", "reduction")})
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), z)
    (g_want,) = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(g_got, g_want)


def _dycon_preset():
    from dycon_kernels.presets import fecl_params
    return fecl_params("dycon")


def test_fecl_without_background_counts_only_foreground_anchors():
    z, y = _patches(4)
    per_anchor = FeCLLoss(reduction="none", teacher="none")(z, y)
    without = FeCLLoss(reduction="mean", include_background=False, teacher="none")(z, y)
    # background patches are still negatives: the foreground anchors' losses are unchanged
    foreground = y >= 1
    torch.testing.assert_close(without, per_anchor[foreground].sum() / foreground.sum())
    assert FeCLLoss(reduction="none", include_background=False, teacher="none")(z, y)[y == 0].abs().max() == 0


def test_bad_reduction_is_named():
    with pytest.raises(ValueError, match="reduction must be one of"):
        UnCLLoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        FeCLLoss(reduction="mean_positive")


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.Conv3d(4, 6, 3, stride=2, padding=1))
        self.out = nn.Conv3d(6, 2, 1)

    def forward(self, x):
        return F.interpolate(self.out(self.down(x)), size=x.shape[2:])


def test_hooked_head_matches_projection_head_on_the_layer_output():
    torch.manual_seed(0)
    net = _TinyNet()
    x = torch.randn(2, 1, 16, 16, 8)
    head = attach_projection_head(net, "down", example_input=x[:1], embed_dim=5, feature_scaler=2)
    assert head.head.proj[0].in_channels == 6
    net(x)
    # (4, 4, 2) feature, upsampled x2 where the input still divides: (8, 8, 4)
    plain = ProjectionHead(6, 5, feature_scaler=2)
    plain.load_state_dict(head.head.state_dict())
    torch.testing.assert_close(head(), plain(net.down(x)))
    assert head().shape == (2, 8 * 8 * 4, 5)


def test_hooked_head_keeps_the_grid_where_the_input_does_not_divide():
    net = _TinyNet()
    head = attach_projection_head(net, net.down, example_input=torch.randn(1, 1, 16, 16, 6), feature_scaler=4)
    net(torch.randn(1, 1, 16, 16, 6))   # feature (4, 4, 2): x4 divides 16 but not 6
    assert head.grid(head.feature.shape[2:]) == [16, 16, 2]


def test_head_without_channels_or_example_is_an_error():
    with pytest.raises(ValueError, match="in_channels or an example_input"):
        attach_projection_head(_TinyNet(), "down")
