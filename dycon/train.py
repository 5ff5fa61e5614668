"""Train DyCON (or a baseline) with the Mean-Teacher loop of method.md section 3.

    python -m dycon.train                                  # the demo: synthetic data, CPU, minutes
    python -m dycon.train --config dycon/configs/brats19.yaml --root_path ../data/BraTS2019
    python -m dycon.train --config brats19 --method mean_teacher --labelnum 50 --device cuda
    python -m dycon.train --config brats19 --preset official      # the released code's quirks
    python -m dycon.train --resume runs/brats19-dycon-20250101-120000
    python -m dycon.train --config brats19 --amp bf16 --compile        # mixed precision, compiled step
    torchrun --nproc_per_node 4 -m dycon.train --config brats19 --output runs/brats19-4gpu

Everything a run needs is one plain dict (the YAML config, merged over DEFAULTS, with the
command-line flags applied); it is saved as ``config.yaml`` in the run directory together with
the log, ``metrics.csv``, TensorBoard scalars, and ``latest.pt`` / ``best.pt`` checkpoints.
Under ``torchrun`` the global batch is split between the processes (dycon/distributed.py) and the
run is the same as one process on the whole batch; only rank 0 writes.

All randomness of a step is keyed by the seed and the batch number (crops and augmentation by
the sampler, the teacher's noise by the volume's slot, dropout by the process), so a run resumed
from ``latest.pt`` continues exactly as if it had not stopped.

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
from dataclasses import dataclass
import time
from typing import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

import dycon_kernels
from dycon import distributed
from dycon.checkpoint import load_checkpoint, save_checkpoint
from dycon.data import PatchDataset, TwoStreamBatchSampler, labelled_split, list_cases
from dycon.demo import default_root, ensure_demo_data
from dycon.inference import segment
from dycon.metrics import dice
from dycon.networks import build_model, convert_sync_batchnorm
from dycon_kernels.presets import teacher_threshold_ramp

log = logging.getLogger("dycon.train")

CONFIG_DIR = Path(__file__).parent / "configs"
METHODS = ("supervised", "mean_teacher", "dycon")
PRESETS = ("dycon", "official")
AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Every key a config may set. A config file gives the data set's values; these fill the rest.
DEFAULTS = {
    "name": "run",
    "data": {"layout": None, "root": None, "labelnum": None, "holdout_val": 0, "cache": False},
    "model": {"arch": "unet3d", "in_channels": 1, "num_classes": 2, "base_filters": 16,
              "feature_scaler": 2, "embed_dim": 256,
              "dropout": None},           # None: the architecture's default (0.3 U-Net, 0.5 V-Net)
    "train": {
        "method": "dycon", "preset": "dycon", "patch_size": [96, 96, 96], "batch_size": 8, "labeled_bs": 4,
        "max_iterations": 20000, "base_lr": 0.01, "lr_schedule": "constant", "momentum": 0.9,
        "weight_decay": 1e-4, "ema_decay": 0.99, "l_weight": 1.0, "u_weight": 0.5,
        "consistency": 0.1, "consistency_rampup": 200.0, "grad_clip": 1.0, "seed": 1337,
        "num_workers": 0, "device": "auto", "kernel_backend": "auto", "log_every": 10,
        # latest.pt is also written at every validation; 0 = only then and at the end
        "checkpoint_every": 200,
        "amp": None,               # None, "bf16" or "fp16" (autocast; fp16 adds loss scaling)
        "compile": False,          # True (inductor) or a torch.compile backend name
        "deterministic": False,    # deterministic algorithms: bitwise-repeatable runs
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
    "val_every": ("val", "every"), "amp": ("train", "amp"), "compile": ("train", "compile"),
    "deterministic": ("train", "deterministic"), "checkpoint_every": ("train", "checkpoint_every"),
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
    if t["amp"] not in AMP_DTYPES:
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
    for key in ("layout", "root", "labelnum"):
        if cfg["data"][key] is None:
            raise ValueError(f"data.{key} is not set (config file or command line)")


def check_amp_device(t: dict, device: torch.device) -> None:
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
#
# Every loss is a ratio of sums over the batch. ``loss_sums`` returns this process's sums (the
# part that ``--compile`` compiles); ``compute_losses`` adds them over the processes
# (dycon.distributed) and forms the ratios, so that K processes give the loss of the global batch.

def dice_sums(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per foreground class: sum(p y), sum(y^2), sum(p^2) over the batch, shape ``(C-1, 3)``."""
    rows = []
    for c in range(1, num_classes):
        p, y = probs[:, c], (labels == c).float()
        rows.append(torch.stack([(p * y).sum(), (y * y).sum(), (p * p).sum()]))
    return torch.stack(rows)


