"""The training loop, written once for every framework and method: data, optimiser, the step,
validation, logging (train.log, metrics.csv, TensorBoard), checkpoints and exact resume.

Everything a run needs is one plain dict (dycon/config.py); it is saved as ``config.yaml`` in the
run directory together with the log, ``metrics.csv``, TensorBoard scalars (and, at each
validation, the uncertainty images of the first validation case, dycon/viz.py), ``curves.png``
(drawn at the end of every training call), and ``latest.pt`` / ``best.pt`` checkpoints. Under
``torchrun`` the global batch is split between the processes (dycon/distributed.py) and the run
is the same as one process on the whole batch; only rank 0 writes.

All randomness of a step is keyed by the seed and the batch number (crops and augmentation by
the sampler, the teacher's noise by the volume's slot, dropout by the process), so a run resumed
from ``latest.pt`` continues exactly as if it had not stopped.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from dycon import distributed, frameworks, preprocess, viz
from dycon.checkpoint import load_checkpoint, save_checkpoint
from dycon.config import check_amp_device
from dycon.data import list_cases, scored_voxels
from dycon.batches import PatchDataset, TwoStreamBatchSampler, training_label
from dycon.inference import segment, sliding_window_inference
from dycon.losses import dice_loss, patch_labels_dycon
from dycon.metrics import dice
from dycon.networks import build_model
from dycon.schedules import beta_at, learning_rate, ramp_lengths, summary as schedule_summary, uamt_threshold
import dycon_kernels
from dycon_kernels import backends
from dycon_kernels._build import source_commit
from dycon_kernels.presets import teacher_threshold_ramp

log = logging.getLogger("dycon.train")


# ----------------------------------------------------------------------------------- the step

def combine_sums(sums: dict, ctx: distributed.Context) -> dict:
    """Add every term's sums over the processes with one collective."""
    names = list(sums)
    flat = distributed.sum_over_ranks(torch.cat([sums[n].float().flatten() for n in names]), ctx)
    return dict(zip(names, flat.split([sums[n].numel() for n in names])))


def compute_losses(cfg: dict, batch: dict, framework, step: int, epoch: int, n_epochs: int, number: int) -> dict:
    """All loss terms of iteration ``step`` (global batch ``number``); ``total`` is what gets
    back-propagated, ``weighted`` the weighted supervised (``sup``) and unsupervised terms by name.
    The terms are the same on every process."""
    t, ctx = cfg["train"], framework.ctx
    lb = t["labeled_bs"] // ctx.world_size
    beta = beta_at(epoch, n_epochs, cfg["loss"], step, ramp_lengths(cfg)["beta"])
    values = {"beta": beta, "threshold": teacher_threshold_ramp(epoch), "uamt_threshold": uamt_threshold(step, cfg)}
    scalars = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
    s = combine_sums(framework.sums(batch["image"], batch["label"], lb, number, scalars), ctx)
    out = {}
    for suffix in ("", "_b"):   # co-training: the second student's terms end in _b
        if f"ce{suffix}" in s:
            ce, dice_rows = s.pop(f"ce{suffix}"), s.pop(f"dice{suffix}")
            out[f"sup{suffix}"] = ce[0] / ce[1] + dice_loss(dice_rows.view(-1, 3))
        if f"fecl_anchors{suffix}" in s:   # diagnostics, not losses
            out[f"anchors{suffix}"], out[f"lesion_anchors{suffix}"] = s.pop(f"fecl_anchors{suffix}").tolist()
    # every other term is a ratio; FeCL's count of valid anchors may be 0 (as its reduction='mean')
    terms = {name: v[0] / v[1].clamp_min(1) for name, v in s.items()}
    out.update(terms)
    if "uncl" in terms:
        out["beta"] = beta
    supervised = t["l_weight"] * (out["sup"] + out["sup_b"] if "sup_b" in out else out["sup"])
    weighted = framework.weighted(terms, step)
    out["total"] = sum(weighted.values(), supervised)
    out["weighted"] = {"sup": supervised, **weighted}
    return out


