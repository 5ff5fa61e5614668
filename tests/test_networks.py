"""The networks: output shapes, the projection head, the released widths, clear errors."""
import pytest
import torch

from dycon.networks import UNet3D, build_model

TINY = dict(in_channels=1, num_classes=2, base_filters=4, embed_dim=16)


@pytest.mark.parametrize("arch", ["unet3d", "vnet"])
@pytest.mark.parametrize("scaler", [2, 4])
def test_shapes_and_unit_embeddings(arch, scaler):
    model = build_model(dict(arch=arch, feature_scaler=scaler, **TINY))
    x = torch.randn(2, 1, 32, 32, 48)
    logits, emb = model(x)
    assert logits.shape == (2, 2, 32, 32, 48)
    grid = [s * scaler // 16 for s in (32, 32, 48)]
    assert emb.shape == (2, grid[0] * grid[1] * grid[2], 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[:2]))
    (logits.mean() + emb.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_released_unet_widths():
    model = build_model(dict(arch="unet3d", in_channels=1, num_classes=2, feature_scaler=2, base_filters=16))
    assert [enc[0].out_channels for enc in model.encoders] == [16, 32, 64, 128, 256]
    head = [m for m in model.head.proj if isinstance(m, torch.nn.Conv3d)]
    assert (head[0].in_channels, head[0].out_channels, head[1].out_channels) == (256, 512, 256)
    assert isinstance(model.encoders[0][1], torch.nn.InstanceNorm3d)
    assert model.dropout.p == 0.3


def test_multichannel_and_multiclass():
    model = UNet3D(in_channels=3, num_classes=4, base_filters=4, embed_dim=8)
    logits, emb = model(torch.randn(1, 3, 32, 32, 32))
    assert logits.shape == (1, 4, 32, 32, 32) and emb.shape == (1, 64, 8)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="model.arch"):
        build_model(dict(arch="unet2d", **TINY))
    with pytest.raises(ValueError, match="unknown model key"):
        build_model(dict(arch="unet3d", filters=3, **TINY))
    with pytest.raises(ValueError, match="feature_scaler"):
        build_model(dict(arch="unet3d", feature_scaler=3, **TINY))
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model(dict(arch="unet3d", **TINY))(torch.randn(1, 1, 24, 32, 32))