def dice_loss(sums: torch.Tensor) -> torch.Tensor:
    """Mean over the foreground classes of 1 - (2 sum(p y) + 1e-5) / (sum(y^2) + sum(p^2) + 1e-5)."""
    inter, y2, p2 = sums.unbind(1)
    return (1 - (2 * inter + 1e-5) / (y2 + p2 + 1e-5)).mean()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed voxel cross-entropy. Written with gather rather than F.cross_entropy, whose CUDA
    kernel has no deterministic mode."""
    return -logits.log_softmax(1).gather(1, labels[:, None]).sum()


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
    confidence = F.avg_pool3d(teacher_probs.max(1).values[:, None].float(), block)[:, 0]
    labelled = torch.arange(len(patch), device=patch.device)[:, None, None, None] < labeled_bs
    unsure = (purity < loss_cfg["patch_purity"]) | (~labelled & (confidence < loss_cfg["teacher_confidence"]))
    return torch.where(unsure, -1, patch).flatten(1)


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


def _count(n, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(n, dtype=torch.float32, device=like.device)


def loss_sums(cfg: dict, image, labels, noise, student, teacher, labeled_bs: int, beta, threshold) -> dict:
    """This process's batch sums of every loss term: ``{term: tensor of sums}``.

    ``image``/``labels`` hold ``labeled_bs`` labelled volumes first; ``noise`` perturbs the
    teacher's input; ``beta`` (UnCL) and ``threshold`` (the official teacher threshold) are
    0-dim tensors so that a compiled version does not recompile when they change.
    """
    t, lcfg = cfg["train"], cfg["loss"]
    method, preset, lb = t["method"], t["preset"], labeled_bs
    logits, embeddings = student(image)
    sup_logits = logits[:lb].float()
    out = {"ce": torch.stack([cross_entropy_sum(sup_logits, labels[:lb]), _count(labels[:lb].numel(), image)]),
           "dice": dice_sums(sup_logits.softmax(1), labels[:lb], sup_logits.shape[1]).flatten()}
    if method == "supervised":
        return out

    with torch.no_grad():
        t_logits, t_embeddings = teacher(image + noise)

    if method == "mean_teacher" or preset == "official":
        # the released code applies softmax to probabilities here (softmax twice); the plain
        # Mean-Teacher baseline compares the probabilities themselves
        s_probs, t_probs = logits[lb:].float().softmax(1), t_logits[lb:].float().softmax(1)
        if method == "dycon":
            s_probs, t_probs = s_probs.softmax(1), t_probs.softmax(1)
        out["mse"] = torch.stack([((s_probs - t_probs) ** 2).sum(), _count(s_probs.numel(), image)])
    if method == "mean_teacher":
        return out

    backend = t["kernel_backend"]
    # the kernels take the autocast dtype as it comes and accumulate in float32; the per-voxel
    # and per-anchor maps are summed here in float32
    uncl_map = dycon_kernels.uncl(logits, t_logits, beta, reduction="none", backend=backend)
    out["uncl"] = torch.stack([uncl_map.float().sum(), _count(uncl_map.numel(), image)])
    grid = patch_grid(cfg)
    params = dict(temperature=lcfg["temp"], gamma_pos=lcfg["gamma"])
    if preset == "official":
        # the official threshold term is normalised within the batch it sees: with several
        # processes the loss is the mean of the per-process values
        patch = patch_labels_official(labels, grid)[lb:]
        value = dycon_kernels.fecl(embeddings[lb:], patch, t_embeddings[lb:], patch, preset="official",
                                   backend=backend, teacher_threshold=threshold, **params)
        out["fecl"] = torch.stack([value.float(), _count(1, image)])
    else:
        patch = patch_labels_dycon(labels, t_logits.float().softmax(1), lb, grid, lcfg)
        anchor_map = dycon_kernels.fecl(embeddings, patch, t_embeddings, patch,
                                        anchor_weight=anchor_weights(logits, grid), preset="dycon",
                                        backend=backend, gamma_neg=lcfg["gamma"], reduction="none", **params)
        out["fecl"] = torch.stack([anchor_map.float().sum(), (patch >= 0).sum().float()])
    return out


def combine_sums(sums: dict, ctx: distributed.Context) -> dict:
    """Add every term's sums over the processes with one collective."""
    names = list(sums)
    flat = distributed.sum_over_ranks(torch.cat([sums[n].float().flatten() for n in names]), ctx)
    return dict(zip(names, flat.split([sums[n].numel() for n in names])))


