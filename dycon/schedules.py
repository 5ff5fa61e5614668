"""What changes over a run: UnCL's beta, the ramp-ups of the unsupervised weights, UA-MT's
threshold, the learning rate (method.md section 3). Plain functions of the step and the config; no torch.

Every ramp length is given in the units of the run: a number of iterations, or a share of
``train.max_iterations`` written ``"33%"``. ``null`` is the method's own reference
(``ramp_lengths``): Mean Teacher, UA-MT and Co-Training (CPS) ramp their consistency over the
whole run (SSL4MIS: ``consistency_rampup`` blocks of 150 iterations = ``max_iterations``), UA-MT's
threshold ramps over the whole run, DyCON keeps the released schedule (its official extra MSE ramps
over 200 blocks of 150 = 30 000 iterations whatever the run; UnCL and FeCL do not ramp).
"""
from __future__ import annotations

import math

RELEASED_DYCON_MSE_RAMP = 200 * 150   # the released DyCON: consistency_rampup 200, in blocks of 150


def iterations(length, max_iterations: int, key: str = "ramp") -> float:
    """A ramp length in iterations: ``length`` itself, or the share ``"P%"`` of ``max_iterations``."""
    if isinstance(length, str) and length.strip().endswith("%"):
        try:
            return max_iterations * float(length.strip()[:-1]) / 100.0
        except ValueError:
            pass
    elif isinstance(length, (int, float)) and not isinstance(length, bool) and length >= 0:
        return float(length)
    raise ValueError(f"{key} must be iterations >= 0 or a share of train.max_iterations such as '33%', "
                     f"got {length!r}")


def ramp_lengths(cfg: dict) -> dict:
    """Every ramp of the run in iterations, the method's reference where the config says null."""
    t, loss, n = cfg["train"], cfg["loss"], cfg["train"]["max_iterations"]
    released_dycon = t["method"] == "dycon" and t["framework"] == "mean_teacher"
    consistency = t["consistency_rampup"]
    if consistency is None:
        consistency = RELEASED_DYCON_MSE_RAMP if released_dycon else "100%"
    return {"consistency": iterations(consistency, n, "train.consistency_rampup"),
            "uncl": iterations(loss["uncl_rampup"], n, "loss.uncl_rampup"),
            "fecl": iterations(loss["fecl_rampup"], n, "loss.fecl_rampup"),
            "fecl_warmup": iterations(loss["fecl_warmup"], n, "loss.fecl_warmup"),
            "uamt_threshold": iterations("100%" if loss["uamt_threshold_rampup"] is None
                                         else loss["uamt_threshold_rampup"], n, "loss.uamt_threshold_rampup"),
            "beta": None if loss["beta_decay"] is None else iterations(loss["beta_decay"], n, "loss.beta_decay")}


def beta_at(epoch: int, n_epochs: int, loss_cfg: dict, step: int = 0, decay: float | None = None) -> float:
    """UnCL's beta: beta_max * (beta_min / beta_max) ^ p, p = e / E over the epochs as released, or
    min(step / decay, 1) when ``loss.beta_decay`` sets a length (``decay``); or the fixed s_beta."""
    if loss_cfg["s_beta"] is not None:
        return float(loss_cfg["s_beta"])
    progress = epoch / n_epochs if decay is None else (min(step / decay, 1.0) if decay > 0 else 1.0)
    return loss_cfg["beta_max"] * (loss_cfg["beta_min"] / loss_cfg["beta_max"]) ** progress


def consistency_weight(step: int, cfg: dict) -> float:
    """The consistency (MT, UA-MT, CPS; DyCON official's extra MSE) weight: consistency x the
    sigmoid ramp over ``ramp_lengths(cfg)["consistency"]`` iterations. SSL4MIS evaluates the same
    ramp at the step rounded down to a block of 150; here the step itself (no staircase)."""
    return cfg["train"]["consistency"] * sigmoid_rampup(step, ramp_lengths(cfg)["consistency"])


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


def unsupervised_weights(cfg: dict, step: int) -> tuple[float, float]:
    """DyCON's (UnCL, FeCL) weights at ``step``: each weight times its ramp-up; FeCL is 0 during
    its warm-up and ramps up after it. The released code: 0.5 and 0.5, no ramp, no warm-up."""
    loss, ramps = cfg["loss"], ramp_lengths(cfg)
    uncl = loss["uncl_weight"] * sigmoid_rampup(step, ramps["uncl"])
    if step < ramps["fecl_warmup"]:
        return uncl, 0.0
    return uncl, loss["fecl_weight"] * sigmoid_rampup(step - ramps["fecl_warmup"], ramps["fecl"])


def uamt_threshold(step: int, cfg: dict) -> float:
    """UA-MT's uncertainty threshold, (0.75 + 0.25 ramp) log C: fewer voxels masked as training goes on."""
    ramp = sigmoid_rampup(step, ramp_lengths(cfg)["uamt_threshold"])
    return (0.75 + 0.25 * ramp) * math.log(cfg["model"]["num_classes"])


def unsupervised_terms(cfg: dict) -> list[str]:
    """The names of the weighted unsupervised terms the method adds (their weights: ``weights_at``)."""
    t, loss = cfg["train"], cfg["loss"]
    names = ["cps"] if t["framework"] == "co_training" else []
    if t["method"] in ("mean_teacher", "uamt") or (t["method"] == "dycon" and t["preset"] == "official"):
        names.append("mse")
    if t["method"] == "dycon":
        names += [n for n, w in (("uncl", loss["uncl_weight"]), ("fecl", loss["fecl_weight"])) if w > 0]
    return names


def weights_at(cfg: dict, step: int) -> dict:
    """Each unsupervised weight of the method at ``step`` (``unsupervised_terms``)."""
    uncl, fecl = unsupervised_weights(cfg, step)
    consistency = consistency_weight(step, cfg)
    every = {"cps": consistency, "mse": consistency, "uncl": uncl, "fecl": fecl}
    return {name: every[name] for name in unsupervised_terms(cfg)}


def summary(cfg: dict) -> tuple[list[str], list[str]]:
    """The log lines stating each unsupervised weight at 0, 25, 50 and 100 % of the run, and the
    warnings for ramps that do not complete within it."""
    n, ramps = cfg["train"]["max_iterations"], ramp_lengths(cfg)
    steps = [0, n // 4, n // 2, n]
    lines = [f"unsupervised weight {name} at steps {steps} (0/25/50/100 %): "
             + " ".join(f"{weights_at(cfg, s)[name]:.4g}" for s in steps)
             for name in unsupervised_terms(cfg)]
    if cfg["train"]["method"] == "uamt":
        lines.append(f"UA-MT threshold at the same steps: " + " ".join(f"{uamt_threshold(s, cfg):.4g}" for s in steps))
    # (ramp, the iteration it starts at, the terms it weighs)
    ramped = {"consistency": (0, {"cps", "mse"}), "uncl": (0, {"uncl"}), "fecl": (ramps["fecl_warmup"], {"fecl"})}
    warnings = [f"the {name} ramp ({ramps[name]:.0f} iterations from step {start:.0f}) does not complete within "
                f"the run ({n} iterations): its weight ends at {sigmoid_rampup(n - start, ramps[name]):.3g} of its maximum"
                for name, (start, terms) in ramped.items()
                if terms & set(unsupervised_terms(cfg)) and start + ramps[name] > n]
    return lines, warnings