def gradient_ratios(weighted: dict, parameters: list) -> dict:
    """Per unsupervised term, the norm of its weighted gradient over the trained parameters divided
    by that of the weighted supervised loss (``grad_ratio_<term>``): a term the schedule has
    effectively switched off shows as ~0. One extra backward per term: only on logged steps."""
    def norm(value):
        grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads if g is not None]))

    supervised = norm(weighted["sup"])
    return {f"grad_ratio_{name}": float(norm(value) / supervised) if value.requires_grad else 0.0
            for name, value in weighted.items() if name != "sup"}


def clip_norm(t: dict) -> float:
    """The gradient-norm bound of the method (0: no clipping): ``train.grad_clip``, or the
    reference's: 1.0 for DyCON (the released code clips), none for MT, UA-MT, CPS and supervised
    (SSL4MIS and UA-MT do not clip)."""
    if t["grad_clip"] is not None:
        return float(t["grad_clip"])
    return 1.0 if t["method"] == "dycon" else 0.0


def clip_gradients(networks: list, max_norm: float) -> tuple[torch.Tensor, bool]:
    """Each network's gradient norm (co-training: each student on its own, as two optimisers would
    be), clipped to ``max_norm`` when it is > 0; returns the largest norm and whether any was clipped."""
    limit = max_norm if max_norm > 0 else float("inf")   # inf: measure the norm, scale nothing
    largest = torch.stack([torch.nn.utils.clip_grad_norm_(net.parameters(), limit) for net in networks]).max()
    return largest, bool(largest > limit)


# ------------------------------------------------------------------------------ the run's parts

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


def log_kernels(cfg: dict, run_dir: Path, device: torch.device, ctx: distributed.Context) -> None:
    """Say which code trains (its git commit) and per op which backend the kernels use and why
    (an explicit one that cannot run fails here, not at the first step); record both as ``code``
    and ``kernels`` in the run's config.yaml."""
    code = {"dycon": dycon_kernels.__version__, "commit": source_commit()}
    log.info("code: dycon %s, commit %s", code["dycon"], code["commit"])
    info = backends.report(device, cfg["train"]["kernel_backend"])
    for line in backends.report_lines(info):
        log.info("%s", line)
    config = run_dir / "config.yaml"
    if ctx.is_main and config.is_file():   # written by the command line (dycon.train)
        saved = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**saved, "code": code, "kernels": info}, sort_keys=False))


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
    FIELDS = ["step", "epoch", "lr", "beta", "total", "sup", "mse", "uncl", "fecl", "val_dice", "skipped",
              "uncl_mse", "anchors", "lesion_anchors", "val_patch_precision", "val_patch_recall",
              # co-training: the cross pseudo-label term and the second student's terms
              "cps", "sup_b", "mse_b", "uncl_b", "uncl_mse_b", "fecl_b", "anchors_b", "lesion_anchors_b",
              # the gradient norm before clipping (largest network), whether it was clipped, and per
              # unsupervised term its gradient norm / the supervised one (logged steps)
              "grad_norm", "clipped", *(f"grad_ratio_{n}" for n in (
                  "mse", "uncl", "uncl_mse", "fecl", "cps", "uncl_b", "uncl_mse_b", "fecl_b"))]

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
                self.tb.add_scalar(f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}", value, row["step"])

    def images(self, images: dict, step: int) -> None:
        for name, rgb in images.items():
            self.tb.add_image(f"val_images/{name}", rgb, step, dataformats="HWC")

    def close(self) -> None:
        self.tb.close()


class NoMetrics:
    """What processes other than the main one log: nothing."""
    def write(self, row: dict) -> None:
        pass

    def images(self, images: dict, step: int) -> None:
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
                       cfg["val"]["largest_component"], device)
        scored = scored_voxels(volume)
        scored = True if scored is None else scored
        scores += [dice((pred == c) & scored, volume.label == c) for c in range(1, cfg["model"]["num_classes"])]
    total, count = distributed.sum_values([float(np.sum(scores)), float(len(scores))], ctx)
    return total / count