def compute_losses(cfg: dict, batch: dict, models: "Models", step: int, epoch: int, n_epochs: int,
                   number: int) -> dict:
    """All loss terms of iteration ``step`` (global batch ``number``); ``total`` is what gets
    back-propagated. The terms are the same on every process."""
    t, ctx = cfg["train"], models.ctx
    image, labels = batch["image"], batch["label"]
    lb = t["labeled_bs"] // ctx.world_size
    beta = beta_at(epoch, n_epochs, cfg["loss"])
    threshold = teacher_threshold_ramp(epoch)
    noise = teacher_noise(image, t["seed"], number, models.slots) if t["method"] != "supervised" else None
    with torch.autocast(image.device.type, dtype=AMP_DTYPES[t["amp"]], enabled=t["amp"] is not None):
        sums = models.loss_sums(cfg, image, labels, noise, models.student, models.teacher, lb,
                                torch.tensor(beta, dtype=torch.float64), torch.tensor(threshold, dtype=torch.float64))
    s = combine_sums(sums, ctx)
    out = {"sup": s["ce"][0] / s["ce"][1] + dice_loss(s["dice"].view(-1, 3))}
    out["total"] = t["l_weight"] * out["sup"]
    if "mse" in s:
        out["mse"] = s["mse"][0] / s["mse"][1]
        out["total"] = out["total"] + consistency_weight(step, t) * out["mse"]
    if "uncl" in s:
        out["uncl"] = s["uncl"][0] / s["uncl"][1]
        out["fecl"] = s["fecl"][0] / s["fecl"][1].clamp_min(1)   # as FeCL's reduction='mean'
        out["beta"] = beta
        out["total"] = out["total"] + t["u_weight"] * (out["fecl"] + out["uncl"])
    return out


def derived_seed(*key: int) -> int:
    """A 63-bit seed that depends on every part of ``key`` (NumPy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> 1)


def teacher_noise(image: torch.Tensor, seed: int, number: int, slots: list[int]) -> torch.Tensor:
    """The teacher's input noise, clamp(0.1 N(0, 1), -0.2, 0.2), drawn per volume from a generator
    keyed by the volume's slot in global batch ``number``: the same whatever the process count."""
    noise = torch.empty_like(image)
    for i, slot in enumerate(slots):
        g = torch.Generator(image.device).manual_seed(derived_seed(seed, 3, number, slot))
        noise[i] = torch.randn(image.shape[1:], generator=g, device=image.device, dtype=image.dtype)
    return torch.clamp(noise * 0.1, -0.2, 0.2)


@torch.no_grad()
def ema_update(teacher, student, decay: float, step: int) -> None:
    """teacher = alpha teacher + (1 - alpha) student, alpha = min(1 - 1/(step+1), decay); buffers copied."""
    alpha = min(1.0 - 1.0 / (step + 1), decay)
    for tp, sp in zip(teacher.parameters(), student.parameters()):
        tp.mul_(alpha).add_(sp, alpha=1.0 - alpha)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)


