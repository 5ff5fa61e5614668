"""Train DyCON (or a baseline) with the Mean-Teacher loop of method.md section 3.

    python -m dycon.train                                  # the demo: synthetic data, CPU, minutes
    python -m dycon.train --config dycon/configs/brats19.yaml --root_path ../data/BraTS2019
    python -m dycon.train --config brats19 --method mean_teacher --labelnum 50 --device cuda
    python -m dycon.train --config brats19 --preset official      # the released code's quirks
    python -m dycon.train --resume runs/brats19-dycon-20250101-120000

Everything a run needs is one plain dict (the YAML config, merged over DEFAULTS, with the
command-line flags applied); it is saved as ``config.yaml`` in the run directory together with
the log, ``metrics.csv``, TensorBoard scalars, and ``latest.pt`` / ``best.pt`` checkpoints.

Methods: ``supervised`` (labelled batches only, CE + Dice), ``mean_teacher`` (+ MSE between
student and teacher softmax on the unlabelled half, ramped up), ``dycon`` (+ UnCL and FeCL).
FeCL presets: ``dycon`` (default, no label leakage) and ``official`` (the released code).
"""
from __future__ import annotations

import argparse
import copy
import csv
import logging
import math
import os
import pickle
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

import dycon_kernels
from dycon.data import PatchDataset, TwoStreamBatchSampler, labelled_split, list_cases
from dycon.demo import default_root, ensure_demo_data
from dycon.inference import segment
from dycon.metrics import dice
from dycon.networks import build_model
from dycon_kernels.presets import teacher_threshold_ramp

log = logging.getLogger("dycon.train")

CONFIG_DIR = Path(__file__).parent / "configs"
METHODS = ("supervised", "mean_teacher", "dycon")
PRESETS = ("dycon", "official")

# Every key a config may set. A config file gives the data set's values; these fill the rest.
DEFAULTS = {
    "name": "run",
    "data": {"layout": None, "root": None, "labelnum": None, "holdout_val": 0, "cache": False},
    "model": {"arch": "unet3d", "in_channels": 1, "num_classes": 2, "base_filters": 16,
              "feature_scaler": 2, "embed_dim": 256},
    "train": {
        "method": "dycon", "preset": "dycon", "patch_size": [96, 96, 96], "batch_size": 8, "labeled_bs": 4,
        "max_iterations": 20000, "base_lr": 0.01, "lr_schedule": "constant", "momentum": 0.9,
        "weight_decay": 1e-4, "ema_decay": 0.99, "l_weight": 1.0, "u_weight": 0.5,
        "consistency": 0.1, "consistency_rampup": 200.0, "grad_clip": 1.0, "seed": 1337,
        "num_workers": 0, "device": "auto", "kernel_backend": "auto", "log_every": 10,
    },
    "loss": {
        "beta_max": 5.0, "beta_min": 0.5, "s_beta": None, "temp": 0.6, "gamma": 2.0,
        # dycon preset: a patch is ignored (-1) when its majority class covers less than
        # patch_purity of its voxels, or (unlabelled) when the teacher's mean confidence is below
        # teacher_confidence
        "patch_purity": 0.6, "teacher_confidence": 0.7,
    },
    "val": {"every": 200, "stride_xy": 64, "stride_z": 64},
    "test": {"stride_xy": 16, "stride_z": 4, "largest_component": True, "hd_definition": "medpy",
             "units": "voxel"},
}

# SSL4MIS-style flags -> (section, key)
FLAG_KEYS = {
    "root_path": ("data", "root"), "labelnum": ("data", "labelnum"),
    "method": ("train", "method"), "preset": ("train", "preset"),
    "labeled_bs": ("train", "labeled_bs"), "batch_size": ("train", "batch_size"),
    "max_iterations": ("train", "max_iterations"), "base_lr": ("train", "base_lr"),
    "lr_schedule": ("train", "lr_schedule"), "ema_decay": ("train", "ema_decay"),
    "patch_size": ("train", "patch_size"), "seed": ("train", "seed"), "device": ("train", "device"),
    "kernel_backend": ("train", "kernel_backend"), "num_workers": ("train", "num_workers"),
    "temp": ("loss", "temp"), "gamma": ("loss", "gamma"), "beta_min": ("loss", "beta_min"),
    "beta_max": ("loss", "beta_max"), "s_beta": ("loss", "s_beta"),
    "feature_scaler": ("model", "feature_scaler"), "base_filters": ("model", "base_filters"),
    "val_every": ("val", "every"),
}


# ------------------------------------------------------------------------------------- config

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


