"""DyCON's losses for MONAI users, and a FeCL projection head for any 3D network.

``UnCLLoss`` and ``FeCLLoss`` follow the conventions of ``monai.losses``: they subclass
``torch.nn.modules.loss._Loss`` as MONAI's losses do, take ``reduction`` ("mean", "sum",
"none") at construction, and are called as ``loss(input, target)`` with the student's output
first. They wrap the fused kernels (``dycon_kernels.uncl`` / ``fecl``); nothing here imports
MONAI, so the nnU-Net trainers (dycon.nnunet) use the same head without it.

``include_background`` means something for FeCL only: with ``False``, background patches are
no longer anchors (their loss is not counted) but stay in every anchor's negatives, which is
what makes the foreground patches separate from them. UnCL compares whole softmax
distributions, where dropping a class would change what the entropy means, so it has none.

``attach_projection_head(network, layer)`` hooks the output of ``layer`` (for a MONAI ``UNet``
its bottom block, for nnU-Net's networks ``encoder.stages[-1]``) and returns a head that turns
it into one unit vector per patch, as DyCON's own networks do (dycon.networks.ProjectionHead):

    head = attach_projection_head(net, bottom_layer(net), example_input=torch.zeros(1, 1, 96, 96, 96))
    logits = net(x)               # the hook keeps the layer's output
    embeddings = head()           # (B, N, D), patches in C order of head.grid
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.loss import _Loss

import dycon_kernels
from dycon.networks import ProjectionHead

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    return reduction


class UnCLLoss(_Loss):
    """Uncertainty-aware consistency between student (``input``) and teacher (``target``) logits.

    Args:
        beta: the entropy weight (a number, or a 0-dim tensor that a schedule changes); a
            ``beta`` passed to ``forward`` overrides it for that call.
        reduction: "mean" (over voxels, or weighted by ``weight``), "sum" or "none" (the voxel map).
        backend: the kernel backend ("auto", "cpu", "cuda", "triton", "reference").
    """

    def __init__(self, beta: Union[float, Tensor] = 1.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__(reduction=_check_reduction(reduction))
        self.beta, self.backend = beta, backend

    def forward(self, input: Tensor, target: Tensor, beta: Union[float, Tensor, None] = None,
                weight: Optional[Tensor] = None) -> Tensor:
        return dycon_kernels.uncl(input, target, self.beta if beta is None else beta, weight=weight,
                                  reduction=self.reduction, backend=self.backend)


class FeCLLoss(_Loss):
    """Focal entropy-aware contrastive loss on patch embeddings (``input``, ``(B, N, D)``, not
    necessarily normalised) with integer patch labels (``target``, ``(B, N)``, -1 = ignored).

    Args:
        preset: "dycon" (default) or "official" (dycon_kernels.presets).
        reduction: "mean" (over the counted anchors), "sum" or "none" (the ``(B, N)`` anchor map).
        include_background: count background anchors (label 0) too; see the module docstring.
        backend: the kernel backend.
        **params: FeCL parameters overriding the preset (temperature, gamma_pos, ...).
    """

    def __init__(self, preset: str = "dycon", reduction: str = "mean", include_background: bool = True,
                 backend: str = "auto", **params):
        super().__init__(reduction=_check_reduction(reduction))
        if "reduction" in params:
            raise ValueError("pass reduction as the loss's own argument, not as a FeCL parameter")
        self.include_background = include_background
        self.fecl = dycon_kernels.FeCLoss(preset=preset, backend=backend, reduction="none", **params)

    def forward(self, input: Tensor, target: Tensor, teacher_embeddings: Optional[Tensor] = None,
                teacher_labels: Optional[Tensor] = None, anchor_weight: Optional[Tensor] = None) -> Tensor:
        anchors = target >= (0 if self.include_background else 1)
        if not self.include_background:
            # a background patch stays a negative of every anchor; only its own loss is dropped
            keep = anchors.to(input.dtype)
            anchor_weight = keep if anchor_weight is None else anchor_weight * keep
        per_anchor = self.fecl(input, target, teacher_embeddings, teacher_labels, anchor_weight=anchor_weight)
        if self.reduction == "none":
            return per_anchor
        total = per_anchor.sum()
        return total / anchors.sum().clamp_min(1) if self.reduction == "mean" else total


class HookedProjectionHead(nn.Module):
    """A projection head fed by a forward hook on one layer of a network.

    The hook keeps the layer's latest output; ``forward()`` upsamples it by ``feature_scaler``
    on every axis where the patch grid still divides the network input (nnU-Net's anisotropic
    plans downsample some axes less), then projects it to unit vectors per patch.
    """

    def __init__(self, layer: nn.Module, in_channels: int, embed_dim: int = 256, feature_scaler: int = 2):
        super().__init__()
        self.feature_scaler = feature_scaler
        self.head = ProjectionHead(in_channels, embed_dim, feature_scaler=1)
        self.feature: Optional[Tensor] = None
        self.input_shape: Optional[Sequence[int]] = None
        # kept outside the module tree: a second network (a teacher) gets its own hook and head
        self._handle = layer.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.feature = output

    def remember_input_shape(self, shape: Sequence[int]) -> None:
        """The spatial shape of the network input, which decides the grid."""
        self.input_shape = tuple(shape)

    def grid(self, feature_shape: Sequence[int]) -> list[int]:
        """Per axis: the feature size times the scaler where that grid divides the input, else the feature size."""
        if self.input_shape is None:
            return list(feature_shape)
        out = []
        for f, s in zip(feature_shape, self.input_shape):
            g = f * self.feature_scaler
            out.append(g if s % g == 0 else f)
        return out

    def forward(self) -> Tensor:
        if self.feature is None:
            raise RuntimeError("the projection head has no feature: run the network forward first")
        feature, size = self.feature, self.grid(self.feature.shape[2:])
        if list(feature.shape[2:]) != size:
            feature = F.interpolate(feature, size=size, mode="trilinear", align_corners=True)
        return self.head(feature)

    def detach_hook(self) -> None:
        self._handle.remove()


def attach_projection_head(network: nn.Module, layer: Union[nn.Module, str], *, in_channels: Optional[int] = None,
                           example_input: Optional[Tensor] = None, embed_dim: int = 256,
                           feature_scaler: int = 2) -> HookedProjectionHead:
    """A FeCL projection head fed by ``layer`` (a module of ``network`` or its dotted name).

    ``in_channels`` is the layer's output channels; without it, one forward pass of
    ``example_input`` finds it. The input shape of that pass (or of a later
    ``head.remember_input_shape``) decides the patch grid.
    """
    module = network.get_submodule(layer) if isinstance(layer, str) else layer
    if in_channels is None:
        if example_input is None:
            raise ValueError("attach_projection_head needs in_channels or an example_input to find them")
        seen = {}

        def record(module, inputs, output):   # returns None: a forward hook's result replaces the output
            seen["shape"] = output.shape

        probe = module.register_forward_hook(record)
        was_training = network.training
        try:
            network.eval()
            with torch.no_grad():
                network(example_input)
        finally:
            probe.remove()
            network.train(was_training)
        if "shape" not in seen:
            raise ValueError(f"layer {layer!r} did not run in the network's forward pass")
        in_channels = seen["shape"][1]
    head = HookedProjectionHead(module, in_channels, embed_dim, feature_scaler)
    if example_input is not None:
        head.remember_input_shape(example_input.shape[2:])
    return head.to(next(network.parameters()).device)