# ----------------------------------------------------------------------------------- the run

def pick_device(name: str, ctx: distributed.Context = distributed.Context()) -> torch.device:
    """``auto`` is the GPU when there is one; with several processes, each takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and ctx.distributed:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)   # NCCL and DDP use the current device
    return device


def setup_logging(run_dir: Path, ctx: distributed.Context) -> None:
    """Log to train.log and the console from the main process; other processes report only problems."""
    class TqdmHandler(logging.Handler):   # prints above the progress bar instead of through it
        def emit(self, record):
            tqdm.write(self.format(record))

    log.handlers.clear()
    log.propagate = False
    console = TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s" if ctx.is_main else f"[rank {ctx.rank}] %(message)s"))
    log.addHandler(console)
    if not ctx.is_main:
        log.setLevel(logging.WARNING)
        return
    log.setLevel(logging.INFO)
    file_handler = logging.FileHandler(run_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_handler)


def set_determinism(deterministic: bool) -> None:
    """``--deterministic``: deterministic algorithms everywhere (PyTorch raises on an op that
    has none; so do our kernels, see docs/fecl_kernels.md)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS reads it at first use
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


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


class NoMetrics:
    """What processes other than the main one log: nothing."""
    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def validate(model, cases, cfg: dict, device, ctx: distributed.Context) -> float:
    """Mean foreground Dice of the validation cases (sliding-window inference), the cases shared
    out between the processes."""
    scores = []
    for case in cases[ctx.rank::ctx.world_size]:
        volume = case.load(cfg["model"]["num_classes"])
        pred = segment(model, volume.image, cfg["train"]["patch_size"], cfg["val"]["stride_xy"],
                       cfg["val"]["stride_z"], cfg["model"]["num_classes"],
                       cfg["test"]["largest_component"], device)
        scores += [dice(pred == c, volume.label == c) for c in range(1, cfg["model"]["num_classes"])]
    total, count = distributed.sum_values([float(np.sum(scores)), float(len(scores))], ctx)
    return total / count


@dataclass
class Models:
    """What one training step needs besides the batch."""
    ctx: distributed.Context
    student: torch.nn.Module        # DistributedDataParallel-wrapped with several processes
    teacher: torch.nn.Module
    loss_sums: Callable             # ``loss_sums``, compiled under --compile
    slots: list[int]                # this process's positions in the global batch


def build_models(cfg: dict, device, ctx: distributed.Context) -> tuple[torch.nn.Module, Models]:
    """The student (returned bare, for the optimiser, EMA and checkpoints) and the step's view of it."""
    t = cfg["train"]
    student = build_model(cfg["model"])
    if ctx.distributed:
        student = convert_sync_batchnorm(student)   # batch statistics of the global batch
    student = student.to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train()
    teacher.train()   # as released: dropout and batch statistics in the teacher too
    stepped = student
    if ctx.distributed:
        # supervised and mean_teacher leave the projection head out of the loss
        stepped = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=t["method"] != "dycon")
    sums = loss_sums
    if t["compile"]:
        # one graph per step: our kernels are custom ops that compile without a break; with
        # several processes DistributedDataParallel's forward (its logging) breaks the graph
        sums = torch.compile(loss_sums, fullgraph=not ctx.distributed,
                             backend=t["compile"] if isinstance(t["compile"], str) else "inductor")
    slots = distributed.global_slots(t["batch_size"], t["labeled_bs"], ctx)
    return student, Models(ctx, stepped, teacher, sums, slots)


def train(cfg: dict, run_dir: Path, resume: bool = False, stop_after: int | None = None) -> dict:
    """Run (or continue) training; returns ``{"step", "best_dice", "skipped", "seconds"}``.

    ``stop_after`` ends this call after that many optimiser steps in total, saving
    ``latest.pt`` so that ``resume=True`` continues the same run (e.g. on a time-limited queue).
    Under ``torchrun`` every process calls this; only the main one writes to ``run_dir``.
    """
    t = cfg["train"]
    ctx = distributed.init(pick_device(t["device"]).type)
    try:
        return _train(cfg, run_dir, resume, stop_after, ctx, pick_device(t["device"], ctx))
    finally:
        distributed.shutdown(ctx)