def patch_label_quality(model, cases, cfg: dict, device, ctx: distributed.Context) -> tuple[float, float]:
    """Precision and recall of the lesion patch labels that FeCL (dycon preset) would take from
    ``model``'s predictions on the validation cases, against the patch labels of their ground
    truth (same purity rule): what FeCL's pseudo-labels are worth. NaN when there is nothing to
    count. Each volume is cut to whole patches of ``16 / feature_scaler`` voxels."""
    block, num_classes = 16 // cfg["model"]["feature_scaler"], cfg["model"]["num_classes"]
    counts = np.zeros(3)   # true positives, predicted lesion patches, true lesion patches
    for case in cases[ctx.rank::ctx.world_size]:
        volume = case.load(num_classes)
        image = torch.from_numpy(np.ascontiguousarray(volume.image, dtype=np.float32))[None].to(device)
        probs = sliding_window_inference(model, image, cfg["train"]["patch_size"], cfg["val"]["stride_xy"],
                                         cfg["val"]["stride_z"], num_classes)
        grid = [s // block for s in volume.label.shape]
        if 0 in grid:
            continue
        cut = tuple(slice(0, g * block) for g in grid)
        label = training_label(volume.label[cut], getattr(volume, "ignore_label", None)).to(device)[None]
        pseudo = patch_labels_dycon(label, probs[(slice(None),) + cut][None], 0, grid, cfg["loss"])
        truth = patch_labels_dycon(label, torch.ones(1, num_classes, *label.shape[1:], device=device), 1, grid,
                                   cfg["loss"])
        counts += [float(((pseudo >= 1) & (pseudo == truth)).sum()), float((pseudo >= 1).sum()),
                   float((truth >= 1).sum())]
    tp, predicted, actual = distributed.sum_values(counts.tolist(), ctx)
    return (tp / predicted if predicted else float("nan")), (tp / actual if actual else float("nan"))


# ----------------------------------------------------------------------------------- the run

def train(cfg: dict, run_dir: Path, resume: bool = False, stop_after: int | None = None,
          threads_note: str | None = None) -> dict:
    """Run (or continue) training; returns ``{"step", "best_dice", "skipped", "seconds"}``.

    ``stop_after`` ends this call after that many optimiser steps in total, saving
    ``latest.pt`` so that ``resume=True`` continues the same run (e.g. on a time-limited queue).
    Under ``torchrun`` every process calls this; only the main one writes to ``run_dir``.
    ``threads_note`` is the log line that says how many torch threads the run takes and why.
    """
    t = cfg["train"]
    ctx = distributed.init(pick_device(t["device"]).type)
    try:
        return _train(cfg, run_dir, resume, stop_after, ctx, pick_device(t["device"], ctx), threads_note)
    finally:
        distributed.shutdown(ctx)


def _train(cfg, run_dir: Path, resume: bool, stop_after, ctx: distributed.Context, device,
           threads_note: str | None = None) -> dict:
    t = cfg["train"]
    distributed.check_divisible(ctx, t["batch_size"], t["labeled_bs"])
    check_amp_device(t, device)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, ctx)
    set_determinism(t["deterministic"])
    if t["threads"]:
        torch.set_num_threads(t["threads"])
    # once, with the reason dycon.train chose the count for (cli.choose_threads)
    log.info("%s", threads_note or f"torch threads: {torch.get_num_threads()}"
             + ("" if t["threads"] else " (torch's setting)"))
    torch.manual_seed(t["seed"])   # the initial weights; the same on every process

    # with the unlabelled pool; splits.json and the preprocessing plan recorded in the run
    train_cases, labeled, unlabeled = preprocess.training_data(cfg, run_dir if ctx.is_main else None)
    labelnum = len(labeled)
    supervised = t["method"] == "supervised"
    sampler = TwoStreamBatchSampler(labeled, [] if supervised else unlabeled, t["labeled_bs"],
                                    0 if supervised else t["batch_size"] - t["labeled_bs"], seed=t["seed"])
    dataset = PatchDataset(train_cases, t["patch_size"], augment=True, cache=cfg["data"]["cache"],
                           num_classes=cfg["model"]["num_classes"])
    loader = DataLoader(dataset, batch_sampler=distributed.ShardedBatchSampler(sampler, t["labeled_bs"], ctx),
                        num_workers=t["num_workers"], pin_memory=device.type == "cuda")
    val_cases = preprocess.wrap(list_cases(cfg["data"], "val"), cfg["data"]) if cfg["val"]["every"] else []
    # the case whose uncertainty images TensorBoard shows at every validation (dycon.viz)
    pictured = val_cases[0].load(cfg["model"]["num_classes"]) if val_cases and ctx.is_main else None

    framework = frameworks.build(cfg, device, ctx)
    optimizer = torch.optim.SGD(framework.parameters(), lr=t["base_lr"], momentum=t["momentum"],
                                weight_decay=t["weight_decay"])
    # fp16 needs loss scaling; bf16 has float32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=t["amp"] == "fp16")

    step = batches = skipped = 0
    best_dice, best_step = -1.0, 0
    if resume:
        ckpt = load_checkpoint(run_dir / "latest.pt", map_location=device)
        framework.load_state_dict(ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["grad_scaler"]:   # empty when saved without fp16
            scaler.load_state_dict(ckpt["grad_scaler"])
        step, batches, skipped = ckpt["step"], ckpt["sampler"]["batches"], ckpt["skipped_steps"]
        best_dice, best_step = ckpt["best_dice"], ckpt["best_step"]
        sampler.load_state_dict(ckpt["sampler"])
        log.info("resumed %s at step %d (best Dice %.4f at step %d)", run_dir, step, best_dice, best_step)
    metrics = MetricsLog(run_dir, step if resume else 0) if ctx.is_main else NoMetrics()

    n_epochs = t["max_iterations"] // len(sampler) + 1
    # the dycon preset's FeCL labels the unlabelled patches from predictions: measure them at validation
    fecl_pseudo_labels = t["method"] == "dycon" and t["preset"] == "dycon" and cfg["loss"]["fecl_weight"] > 0
    if t["preset"] == "official" and t["method"] == "dycon":
        log.warning("preset 'official': FeCL patch labels of the UNLABELLED volumes come from their ground "
                    "truth, as in the released code (label leakage); results are not semi-supervised")
    log.info("%s framework, method %s; %d training cases (%d labelled, %d unlabelled), %d validation; "
             "%d batches per epoch; device %s x %d process(es); %.2fM parameters; amp %s; compile %s; "
             "deterministic %s", t["framework"], t["method"], len(train_cases), labelnum, len(unlabeled),
             len(val_cases), len(sampler), device, ctx.world_size,
             sum(p.numel() for p in framework.student.parameters()) / 1e6, t["amp"], t["compile"],
             t["deterministic"])
    log_kernels(cfg, run_dir, device, ctx)
    lines, warnings = schedule_summary(cfg)
    for line in lines:
        log.info("%s", line)
    for warning in warnings:
        log.warning("%s", warning)
    max_norm = clip_norm(t)
    log.info("gradient clipping: %s", f"norm {max_norm:g}" + (" per network" if t["framework"] == "co_training" else "")
             if max_norm > 0 else "off")
    # the gradient-norm ratios take one backward per term; they are not measured under
    # DistributedDataParallel (its reducer expects one backward per forward) nor under
    # torch.compile (there, the extra backwards through the compiled graph left the step's own
    # gradients wrong: 0.63 instead of 16.4 before clipping, tests/test_train_scale.py)
    measure_ratios = not ctx.distributed and not t["compile"]
    if not measure_ratios:
        log.info("gradient-norm ratios of the unsupervised terms: not measured (%s)",
                 "torchrun" if ctx.distributed else "torch.compile")
    if cfg["data"]["label_seed"] is not None:
        log.info("labelled cases (label_seed %s): %s", cfg["data"]["label_seed"],
                 " ".join(train_cases[i].id for i in labeled))

    def state() -> dict:
        return {**framework.state_dict(), "optimizer": optimizer.state_dict(), "grad_scaler": scaler.state_dict(),
                "step": step, "config": cfg, "best_dice": best_dice, "best_step": best_step,
                "skipped_steps": skipped,
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
        torch.manual_seed(distributed.derived_seed(t["seed"], 4, number, ctx.rank))
        lr = learning_rate(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr

        losses = compute_losses(cfg, batch, framework, step, epoch, n_epochs, number)
        weighted = losses.pop("weighted")
        logged = (step + 1) % t["log_every"] == 0 or step + 1 == t["max_iterations"]
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(losses["total"]):   # the same on every process: all skip together
            skipped += 1
            log.warning("step %d: non-finite loss %s, batch skipped (%d so far)", step,
                        {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}, skipped)
            continue
        ratios = gradient_ratios(weighted, [p for p in framework.parameters() if p.requires_grad]) \
            if logged and measure_ratios and len(weighted) > 1 else {}
        scaler.scale(losses["total"]).backward()
        scaler.unscale_(optimizer)
        grad_norm, clipped = clip_gradients(framework.networks(), max_norm)
        if not torch.isfinite(grad_norm):
            scaler.update()   # fp16: a smaller loss scale next time
            skipped += 1
            log.warning("step %d: non-finite gradient norm, batch skipped (%d so far)", step, skipped)
            continue
        scaler.step(optimizer)
        scaler.update()
        framework.after_step(step)
        step += 1
        bar.update(1)

        last_stats = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}
        last_stats.update(ratios, grad_norm=float(grad_norm), clipped=int(clipped))
        if step % t["log_every"] == 0 or step == t["max_iterations"]:
            bar.set_postfix(loss=f"{last_stats['total']:.3f}", best=f"{max(best_dice, 0):.3f}")
            metrics.write({"step": step, "epoch": epoch, "lr": lr, "skipped": skipped, **last_stats})
        if cfg["val"]["every"] and (step % cfg["val"]["every"] == 0 or step == t["max_iterations"]):
            val_dice = validate(framework.student, val_cases, cfg, device, ctx)
            row, quality = {"step": step, "epoch": epoch, "val_dice": val_dice}, ""
            if fecl_pseudo_labels:
                row["val_patch_precision"], row["val_patch_recall"] = patch_label_quality(
                    framework.labeler, val_cases, cfg, device, ctx)
                quality = "  FeCL: last batch %d anchors (%d lesion); validation pseudo-label patches: " \
                          "precision %.3f recall %.3f" % (last_stats["anchors"], last_stats["lesion_anchors"],
                                                          row["val_patch_precision"], row["val_patch_recall"])
            metrics.write(row)
            if pictured is not None:
                teacher = framework.labeler if framework.objective.uses_teacher else None
                metrics.images(viz.validation_images(framework.student, teacher, pictured, cfg,
                                                     last_stats.get("beta"), device), step)
            if val_dice > best_dice:
                best_dice, best_step = val_dice, step
                checkpoint("best.pt")
            bar.set_postfix(loss=f"{last_stats['total']:.3f}", best=f"{best_dice:.3f}")   # not one log step late
            log.info("step %d: loss %.4f  val Dice %.4f  (best %.4f at step %d)%s", step, last_stats["total"],
                     val_dice, best_dice, best_step, quality)
            checkpoint("latest.pt")
        elif t["checkpoint_every"] and step % t["checkpoint_every"] == 0:
            checkpoint("latest.pt")
    bar.close()
    checkpoint("latest.pt")
    metrics.close()
    if ctx.is_main:
        viz.write_curves(run_dir)
    seconds = time.time() - start
    log.info("stopped at step %d after %.0f s (%d non-finite steps skipped)", step, seconds, skipped)
    return {"step": step, "best_dice": best_dice, "best_step": best_step, "skipped": skipped, "seconds": seconds}


def test_run(cfg: dict, run_dir: Path) -> dict:
    """Evaluate the run's best checkpoint (the latest without validation, or with ``test.checkpoint:
    last``) on the test list; the report is the one ``python -m dycon.evaluate --run RUN_DIR`` writes
    (same folder and files)."""
    from dycon.evaluate import DEFAULT_SNAPSHOTS, evaluate_cases, format_table, report_dir, write_report

    best = cfg["test"]["checkpoint"] == "best" and (run_dir / "best.pt").exists()
    name = "best.pt" if best else "latest.pt"
    device = pick_device(cfg["train"]["device"])
    model = build_model(cfg["model"]).to(device)
    model.load_state_dict(load_checkpoint(run_dir / name, map_location=device)["student"])
    eval_cfg = {**{k: v for k, v in cfg["test"].items() if k != "checkpoint"}, "patch_size": cfg["train"]["patch_size"], "num_classes": cfg["model"]["num_classes"],
                "preprocessing": cfg["data"]["preprocessing"]}
    out = report_dir(run_dir, "test", "student")
    snapshots = viz.Snapshots(out / "snapshots", DEFAULT_SNAPSHOTS, eval_cfg["units"])
    rows, summary = evaluate_cases(model, list_cases(cfg["data"], "test"), eval_cfg, on_case=snapshots)
    snapshots.finish()
    summary.update(checkpoint=str(run_dir / name), weights="student", split="test")
    write_report(rows, summary, out)
    log.info("test set (report in %s):\n%s", out, format_table(summary))
    return summary