def check_config(cfg: dict) -> None:
    t = cfg["train"]
    if t["method"] not in METHODS:
        raise ValueError(f"train.method must be one of {METHODS}, got {t['method']!r}")
    if t["preset"] not in PRESETS:
        raise ValueError(f"train.preset must be one of {PRESETS}, got {t['preset']!r}")
    if t["lr_schedule"] not in ("constant", "poly"):
        raise ValueError(f"train.lr_schedule must be 'constant' or 'poly', got {t['lr_schedule']!r}")
    if len(t["patch_size"]) != 3 or any(int(p) % 16 for p in t["patch_size"]):
        raise ValueError(f"train.patch_size must be three sizes divisible by 16, got {t['patch_size']}")
    if not 1 <= t["labeled_bs"] <= t["batch_size"]:
        raise ValueError(f"need 1 <= labeled_bs <= batch_size, got {t['labeled_bs']} and {t['batch_size']}")
    if t["method"] != "supervised" and t["labeled_bs"] == t["batch_size"]:
        raise ValueError(f"train.method {t['method']!r} needs unlabelled volumes in the batch: "
                         f"labeled_bs ({t['labeled_bs']}) must be smaller than batch_size")
    for key in ("layout", "root", "labelnum"):
        if cfg["data"][key] is None:
            raise ValueError(f"data.{key} is not set (config file or command line)")


def resolve_labelnum(labelnum, n_train: int) -> int:
    """``labelnum`` as a count; a string such as '10%' is a share of the training list."""
    if isinstance(labelnum, str) and labelnum.endswith("%"):
        return max(1, round(n_train * float(labelnum[:-1]) / 100))
    return int(labelnum)


# ---------------------------------------------------------------------------------- schedules

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


# -------------------------------------------------------------------------------------- losses

def dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum(p y) + 1e-5) / (sum(y^2) + sum(p^2) + 1e-5), over the whole batch."""
    target = target.float()
    inter = (probs * target).sum()
    return 1 - (2 * inter + 1e-5) / ((target * target).sum() + (probs * probs).sum() + 1e-5)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + Dice of the foreground softmax (mean over the foreground classes)."""
    probs = logits.softmax(1)
    dices = [dice_loss(probs[:, c], labels == c) for c in range(1, logits.shape[1])]
    return F.cross_entropy(logits, labels) + torch.stack(dices).mean()


