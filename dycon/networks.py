"""Networks: the released DyCON 3D U-Net and a V-Net, both with the FeCL projection head.

Both return ``(segmentation_logits, embeddings)``:

- ``segmentation_logits``: ``(B, num_classes, X, Y, Z)``, same spatial size as the input;
- ``embeddings``: ``(B, N, embed_dim)``, one L2-normalised vector per patch, ``N`` patches on a
  grid of ``input / (16 / feature_scaler)`` (a 96^3 input with scaler 2 gives 12^3 = 1728
  patches of 8^3 voxels). Patches are listed in C order of the grid, the same order as
  ``patch_labels_dycon(...)`` in ``dycon.losses``.

The input's spatial size must be divisible by 16 (four 2x downsamplings).

For distributed training, ``convert_sync_batchnorm`` swaps every ``BatchNorm3d`` for a
``GlobalBatchNorm`` (batch statistics over all ranks, on CPU/gloo as well as GPU/NCCL), and
``upsample_trilinear`` keeps the upsampling's backward deterministic on CUDA when
``torch.use_deterministic_algorithms(True)`` is on.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dycon.distributed import all_sum

ARCHS = ("unet3d", "vnet")


def upsample_trilinear(x: torch.Tensor, scale: int, align_corners: bool) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=scale, mode="trilinear", align_corners=...)``.

    CUDA has no deterministic backward for trilinear interpolation (it accumulates with atomics,
    and ``torch.use_deterministic_algorithms(True)`` makes it raise), so in deterministic mode on
    CUDA the same interpolation is computed as matmuls, whose backward is deterministic.
    """
    if torch.are_deterministic_algorithms_enabled() and x.is_cuda:
        return _upsample_trilinear_matmul(x, scale, align_corners)
    return F.interpolate(x, scale_factor=scale, mode="trilinear", align_corners=align_corners)


def _upsample_trilinear_matmul(x: torch.Tensor, scale: int, align_corners: bool) -> torch.Tensor:
    """Trilinear upsampling of ``(B, C, X, Y, Z)`` as three separable 1-D linear interpolations."""
    for dim in (2, 3, 4):
        weights = _linear_interp_matrix(x.shape[dim], scale, align_corners, x.device).to(x.dtype)
        x = torch.movedim(torch.movedim(x, dim, -1) @ weights.T, -1, dim)
    return x


def _linear_interp_matrix(n_in: int, scale: int, align_corners: bool, device) -> torch.Tensor:
    """The ``(n_in * scale, n_in)`` matrix of 1-D linear interpolation, with PyTorch's
    source-index formula (``area_pixel_compute_source_index``) and its index/weight guards."""
    n_out = n_in * scale
    dst = torch.arange(n_out, dtype=torch.float64, device=device)
    if align_corners:
        src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        # pixel centres; the outputs in the first half input pixel map before 0 and clamp there
        src = ((1.0 / scale) * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam1 = (src - i0).clamp(0, 1)[:, None]
    # one-hot rows by comparison: F.one_hot validates its input, a host sync on CUDA
    cols = torch.arange(n_in, device=device)
    return (1 - lam1) * (i0[:, None] == cols) + lam1 * (i1[:, None] == cols)


class GlobalBatchNorm(nn.BatchNorm3d):
    """``BatchNorm3d`` whose training-mode batch statistics cover the batches of all ranks.

    Unlike ``nn.SyncBatchNorm`` it also runs on CPU tensors (gloo), so CI can test it. The
    statistics go through the differentiable ``all_reduce``, whose backward sums the gradients
    over ranks: the gradient is that of the concatenated global batch. In eval mode, or outside a
    multi-rank process group, it is exactly ``BatchNorm3d`` (and communicates nothing, so a
    single rank may run eval-mode forwards on its own, e.g. for validation).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        mean, var, count = _global_batch_stats(x)
        if self.track_running_stats:
            self._update_running_stats(mean, var, count)
        shape = (1, -1, 1, 1, 1)
        y = (x.to(mean.dtype) - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """The running-statistics update of ``nn.BatchNorm`` for a batch of ``count`` per channel."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1)).to(var.dtype)
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def _global_batch_stats(x: torch.Tensor):
    """Per-channel mean and biased variance of ``x`` over all ranks, and the global element count
    per channel (a 0-d tensor: reading it on the host would stall CUDA at every layer).

    Two passes (global mean, then the sum of squared deviations from it) rather than
    E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std. Computed in at least
    float32 so that half-precision inputs do not overflow the sums.
    """
    dims = [0, 2, 3, 4]
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    local_count = x.numel() // x.shape[1]
    # The count rides with the sums (one collective; ranks may hold different batch sizes). The
    # reduced vector is float64 so the count stays an exact integer however large the batch.
    local = torch.cat([x.sum(dims).double(), x.new_tensor([local_count], dtype=torch.float64)])
    total = all_sum(local)
    count = total[-1].detach()
    if local_count < 2 and count.item() < 2:          # host read only on this rare path
        raise ValueError("expected more than 1 value per channel over all ranks when training")
    mean = (total[:-1] / count).to(x.dtype)
    sq_dev = ((x - mean.view(1, -1, 1, 1, 1)) ** 2).sum(dims).double()
    var = (all_sum(sq_dev) / count).to(x.dtype)
    return mean, var, count


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm3d`` replaced by a ``GlobalBatchNorm`` that takes over its
    parameters and buffers (the same tensors), like ``nn.SyncBatchNorm.convert_sync_batchnorm``."""
    if isinstance(module, nn.BatchNorm3d) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


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
            feature = upsample_trilinear(feature, self.feature_scaler, align_corners=True)
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
            x = upsample_trilinear(x, 2, align_corners=False)
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


@torch.no_grad()
def init_released(model: nn.Module) -> nn.Module:
    """The released networks' initialisation (SSL4MIS ``weights_init_kaiming``): convolutions
    Kaiming-normal (fan-in, their biases as PyTorch leaves them), batch-norm weights N(1, 0.02)
    and biases 0. Returns ``model``."""
    for m in model.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return model


def build_model(model_cfg: dict) -> nn.Module:
    """The network described by the config's ``model`` dict.

    Keys: ``arch`` ('unet3d' | 'vnet'), ``in_channels``, ``num_classes``, ``feature_scaler``,
    ``base_filters``, and optionally ``embed_dim``, ``dropout`` (absent or None: the
    architecture's default, 0.3 for unet3d and 0.5 for vnet; 0.0 switches it off), ``norm``
    ('instance' | 'batch'), ``init`` ('released': ``init_released``; absent, None or 'pytorch':
    PyTorch's defaults).
    """
    cfg = dict(model_cfg)
    arch = cfg.pop("arch", "unet3d")
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    init = cfg.pop("init", None)   # the trainer's key: weights, not architecture
    known = {"in_channels", "num_classes", "base_filters", "feature_scaler", "embed_dim", "dropout", "norm"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; valid: ['arch'] + {sorted(known)}")
    if cfg.get("dropout", 0.0) is None:     # the trainer's defaults spell "architecture default" None
        del cfg["dropout"]
    model = (UNet3D if arch == "unet3d" else VNet)(**cfg)
    return init_released(model) if init == "released" else model