def _train(cfg, run_dir: Path, resume: bool, stop_after, ctx: distributed.Context, device) -> dict:
    t = cfg["train"]
    distributed.check_divisible(ctx, t["batch_size"], t["labeled_bs"])
    check_amp_device(t, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, ctx)
    set_determinism(t["deterministic"])
    torch.manual_seed(t["seed"])   # the initial weights; the same on every process

    train_cases = list_cases(cfg["data"], "train")
    labelnum = resolve_labelnum(cfg["data"]["labelnum"], len(train_cases))
    labeled, unlabeled = labelled_split(len(train_cases), labelnum)
    supervised = t["method"] == "supervised"
    sampler = TwoStreamBatchSampler(labeled, [] if supervised else unlabeled, t["labeled_bs"],
                                    0 if supervised else t["batch_size"] - t["labeled_bs"], seed=t["seed"])
    dataset = PatchDataset(train_cases, t["patch_size"], augment=True, cache=cfg["data"]["cache"],
                           num_classes=cfg["model"]["num_classes"])
    loader = DataLoader(dataset, batch_sampler=distributed.ShardedBatchSampler(sampler, t["labeled_bs"], ctx),
                        num_workers=t["num_workers"], pin_memory=device.type == "cuda")
    val_cases = list_cases(cfg["data"], "val") if cfg["val"]["every"] else []

    student, models = build_models(cfg, device, ctx)
    optimizer = torch.optim.SGD(student.parameters(), lr=t["base_lr"], momentum=t["momentum"],
                                weight_decay=t["weight_decay"])
    # fp16 needs loss scaling; bf16 has float32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=t["amp"] == "fp16")

    step = batches = skipped = 0
    best_dice, best_step = -1.0, 0
    if resume:
        ckpt = load_checkpoint(run_dir / "latest.pt", map_location=device)
        student.load_state_dict(ckpt["student"])
        models.teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["grad_scaler"]:   # empty when saved without fp16
            scaler.load_state_dict(ckpt["grad_scaler"])
        step, batches, skipped = ckpt["step"], ckpt["sampler"]["batches"], ckpt["skipped_steps"]
        best_dice, best_step = ckpt["best_dice"], ckpt["best_step"]
        sampler.load_state_dict(ckpt["sampler"])
        log.info("resumed %s at step %d (best Dice %.4f at step %d)", run_dir, step, best_dice, best_step)
    metrics = MetricsLog(run_dir, step if resume else 0) if ctx.is_main else NoMetrics()

    n_epochs = t["max_iterations"] // len(sampler) + 1
    if t["preset"] == "official" and t["method"] == "dycon":
        log.warning("preset 'official': FeCL patch labels of the UNLABELLED volumes come from their ground "
                    "truth, as in the released code (label leakage); results are not semi-supervised")
    log.info("%d training cases (%d labelled, %d unlabelled), %d validation; %d batches per epoch; "
             "device %s x %d process(es); %.2fM parameters; amp %s; compile %s; deterministic %s",
             len(train_cases), labelnum, len(unlabeled), len(val_cases), len(sampler), device, ctx.world_size,
             sum(p.numel() for p in student.parameters()) / 1e6, t["amp"], t["compile"], t["deterministic"])

    def state() -> dict:
        return {"student": student.state_dict(), "teacher": models.teacher.state_dict(),
                "optimizer": optimizer.state_dict(), "grad_scaler": scaler.state_dict(), "step": step,
                "config": cfg, "best_dice": best_dice, "best_step": best_step, "skipped_steps": skipped,
                # workers prefetch ahead of the loop: what counts is what the loop consumed
                "sampler": {**sampler.state_dict(), "batches": batches}}

    def checkpoint(name: str) -> None:
        if ctx.is_main:
            save_checkpoint(run_dir / name, state())

    start, last_stats = time.time(), {}
    bar = tqdm(total=t["max_iterations"], initial=step, desc=cfg["name"], dynamic_ncols=True,
               disable=not ctx.is_main)
    data_iter = iter(loader)
    while step < t["max_iterations"] and (stop_after is None or step < stop_after):
        try:
            batch = next(data_iter)
        except StopIteration:   # end of an epoch (one pass over the labelled list)
            data_iter = iter(loader)
            continue
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        number, epoch = batches, batches // len(sampler)
        batches += 1
        # dropout draws from the global generator: seed it from the batch number, so that a
        # resumed run draws what the uninterrupted one did
        torch.manual_seed(derived_seed(t["seed"], 4, number, ctx.rank))
        lr = learning_rate(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr

        losses = compute_losses(cfg, batch, models, step, epoch, n_epochs, number)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(losses["total"]):   # the same on every process: all skip together
            skipped += 1
            log.warning("step %d: non-finite loss %s, batch skipped (%d so far)", step,
                        {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}, skipped)
            continue
        scaler.scale(losses["total"]).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), t["grad_clip"])
        if not torch.isfinite(grad_norm):
            scaler.update()   # fp16: a smaller loss scale next time
            skipped += 1
            log.warning("step %d: non-finite gradient norm, batch skipped (%d so far)", step, skipped)
            continue
        scaler.step(optimizer)
        scaler.update()
        ema_update(models.teacher, student, t["ema_decay"], step)
        step += 1
        bar.update(1)

        last_stats = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}
        if step % t["log_every"] == 0 or step == t["max_iterations"]:
            bar.set_postfix(loss=f"{last_stats['total']:.3f}", best=f"{max(best_dice, 0):.3f}")
            metrics.write({"step": step, "epoch": epoch, "lr": lr, "skipped": skipped, **last_stats})
        if cfg["val"]["every"] and (step % cfg["val"]["every"] == 0 or step == t["max_iterations"]):
            val_dice = validate(student, val_cases, cfg, device, ctx)
            metrics.write({"step": step, "epoch": epoch, "val_dice": val_dice})
            if val_dice > best_dice:
                best_dice, best_step = val_dice, step
                checkpoint("best.pt")
            log.info("step %d: loss %.4f  val Dice %.4f  (best %.4f at step %d)", step, last_stats["total"],
                     val_dice, best_dice, best_step)
            checkpoint("latest.pt")
        elif t["checkpoint_every"] and step % t["checkpoint_every"] == 0:
            checkpoint("latest.pt")
    bar.close()
    checkpoint("latest.pt")
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
                 "val_every", "num_workers", "checkpoint_every"):
        p.add_argument(f"--{flag}", type=int)
    for flag in ("base_lr", "ema_decay", "temp", "gamma", "beta_min", "beta_max", "s_beta"):
        p.add_argument(f"--{flag}", type=float)
    p.add_argument("--lr_schedule", choices=("constant", "poly"))
    p.add_argument("--patch_size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--kernel-backend", dest="kernel_backend",
                   choices=("auto", "triton", "cuda", "cpu", "reference"))
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ... (under torchrun: GPU LOCAL_RANK)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (autocast; fp16 with loss scaling)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms only: two runs give bitwise-identical losses")
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
    is_main = int(os.environ.get("RANK", "0")) == 0   # under torchrun, only rank 0 writes
    if not (args.resume or args.output) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("several processes need the run directory named: give --output RUN_DIR "
                         "(each process would otherwise make its own time-stamped one)")
    if not args.resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.output or f"runs/{cfg['name']}-{cfg['train']['method']}-{stamp}")
        if (run_dir / "latest.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --output")
        run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    result = train(cfg, run_dir, resume=bool(args.resume))
    if args.test and is_main:
        result["test"] = test_run(cfg, run_dir)
    log.info("run directory: %s", run_dir)
    return result


if __name__ == "__main__":
    main()
