"""What changes over a run: UnCL's beta, the consistency ramp-up, the learning rate.

Plain functions of the step or epoch and the config (method.md section 3); no torch.
"""
from __future__ import annotations

import math


def beta_at(epoch: int, n_epochs: int, loss_cfg: dict) -> float:
    """UnCL's beta: beta_max * (beta_min / beta_max) ^ (e / E), or the fixed s_beta."""
    if loss_cfg["s_beta"] is not None:
        return float(loss_cfg["s_beta"])
    return loss_cfg["beta_max"] * (loss_cfg["beta_min"] / loss_cfg["beta_max"]) ** (epoch / n_epochs)


def consistency_weight(step: int, train_cfg: dict) -> float:
    """Mean-Teacher MSE weight: consistency * exp(-5 (1 - min(step // 150, R) / R)^2)."""
    ramp = train_cfg["consistency_rampup"]
    phase = 1.0 - min(step // 150, ramp) / ramp if ramp > 0 else 0.0
    return train_cfg["consistency"] * math.exp(-5.0 * phase * phase)


def learning_rate(step: int, train_cfg: dict) -> float:
    if train_cfg["lr_schedule"] == "poly":
        return train_cfg["base_lr"] * (1.0 - step / train_cfg["max_iterations"]) ** 0.9
    return train_cfg["base_lr"]


def sigmoid_rampup(step: float, length: float) -> float:
    """exp(-5 (1 - min(step, length) / length)^2): from e^-5 to 1 over ``length``; 1 when length is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0), length) / length
    return math.exp(-5.0 * phase * phase)


def unsupervised_weights(loss_cfg: dict, step: int) -> tuple[float, float]:
    """DyCON's (UnCL, FeCL) weights at ``step``: each weight times its ramp-up; FeCL is 0 during
    its warm-up and ramps up after it. The released code: 0.5 and 0.5, no ramp, no warm-up."""
    uncl = loss_cfg["uncl_weight"] * sigmoid_rampup(step, loss_cfg["uncl_rampup"])
    if step < loss_cfg["fecl_warmup"]:
        return uncl, 0.0
    return uncl, loss_cfg["fecl_weight"] * sigmoid_rampup(step - loss_cfg["fecl_warmup"], loss_cfg["fecl_rampup"])
