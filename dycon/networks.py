"""Networks: the released DyCON 3D U-Net and a V-Net, both with the FeCL projection head.

Both return ``(segmentation_logits, embeddings)``:

- ``segmentation_logits``: ``(B, num_classes, X, Y, Z)``, same spatial size as the input;
- ``embeddings``: ``(B, N, embed_dim)``, one L2-normalised vector per patch, ``N`` patches on a
  grid of ``input / (16 / feature_scaler)`` (a 96^3 input with scaler 2 gives 12^3 = 1728
  patches of 8^3 voxels). Patches are listed in C order of the grid, the same order as
  ``patch_grid_labels(...).flatten(1)`` in ``dycon.train``.

The input's spatial size must be divisible by 16 (four 2x downsamplings).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("unet3d", "vnet")


class ProjectionHead(nn.Module):
    """Bottleneck feature -> per-patch unit vectors for FeCL (method.md section 1).

    The feature is first upsampled by ``feature_scaler`` so that each patch covers
    ``16 / feature_scaler`` voxels a side: a larger scaler gives more (smaller) patches.
    """

    def __init__(self, in_channels: int, embed_dim: int = 256, feature_scaler: int = 2):
        super().__init__()
        if feature_scaler not in (1, 2, 4, 8, 16):
            raise ValueError(f"feature_scaler must be one of 1, 2, 4, 8, 16, got {feature_scaler}")
        self.feature_scaler = feature_scaler
        self.proj = nn.Sequential(
            nn.Conv3d(in_channels, 2 * embed_dim, 1), nn.BatchNorm3d(2 * embed_dim), nn.ReLU(inplace=True),
            nn.Conv3d(2 * embed_dim, embed_dim, 1), nn.BatchNorm3d(embed_dim),
        )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.feature_scaler != 1:
            feature = F.interpolate(feature, scale_factor=self.feature_scaler, mode="trilinear",
                                    align_corners=True)
        z = self.proj(feature)                        # (B, D, gx, gy, gz)
        z = z.flatten(2).transpose(1, 2)              # (B, N, D)
        return F.normalize(z, dim=-1)


class ConvBlock(nn.Sequential):
    """``n`` x (Conv3d 3x3x3 -> norm -> ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 2, norm: str = "instance"):
        layers = []
        for i in range(n):
            layers += [nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                       _norm(norm, out_channels), nn.ReLU(inplace=True)]
        super().__init__(*layers)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    raise ValueError(f"model.norm must be 'instance' or 'batch', got {kind!r}")


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5 or any(s % 16 for s in x.shape[2:]):
        raise ValueError(f"input must be (B, C, X, Y, Z) with X, Y, Z divisible by 16, got {tuple(x.shape)}")


class UNet3D(nn.Module):
    """The released DyCON 3D U-Net (SSL4MIS ``unet_3D`` with filters [16, 32, 64, 128, 256])."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_filters: int = 16,
                 feature_scaler: int = 2, embed_dim: int = 256, dropout: float = 0.3, norm: str = "instance"):
        super().__init__()
        f = [base_filters * 2 ** i for i in range(5)]
        self.encoders = nn.ModuleList(
            [ConvBlock(in_channels, f[0], norm=norm)] + [ConvBlock(f[i], f[i + 1], norm=norm) for i in range(4)])
        # decoder i takes the upsampled f[i+1] feature concatenated with the f[i] skip
        self.decoders = nn.ModuleList([ConvBlock(f[i] + f[i + 1], f[i], norm=norm) for i in range(4)])
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv3d(f[0], num_classes, 1)
        self.head = ProjectionHead(f[4], embed_dim, feature_scaler)

    def forward(self, x: torch.Tensor):
        _check_input(x)
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        bottleneck = self.dropout(skips.pop())
        x = bottleneck
        for decoder in reversed(self.decoders):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = decoder(torch.cat([skips.pop(), x], dim=1))
        logits = self.classifier(self.dropout(x))
        return logits, self.head(bottleneck)


class VNet(nn.Module):
    """A V-Net after UA-MT / SSL4MIS (residual stages, strided-conv down, transposed-conv up).

    A stem convolution, then residual stages of 1, 2, 3, 3, 3 convolutions; the decoder adds
    (not concatenates) the skips;
    dropout on the bottleneck and the last decoder feature. The bottleneck (``16 *
    base_filters`` channels, 1/16 resolution) feeds the projection head.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_filters: int = 16,
                 feature_scaler: int = 2, embed_dim: int = 256, dropout: float = 0.5, norm: str = "batch"):
        super().__init__()
        f = [base_filters * 2 ** i for i in range(5)]
        stages = [1, 2, 3, 3, 3]
        self.stem = ConvBlock(in_channels, f[0], 1, norm)
        self.enc = nn.ModuleList([ConvBlock(f[i], f[i], stages[i], norm) for i in range(5)])
        self.down = nn.ModuleList([_strided(f[i], f[i + 1], norm) for i in range(4)])
        self.up = nn.ModuleList([_transposed(f[i + 1], f[i], norm) for i in range(4)])
        self.dec = nn.ModuleList([ConvBlock(f[i], f[i], stages[i], norm) for i in range(4)])
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv3d(f[0], num_classes, 1)
        self.head = ProjectionHead(f[4], embed_dim, feature_scaler)

    def forward(self, x: torch.Tensor):
        _check_input(x)
        x = self.stem(x)
        skips = []
        for i in range(5):
            x = self.enc[i](x) + x                    # residual stage
            skips.append(x)
            if i < 4:
                x = self.down[i](x)
        bottleneck = self.dropout(skips.pop())
        x = bottleneck
        for i in reversed(range(4)):
            x = self.up[i](x) + skips.pop()
            x = self.dec[i](x) + x
        logits = self.classifier(self.dropout(x))
        return logits, self.head(bottleneck)


def _strided(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), _norm(norm, cout), nn.ReLU(inplace=True))


def _transposed(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), _norm(norm, cout), nn.ReLU(inplace=True))


def build_model(model_cfg: dict) -> nn.Module:
    """The network described by the config's ``model`` dict.

    Keys: ``arch`` ('unet3d' | 'vnet'), ``in_channels``, ``num_classes``, ``feature_scaler``,
    ``base_filters``, and optionally ``embed_dim``, ``dropout``, ``norm`` ('instance' | 'batch').
    """
    cfg = dict(model_cfg)
    arch = cfg.pop("arch", "unet3d")
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    known = {"in_channels", "num_classes", "base_filters", "feature_scaler", "embed_dim", "dropout", "norm"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; valid: ['arch'] + {sorted(known)}")
    return (UNet3D if arch == "unet3d" else VNet)(**cfg)
