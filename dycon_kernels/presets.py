"""The named parameter sets of FeCL (losses.md section 2, "Presets").

``official`` reproduces the released DyCON code, quirks included; ``dycon`` (the default) is
the paper without the released code's defects. ``official``'s teacher threshold follows a ramp
over epochs (method.md section 3), so callers pass it explicitly (see ``teacher_threshold_ramp``).
"""
from __future__ import annotations

import math

FECL_PARAMS = ("temperature", "gamma_pos", "gamma_neg", "top_k", "shift", "teacher", "teacher_top_k",
               "teacher_threshold", "teacher_weight", "reduction")

FECL_PRESETS = {
    "official": dict(temperature=0.6, gamma_pos=2.0, gamma_neg=0.0, top_k=None, shift="column",
                     teacher="threshold", teacher_top_k=None, teacher_threshold=0.3, teacher_weight=1.0,
                     reduction="mean"),
    "dycon": dict(temperature=0.6, gamma_pos=2.0, gamma_neg=2.0, top_k=None, shift="exact",
                  teacher="topk", teacher_top_k=32, teacher_threshold=None, teacher_weight=1.0,
                  reduction="mean"),
}


def teacher_threshold_ramp(epoch: float, ramp_epochs: int = 1500) -> float:
    """The released code's teacher threshold: 0.3 + 0.2 * exp(-5 (1 - min(e, 1500)/1500)^2)."""
    phase = 1.0 - min(epoch, ramp_epochs) / ramp_epochs
    return 0.3 + 0.2 * math.exp(-5.0 * phase * phase)


def fecl_params(preset: str = "dycon", **overrides) -> dict:
    """The preset's parameters with ``overrides`` applied; unknown names are an error."""
    if preset not in FECL_PRESETS:
        raise ValueError(f"unknown FeCL preset {preset!r}; choose one of {list(FECL_PRESETS)}")
    unknown = sorted(set(overrides) - set(FECL_PARAMS))
    if unknown:
        raise ValueError(f"unknown FeCL parameter(s) {unknown}; valid names: {list(FECL_PARAMS)}")
    return {**FECL_PRESETS[preset], **overrides}
