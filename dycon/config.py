"""The run configuration: one plain dict, every key it may hold, and how it is set.

A run's configuration is a YAML file (a path, or a name in ``dycon/configs``) merged over
``DEFAULTS``, then the command-line flags (``FLAG_KEYS``) and dotted overrides
(``apply_overrides``: ``{"loss.temp": 0.5}``, or ``--set loss.temp=0.5``) applied. An ablation
variant is therefore plain data: a dict of dotted keys.

This module imports no torch, so ``python -m dycon.train --help`` stays fast.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
METHODS = ("supervised", "mean_teacher", "uamt", "cps", "dycon")
FRAMEWORKS = ("mean_teacher", "co_training")
PRESETS = ("dycon", "official")
AMP_MODES = (None, "bf16", "fp16")

# Every key a config may set. A config file gives the data set's values; these fill the rest.
DEFAULTS = {
    "name": "run",
    "data": {"layout": None, "root": None, "labelnum": None, "holdout_val": 0, "cache": False,
             "label_seed": None,      # None: the first labelnum cases are labelled (as released)
             "demo_set": "demo",      # layout demo: which synthetic set (dycon/demo.py KINDS)
             # NIfTI data sets (dycon.preprocess): cross-validation fold, resampling, cache, the plan
             "fold": None, "target_spacing": "nnunet", "cache_dir": None, "preprocessing": None},
    "model": {"arch": "unet3d", "in_channels": 1, "num_classes": 2, "base_filters": 16,
              "feature_scaler": 2, "embed_dim": 256,
              "dropout": None,            # None: the architecture's default (0.3 U-Net, 0.5 V-Net)
              # weight initialisation: "released" (Kaiming-normal convolutions, batch-norm weights
              # N(1, 0.02) and biases 0, as the released networks) or "pytorch"; None: by the
              # preset ("released" under official, "pytorch" under dycon)
              "init": None},
    "train": {
        "framework": "mean_teacher", "method": "dycon", "preset": "dycon", "patch_size": [96, 96, 96], "batch_size": 8, "labeled_bs": 4,
        "max_iterations": 20000, "base_lr": 0.01, "lr_schedule": "constant", "momentum": 0.9,
        "weight_decay": 1e-4, "ema_decay": 0.99, "l_weight": 1.0,
        # consistency ramp (MT, UA-MT, CPS, official DyCON's MSE): iterations or a share of the run
        # ("33%"); null: the method's reference (dycon/schedules.py ramp_lengths)
        "consistency": 0.1, "consistency_rampup": None,
        # gradient-norm clipping (per network in co-training); null: the method's reference (1.0
        # for DyCON as released, off for MT, UA-MT, CPS and supervised); 0: off
        "grad_clip": None, "seed": 1337,
        "num_workers": 0, "device": "auto", "kernel_backend": "auto", "log_every": 10,
        # latest.pt is also written at every validation; 0 = only then and at the end
        "checkpoint_every": 200,
        "amp": None,               # None, "bf16" or "fp16" (autocast; fp16 adds loss scaling)
        "compile": False,          # True (inductor) or a torch.compile backend name
        "deterministic": False,    # deterministic algorithms: bitwise-repeatable runs
        # torch CPU threads; None: torch's setting (python -m dycon.train picks the idle cores and
        # records the count here). The count changes float summation order, hence the results.
        "threads": None,
    },
    "loss": {
        # UnCL: beta decays from beta_max to beta_min over the epochs, or stays at s_beta; "mse"
        # replaces UnCL by the plain MSE between student and teacher softmax (whole batch)
        "uncl": "uncl", "beta_max": 5.0, "beta_min": 0.5, "s_beta": None,
        # beta's decay length (iterations or "P%" of the run); null: over the epochs as released
        "beta_decay": None,
        # weights (released: 0.5 both, u_weight) and sigmoid ramp-ups, in iterations or as a share
        # of the run ("33%"; 0: none); FeCL is off for the first fecl_warmup, then ramps up over fecl_rampup
        "uncl_weight": 0.5, "uncl_rampup": 0, "fecl_weight": 0.5, "fecl_rampup": 0, "fecl_warmup": 0,
        # FeCL: temperature, focal exponents of the positives (F+) and of the negatives (F-,
        # dycon preset only), per-anchor weights ("entropy": u = 1 + H, or "none"), the teacher's
        # top-k hard negatives (null or 0: none) and the student's (null or 0: all negatives)
        "temp": 0.6, "gamma_pos": 2.0, "gamma_neg": 2.0, "anchor_weight": "entropy",
        "teacher_top_k": 32, "student_top_k": None,
        # dycon preset: a patch is ignored (-1) when its majority class covers less than
        # patch_purity of its voxels, or (unlabelled) when the teacher's mean confidence is below
        # teacher_confidence
        "patch_purity": 0.6, "teacher_confidence": 0.7,
        "uamt_samples": 8,     # UA-MT: Monte-Carlo dropout passes of the teacher for its uncertainty
        "uamt_threshold_rampup": None,   # UA-MT threshold ramp (iterations or "P%"); null: the whole run
    },
    # weak/strong views (docs/method.md): with ``strong``, the student (and the supervised baseline)
    # trains on a strong intensity view of each volume, same geometry, while the teacher or the
    # pseudo-labeller sees the weak one. Ranges are (low, high) of uniform draws per volume.
    "views": {"strong": False,
              "gamma": [0.7, 1.5],       # on intensities rescaled to [0, 1]
              "contrast": [0.7, 1.3],    # x around the volume mean
              "bias_field": [0.0, 0.3],  # amplitude of a smooth log-multiplicative field
              "noise": [0.0, 0.15],      # Gaussian noise std (the inputs are z-scored)
              "blur": [0.0, 1.0]},       # Gaussian blur sigma, voxels
    # the released validation keeps every component (test.largest_component is for the test set)
    "val": {"every": 200, "stride_xy": 64, "stride_z": 64, "largest_component": False},
    "test": {"stride_xy": 16, "stride_z": 4, "largest_component": True, "hd_definition": "medpy",
             "units": "voxel", "empty_both": "zero",   # empty_both: dycon.metrics.EMPTY_BOTH
             # the checkpoint the trainer tests: "best" (of the validations, as released) or "last"
             "checkpoint": "best"},
}

# SSL4MIS-style flags -> (section, key)
FLAG_KEYS = {
    "root_path": ("data", "root"), "labelnum": ("data", "labelnum"), "layout": ("data", "layout"),
    "fold": ("data", "fold"),
    "method": ("train", "method"), "preset": ("train", "preset"),
    "labeled_bs": ("train", "labeled_bs"), "batch_size": ("train", "batch_size"),
    "max_iterations": ("train", "max_iterations"), "base_lr": ("train", "base_lr"),
    "lr_schedule": ("train", "lr_schedule"), "ema_decay": ("train", "ema_decay"),
    "patch_size": ("train", "patch_size"), "seed": ("train", "seed"), "device": ("train", "device"),
    "kernel_backend": ("train", "kernel_backend"), "num_workers": ("train", "num_workers"),
    "framework": ("train", "framework"), "label_seed": ("data", "label_seed"),
    "temp": ("loss", "temp"), "beta_min": ("loss", "beta_min"),
    "beta_max": ("loss", "beta_max"), "s_beta": ("loss", "s_beta"), "uncl": ("loss", "uncl"),
    "uncl_weight": ("loss", "uncl_weight"), "uncl_rampup": ("loss", "uncl_rampup"),
    "fecl_weight": ("loss", "fecl_weight"), "fecl_rampup": ("loss", "fecl_rampup"),
    "fecl_warmup": ("loss", "fecl_warmup"), "gamma_pos": ("loss", "gamma_pos"), "gamma_neg": ("loss", "gamma_neg"),
    "anchor_weight": ("loss", "anchor_weight"), "teacher_top_k": ("loss", "teacher_top_k"),
    "student_top_k": ("loss", "student_top_k"), "patch_purity": ("loss", "patch_purity"),
    "teacher_confidence": ("loss", "teacher_confidence"), "uamt_samples": ("loss", "uamt_samples"),
    "feature_scaler": ("model", "feature_scaler"), "base_filters": ("model", "base_filters"),
    "val_every": ("val", "every"), "amp": ("train", "amp"), "compile": ("train", "compile"),
    "deterministic": ("train", "deterministic"), "checkpoint_every": ("train", "checkpoint_every"),
    "threads": ("train", "threads"),
}


def load_config(path_or_name: str) -> dict:
    """A YAML config (a path, or the name of one in dycon/configs) merged over DEFAULTS."""
    path = Path(path_or_name)
    if not path.is_file() and (CONFIG_DIR / f"{path_or_name}.yaml").is_file():
        path = CONFIG_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config {path_or_name!r} not found (configs: "
                                f"{sorted(p.stem for p in CONFIG_DIR.glob('*.yaml'))})")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    return merge_config(DEFAULTS, raw, str(path))


def merge_config(base: dict, raw: dict, source: str) -> dict:
    cfg = copy.deepcopy(base)
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a config must be a mapping, got {type(raw).__name__}")
    for key, value in raw.items():
        if key not in base:
            raise ValueError(f"{source}: unknown key {key!r} (valid: {sorted(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {key!r} must be a mapping")
            unknown = sorted(set(value) - set(base[key]))
            if unknown:
                raise ValueError(f"{source}: unknown key(s) {[f'{key}.{k}' for k in unknown]} "
                                 f"(valid: {sorted(base[key])})")
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def apply_overrides(cfg: dict, overrides: dict) -> dict:
    """Set ``{"section.key": value}`` (or a top-level ``"name"``) in ``cfg`` in place; returns it.

    An ablation variant is such a dict. A key that DEFAULTS does not know is an error naming it,
    so a typo never silently leaves the released value in place.
    """
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        known = DEFAULTS
        for part in parts[:-1]:
            known = known.get(part) if isinstance(known, dict) else None
        if not isinstance(known, dict) or parts[-1] not in known or isinstance(known[parts[-1]], dict):
            raise ValueError(f"unknown config key {dotted!r} in overrides (keys are 'section.key', "
                             f"e.g. 'loss.temp'; sections: {sorted(k for k in DEFAULTS if isinstance(DEFAULTS[k], dict))})")
        target = cfg
        for part in parts[:-1]:
            target = target[part]
        target[parts[-1]] = value
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` (the ``--set`` flag) -> ``(KEY, VALUE)``, VALUE read as YAML (``0.5``, ``null``,
    ``[64, 64, 32]``, ``true``, ``dycon``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE (e.g. loss.temp=0.5), got {text!r}")
    return key.strip(), yaml.safe_load(value)


def check_config(cfg: dict) -> None:
    t = cfg["train"]
    if t["method"] not in METHODS:
        raise ValueError(f"train.method must be one of {METHODS}, got {t['method']!r}")
    if t["framework"] not in FRAMEWORKS:
        raise ValueError(f"train.framework must be one of {FRAMEWORKS}, got {t['framework']!r}")
    normalise_method(t)
    if t["framework"] == "co_training" and t["method"] not in ("cps", "dycon"):
        raise ValueError(f"train.framework 'co_training' takes method 'cps' (cross pseudo-labels only) "
                         f"or 'dycon' (with UnCL and FeCL between the students), got {t['method']!r}")
    if t["preset"] not in PRESETS:
        raise ValueError(f"train.preset must be one of {PRESETS}, got {t['preset']!r}")
    if t["amp"] not in AMP_MODES:
        raise ValueError(f"train.amp must be null, 'bf16' or 'fp16', got {t['amp']!r}")
    if not isinstance(t["compile"], (bool, str)):
        raise ValueError(f"train.compile must be true/false or a torch.compile backend name, got {t['compile']!r}")
    if t["lr_schedule"] not in ("constant", "poly"):
        raise ValueError(f"train.lr_schedule must be 'constant' or 'poly', got {t['lr_schedule']!r}")
    if len(t["patch_size"]) != 3 or any(int(p) % 16 for p in t["patch_size"]):
        raise ValueError(f"train.patch_size must be three sizes divisible by 16, got {t['patch_size']}")
    if not 1 <= t["labeled_bs"] <= t["batch_size"]:
        raise ValueError(f"need 1 <= labeled_bs <= batch_size, got {t['labeled_bs']} and {t['batch_size']}")
    if t["method"] != "supervised" and t["labeled_bs"] == t["batch_size"]:
        raise ValueError(f"train.method {t['method']!r} needs unlabelled volumes in the batch: "
                         f"labeled_bs ({t['labeled_bs']}) must be smaller than batch_size")
    if cfg["model"]["init"] not in (None, "released", "pytorch"):
        raise ValueError(f"model.init must be null, 'released' or 'pytorch', got {cfg['model']['init']!r}")
    check_loss_switches(cfg["loss"])
    check_schedules(cfg)
    if cfg["test"]["checkpoint"] not in ("best", "last"):
        raise ValueError(f"test.checkpoint must be 'best' or 'last', got {cfg['test']['checkpoint']!r}")
    check_views(cfg["views"])
    if t["grad_clip"] is not None and (not isinstance(t["grad_clip"], (int, float)) or t["grad_clip"] < 0):
        raise ValueError(f"train.grad_clip must be null (the method's reference), 0 (off) or a norm > 0, "
                         f"got {t['grad_clip']!r}")
    for key in ("layout", "root", "labelnum"):
        if cfg["data"][key] is None:
            raise ValueError(f"data.{key} is not set (config file or command line)")


def normalise_method(t: dict) -> None:
    """``cps`` is Co-Training with cross pseudo-labels only; the old spelling of it (framework
    co_training, method mean_teacher) still works, with a notice."""
    if t["method"] == "cps":
        t["framework"] = "co_training"
    elif t["framework"] == "co_training" and t["method"] == "mean_teacher":
        logging.getLogger("dycon.train").warning(
            "notice: framework co_training with method mean_teacher is now method 'cps' (--method cps)")
        t["method"] = "cps"


def check_schedules(cfg: dict) -> None:
    """Every ramp length is iterations or a share of the run (the error names the key)."""
    from dycon.schedules import ramp_lengths
    ramp_lengths(cfg)


def check_views(views: dict) -> None:
    if not isinstance(views["strong"], bool):
        raise ValueError(f"views.strong must be true or false, got {views['strong']!r}")
    for key in ("gamma", "contrast", "bias_field", "noise", "blur"):
        r = views[key]
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, (int, float)) for x in r)
                and 0 <= r[0] <= r[1]):
            raise ValueError(f"views.{key} must be a range [low, high] with 0 <= low <= high, got {r!r}")
    if views["gamma"][0] <= 0 or views["contrast"][0] <= 0:
        raise ValueError(f"views.gamma and views.contrast must be > 0, got {views['gamma']} and {views['contrast']}")


def check_loss_switches(loss: dict) -> None:
    """The method's switches: named choices and non-negative weights, counts and exponents."""
    choices = {"uncl": ("uncl", "mse"), "anchor_weight": ("entropy", "none")}
    for key, allowed in choices.items():
        if loss[key] not in allowed:
            raise ValueError(f"loss.{key} must be one of {allowed}, got {loss[key]!r}")
    for key in ("uncl_weight", "fecl_weight", "gamma_pos", "gamma_neg"):
        if not isinstance(loss[key], (int, float)) or loss[key] < 0:
            raise ValueError(f"loss.{key} must be a number >= 0, got {loss[key]!r}")
    for key in ("teacher_top_k", "student_top_k"):
        if loss[key] is not None and (not isinstance(loss[key], int) or loss[key] < 0):
            raise ValueError(f"loss.{key} must be null or 0 (off) or an integer k >= 1, got {loss[key]!r}")
    if not isinstance(loss["uamt_samples"], int) or loss["uamt_samples"] < 2:
        raise ValueError(f"loss.uamt_samples must be an integer >= 2, got {loss['uamt_samples']!r}")