def patch_labels_dycon(labels: torch.Tensor, teacher_probs: torch.Tensor, labeled_bs: int, grid,
                       loss_cfg: dict) -> torch.Tensor:
    """Patch labels without leakage: ground truth for the labelled volumes, the teacher's argmax
    for the others; majority class per patch, -1 where the majority or the teacher's confidence
    is too weak. Returns ``(B, N)``."""
    num_classes = teacher_probs.shape[1]
    voxel = torch.cat([labels[:labeled_bs], teacher_probs[labeled_bs:].argmax(1)])
    block = [s // g for s, g in zip(labels.shape[1:], grid)]
    share = F.avg_pool3d(F.one_hot(voxel, num_classes).permute(0, 4, 1, 2, 3).float(), block)
    purity, patch = share.max(1)
    patch[purity < loss_cfg["patch_purity"]] = -1
    confidence = F.avg_pool3d(teacher_probs[labeled_bs:].max(1).values[:, None], block)[:, 0]
    patch[labeled_bs:][confidence < loss_cfg["teacher_confidence"]] = -1
    return patch.flatten(1)


def patch_labels_official(labels: torch.Tensor, grid) -> torch.Tensor:
    """The released code's patch labels: trilinear downsampling of the (ground-truth) mask > 0.5."""
    small = F.interpolate(labels[:, None].float(), size=tuple(grid), mode="trilinear", align_corners=False)
    return (small[:, 0] > 0.5).long().flatten(1)


def anchor_weights(student_logits: torch.Tensor, grid) -> torch.Tensor:
    """u = 1 + H: the student's softmax entropy pooled to the patch grid, normalised by log C."""
    probs = student_logits.detach().float().softmax(1)
    entropy = -(probs * torch.log(probs + 1e-6)).sum(1, keepdim=True) / math.log(probs.shape[1])
    block = [s // g for s, g in zip(student_logits.shape[2:], grid)]
    return 1.0 + F.avg_pool3d(entropy, block)[:, 0].flatten(1)


def patch_grid(cfg: dict) -> list[int]:
    """FeCL patch grid: the input divided by 16 / feature_scaler."""
    return [int(p) * cfg["model"]["feature_scaler"] // 16 for p in cfg["train"]["patch_size"]]


def compute_losses(cfg: dict, batch: dict, student, teacher, step: int, epoch: int, n_epochs: int) -> dict:
    """All loss terms of one iteration; ``total`` is what gets back-propagated."""
    t, lcfg = cfg["train"], cfg["loss"]
    method, preset, lb = t["method"], t["preset"], t["labeled_bs"]
    image, labels = batch["image"], batch["label"]

    logits, embeddings = student(image)
    out = {"sup": supervised_loss(logits[:lb], labels[:lb])}
    out["total"] = t["l_weight"] * out["sup"]
    if method == "supervised":
        return out

    noise = torch.clamp(torch.randn_like(image) * 0.1, -0.2, 0.2)
    with torch.no_grad():
        t_logits, t_embeddings = teacher(image + noise)

    if method == "mean_teacher" or preset == "official":
        # the released code applies softmax to probabilities here (softmax twice); the plain
        # Mean-Teacher baseline compares the probabilities themselves
        s_probs, t_probs = logits[lb:].softmax(1), t_logits[lb:].softmax(1)
        if method == "dycon":
            s_probs, t_probs = s_probs.softmax(1), t_probs.softmax(1)
        out["mse"] = F.mse_loss(s_probs, t_probs)
        out["total"] = out["total"] + consistency_weight(step, t) * out["mse"]
    if method == "mean_teacher":
        return out

    beta = beta_at(epoch, n_epochs, lcfg)
    backend = t["kernel_backend"]
    out["beta"] = beta
    out["uncl"] = dycon_kernels.uncl(logits, t_logits.detach(), beta, backend=backend)
    grid = patch_grid(cfg)
    params = dict(temperature=lcfg["temp"], gamma_pos=lcfg["gamma"])
    if preset == "official":
        patch = patch_labels_official(labels, grid)[lb:]
        out["fecl"] = dycon_kernels.fecl(embeddings[lb:], patch, t_embeddings[lb:], patch, preset="official",
                                         backend=backend, teacher_threshold=teacher_threshold_ramp(epoch), **params)
    else:
        patch = patch_labels_dycon(labels, t_logits.softmax(1), lb, grid, lcfg)
        out["fecl"] = dycon_kernels.fecl(embeddings, patch, t_embeddings, patch,
                                         anchor_weight=anchor_weights(logits, grid), preset="dycon",
                                         backend=backend, gamma_neg=lcfg["gamma"], **params)
    out["total"] = out["total"] + t["u_weight"] * (out["fecl"] + out["uncl"])
    return out


@torch.no_grad()
def ema_update(teacher, student, decay: float, step: int) -> None:
    """teacher = alpha teacher + (1 - alpha) student, alpha = min(1 - 1/(step+1), decay); buffers copied."""
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    for tp, sp in zip(teacher.parameters(), student.parameters()):
        tp.mul_(alpha).add_(sp, alpha=1.0 - alpha)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


# --------------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    """Every RNG state, as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                         f"types, which weights_only=True loading does not run ({str(err).splitlines()[0]})") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path} ({type(err).__name__}: {err})") from err


# ----------------------------------------------------------------------------------- the run

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_logging(run_dir: Path) -> None:
    class TqdmHandler(logging.Handler):   # prints above the progress bar instead of through it
        def emit(self, record):
            tqdm.write(self.format(record))

    log.setLevel(logging.INFO)
    log.handlers.clear()
    file_handler = logging.FileHandler(run_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    log.propagate = False


class MetricsLog:
    """metrics.csv (one row per logged step) and the TensorBoard scalars."""
    FIELDS = ["step", "epoch", "lr", "beta", "total", "sup", "mse", "uncl", "fecl", "val_dice", "skipped"]

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.csv"
        rows = []
        if resume_step and self.path.exists():   # drop the rows written after the checkpoint
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        from torch.utils.tensorboard import SummaryWriter   # slow import, only for real runs
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        for key, value in row.items():
            if key not in ("step", "epoch") and value not in ("", None):
                self.tb.add_scalar(f"train/{key}" if key != "val_dice" else "val/dice", value, row["step"])

    def close(self) -> None:
        self.tb.close()


def validate(model, cases, cfg: dict, device) -> float:
    """Mean foreground Dice of the validation cases (sliding-window inference)."""
    scores = []
    for case in cases:
        volume = case.load()
        pred = segment(model, volume.image, cfg["train"]["patch_size"], cfg["val"]["stride_xy"],
                       cfg["val"]["stride_z"], cfg["model"]["num_classes"],
                       cfg["test"]["largest_component"], device)
        scores += [dice(pred == c, volume.label == c) for c in range(1, cfg["model"]["num_classes"])]
    return float(np.mean(scores))


def train(cfg: dict, run_dir: Path, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or continue) training; returns ``{"step", "best_dice", "skipped", "seconds"}``.

    ``stop_after`` ends this call after that many optimiser steps in total, saving
    ``latest.pt`` so that ``resume=True`` continues the same run (e.g. on a time-limited queue).
    """
    t = cfg["train"]
    device = pick_device(t["device"])
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir)
    torch.manual_seed(t["seed"])
    np.random.seed(t["seed"] % 2 ** 32)
    random.seed(t["seed"])

    train_cases = list_cases(cfg["data"], "train")
    labelnum = resolve_labelnum(cfg["data"]["labelnum"], len(train_cases))
    labeled, unlabeled = labelled_split(len(train_cases), labelnum)
    supervised = t["method"] == "supervised"
    sampler = TwoStreamBatchSampler(labeled, [] if supervised else unlabeled, t["labeled_bs"],
                                    0 if supervised else t["batch_size"] - t["labeled_bs"], seed=t["seed"])
    dataset = PatchDataset(train_cases, t["patch_size"], augment=True, cache=cfg["data"]["cache"])
    # a private generator: creating the loader's iterator must not draw from the global RNG,
    # or a resumed run (which starts its iterator mid-epoch) would see other noise and dropout
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=t["num_workers"],
                        generator=torch.Generator(), pin_memory=device.type == "cuda")
    val_cases = list_cases(cfg["data"], "val") if cfg["val"]["every"] else []

    student = build_model(cfg["model"]).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    teacher.train()   # as released: dropout and batch statistics in the teacher too
    optimizer = torch.optim.SGD(student.parameters(), lr=t["base_lr"], momentum=t["momentum"],
                                weight_decay=t["weight_decay"])

    step = batches = skipped = 0
    best_dice, best_step = -1.0, 0
    if resume:
        ckpt = load_checkpoint(run_dir / "latest.pt", map_location=device)
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, batches, skipped = ckpt["step"], ckpt["sampler"]["batches"], ckpt["skipped_steps"]
        best_dice, best_step = ckpt["best_dice"], ckpt["best_step"]
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        log.info("resumed %s at step %d (best Dice %.4f at step %d)", run_dir, step, best_dice, best_step)
    metrics = MetricsLog(run_dir, step if resume else 0)

    n_epochs = t["max_iterations"] // len(sampler) + 1
    if t["preset"] == "official" and t["method"] == "dycon":
        log.warning("preset 'official': FeCL patch labels of the UNLABELLED volumes come from their ground "
                    "truth, as in the released code (label leakage); results are not semi-supervised")
    log.info("%d training cases (%d labelled, %d unlabelled), %d validation; %d batches per epoch; "
             "device %s; %.2fM parameters", len(train_cases), labelnum, len(unlabeled), len(val_cases),
             len(sampler), device, sum(p.numel() for p in student.parameters()) / 1e6)

    def state() -> dict:
        return {"student": student.state_dict(), "teacher": teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "config": cfg, "best_dice": best_dice,
                "best_step": best_step, "skipped_steps": skipped,
                # workers prefetch ahead of the loop: what counts is what the loop consumed
                "sampler": {**sampler.state_dict(), "batches": batches}, "rng": rng_state()}

    start, last_stats = time.time(), {}
    bar = tqdm(total=t["max_iterations"], initial=step, desc=cfg["name"], dynamic_ncols=True)
    data_iter = iter(loader)
    while step < t["max_iterations"] and (stop_after is None or step < stop_after):
        try:
            batch = next(data_iter)
        except StopIteration:   # end of an epoch (one pass over the labelled list)
            data_iter = iter(loader)
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        epoch = batches // len(sampler)
        batches += 1
        lr = learning_rate(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr

        losses = compute_losses(cfg, batch, student, teacher, step, epoch, n_epochs)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(losses["total"]):
            skipped += 1
            log.warning("step %d: non-finite loss %s, batch skipped (%d so far)", step,
                        {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}, skipped)
            continue
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), t["grad_clip"])
        if not torch.isfinite(grad_norm):
            skipped += 1
            log.warning("step %d: non-finite gradient norm, batch skipped (%d so far)", step, skipped)
            continue
        optimizer.step()
        ema_update(teacher, student, t["ema_decay"], step)
        step += 1
        bar.update(1)

        last_stats = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}
        if step % t["log_every"] == 0 or step == t["max_iterations"]:
            bar.set_postfix(loss=f"{last_stats['total']:.3f}", best=f"{max(best_dice, 0):.3f}")
            metrics.write({"step": step, "epoch": epoch, "lr": lr, "skipped": skipped, **last_stats})
            log.debug("step %d %s", step, last_stats)
        if cfg["val"]["every"] and (step % cfg["val"]["every"] == 0 or step == t["max_iterations"]):
            val_dice = validate(student, val_cases, cfg, device)
            metrics.write({"step": step, "epoch": epoch, "val_dice": val_dice})
            if val_dice > best_dice:
                best_dice, best_step = val_dice, step
                save_checkpoint(run_dir / "best.pt", state())
            log.info("step %d: loss %.4f  val Dice %.4f  (best %.4f at step %d)", step, last_stats["total"],
                     val_dice, best_dice, best_step)
            save_checkpoint(run_dir / "latest.pt", state())
    bar.close()
    save_checkpoint(run_dir / "latest.pt", state())
    metrics.close()
    seconds = time.time() - start
    log.info("stopped at step %d after %.0f s (%d non-finite steps skipped)", step, seconds, skipped)
    return {"step": step, "best_dice": best_dice, "best_step": best_step, "skipped": skipped, "seconds": seconds}


def test_run(cfg: dict, run_dir: Path) -> dict:
    """Evaluate the run's best checkpoint (the latest without validation) on the test list."""
    from dycon.evaluate import evaluate_cases, format_table

    name = "best.pt" if (run_dir / "best.pt").exists() else "latest.pt"
    device = pick_device(cfg["train"]["device"])
    model = build_model(cfg["model"]).to(device)
    model.load_state_dict(load_checkpoint(run_dir / name, map_location=device)["student"])
    eval_cfg = {**cfg["test"], "patch_size": cfg["train"]["patch_size"], "num_classes": cfg["model"]["num_classes"]}
    rows, summary = evaluate_cases(model, list_cases(cfg["data"], "test"), eval_cfg)
    with open(run_dir / "test_cases.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(run_dir / "test_summary.yaml", "w") as f:
        yaml.safe_dump(summary, f, sort_keys=False)
    log.info("test set, student weights of %s:\n%s", name, format_table(summary))
    return summary


# --------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dycon.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="YAML file or name in dycon/configs (default: demo)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest.pt")
    p.add_argument("--output", metavar="RUN_DIR", help="run directory (default runs/<config>-<method>-<time>)")
    p.add_argument("--no-test", dest="test", action="store_false", help="skip the test-set evaluation")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--preset", choices=PRESETS, help="FeCL patch labels and loss settings (default dycon)")
    p.add_argument("--root_path", help="data root")
    p.add_argument("--labelnum", help="labelled cases: a count or a share such as 10%%")
    for flag in ("labeled_bs", "batch_size", "max_iterations", "seed", "feature_scaler", "base_filters",
                 "val_every", "num_workers"):
        p.add_argument(f"--{flag}", type=int)
    for flag in ("base_lr", "ema_decay", "temp", "gamma", "beta_min", "beta_max", "s_beta"):
        p.add_argument(f"--{flag}", type=float)
    p.add_argument("--lr_schedule", choices=("constant", "poly"))
    p.add_argument("--patch_size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--kernel-backend", dest="kernel_backend",
                   choices=("auto", "triton", "cuda", "cpu", "reference"))
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    return p.parse_args(argv)


def apply_flags(cfg: dict, args: argparse.Namespace) -> None:
    """Set the config values given on the command line."""
    for flag, (section, key) in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            if flag == "labelnum" and not str(value).endswith("%"):
                value = int(value)
            cfg[section][key] = list(value) if isinstance(value, (list, tuple)) else value


def prepare_demo_data(cfg: dict) -> None:
    """Demo layout: default the root ($DYCON_DATA or data/demo) and generate the data on first use."""
    if cfg["data"]["layout"] != "demo":
        return
    if cfg["data"]["root"] is None:
        cfg["data"]["root"] = str(default_root())
    if not (Path(cfg["data"]["root"]) / "demo_version.txt").exists():
        ensure_demo_data(cfg["data"]["root"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there (not a run directory?)")
        cfg = merge_config(DEFAULTS, yaml.safe_load(cfg_path.read_text()), str(cfg_path))
    else:
        cfg = load_config(args.config)
    apply_flags(cfg, args)
    prepare_demo_data(cfg)
    check_config(cfg)
    if not args.resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.output or f"runs/{cfg['name']}-{cfg['train']['method']}-{stamp}")
        if (run_dir / "latest.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --output")
        run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    result = train(cfg, run_dir, resume=bool(args.resume))
    if args.test:
        result["test"] = test_run(cfg, run_dir)
    log.info("run directory: %s", run_dir)
    return result


if __name__ == "__main__":
    main()