def check_amp_device(t: dict, device) -> None:
    """Refuse the one precision/device pairing known to give wrong gradients."""
    # Measured with torch 2.14 on the CPU (oneDNN): under bf16 autocast the weight gradient of a
    # 3x3x3 Conv3d with 32 or more channels is garbage (NaN, or finite values off by up to 1e37,
    # changing from call to call) when its input is 2 voxels deep along X. Both networks convolve
    # inputs patch_size[0] / 16 and / 8 deep, so X patches of 16 or 32 voxels hit it.
    if t["amp"] == "bf16" and device.type == "cpu" and int(t["patch_size"][0]) < 48:
        raise ValueError(f"train.amp 'bf16' on the CPU needs patch_size[0] >= 48, got {t['patch_size']}: "
                         "PyTorch's oneDNN bf16 Conv3d weight gradient is wrong for inputs 2 voxels deep "
                         "(use a larger patch, amp 'fp16' or no amp on the CPU)")


def resolve_labelnum(labelnum, n_train: int) -> int:
    """``labelnum`` as a count; a string such as '10%' is a share of the training list."""
    if isinstance(labelnum, str) and labelnum.endswith("%"):
        return max(1, round(n_train * float(labelnum[:-1]) / 100))
    return int(labelnum)


def apply_flags(cfg: dict, args) -> None:
    """Set the config values given as flags (``FLAG_KEYS``; attributes of ``args`` that are None
    were not given), then the ``--set KEY=VALUE`` overrides."""
    for flag, (section, key) in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            if flag == "labelnum" and not str(value).endswith("%"):
                value = int(value)
            cfg[section][key] = list(value) if isinstance(value, (list, tuple)) else value
    apply_overrides(cfg, dict(parse_override(text) for text in getattr(args, "set", None) or []))


def prepare_demo_data(cfg: dict, generate: bool = False) -> None:
    """Demo layout: default the root (per synthetic set, dycon/demo.py) and generate the set there
    on first use. Into a root the user named, only when ``generate`` (``--generate-demo``): a
    mistyped ``--root_path`` is an error, not a new 24 MB data set."""
    if cfg["data"]["layout"] != "demo":
        return
    from dycon.demo import default_root, prepare_demo_set   # h5py and scipy: only when needed

    if cfg["data"]["root"] is None:
        cfg["data"]["root"] = str(default_root(cfg["data"]["demo_set"]))
    elif not generate and not (Path(cfg["data"]["root"]) / "demo_version.txt").exists():
        raise FileNotFoundError(f"data root {cfg['data']['root']} holds no demo data (data.root / --root_path); "
                                "add --generate-demo to generate the demo data set there")
    prepare_demo_set(cfg["data"]["root"], cfg["data"]["demo_set"])
