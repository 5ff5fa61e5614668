"""One objective per method: what it adds to the supervised loss of a step.

A framework (dycon/frameworks) runs the networks and the supervised CE + Dice; the method's
objective turns the student's and the teacher's outputs on the batch into the sums of its
unsupervised terms (``sums``), and weighs their ratios into the loss (``weighted``).

- ``supervised``: nothing.
- ``mean_teacher``: MSE between student and teacher softmax on the unlabelled volumes,
  weighted by the consistency ramp-up.
- ``dycon``: UnCL on the whole batch (beta from the schedule) and FeCL on the patch embeddings
  (``dycon`` preset: patch labels from ground truth and teacher, anchors weighted by u = 1 + H;
  ``official``: the released code's labels from ground truth, plus its softmax-twice MSE).
"""
from __future__ import annotations

import torch

import dycon_kernels
from dycon import losses
from dycon.schedules import consistency_weight


class Objective:
    """The supervised baseline: no unsupervised term, no teacher."""
    uses_teacher = False

    def sums(self, cfg: dict, student_out, teacher_out, labels, labeled_bs: int, beta, threshold) -> dict:
        """This process's sums of the method's terms. ``*_out`` are the networks' ``(logits,
        embeddings)`` on the whole batch (labelled volumes first); ``beta`` and ``threshold`` are
        0-dim tensors (a compiled step does not recompile when they change)."""
        return {}

    def weighted(self, cfg: dict, terms: dict, step: int) -> list:
        """The method's weighted terms, added in this order to the supervised loss."""
        return []


class MeanTeacher(Objective):
    uses_teacher = True

    def sums(self, cfg, student_out, teacher_out, labels, labeled_bs, beta, threshold):
        return {"mse": losses.mse_sums(student_out[0][labeled_bs:], teacher_out[0][labeled_bs:])}

    def weighted(self, cfg, terms, step):
        return [consistency_weight(step, cfg["train"]) * terms["mse"]]


class DyCON(Objective):
    uses_teacher = True

    def sums(self, cfg, student_out, teacher_out, labels, labeled_bs, beta, threshold):
        (logits, embeddings), (t_logits, t_embeddings) = student_out, teacher_out
        official, lb = cfg["train"]["preset"] == "official", labeled_bs
        backend = cfg["train"]["kernel_backend"]
        out = {}
        if official:
            out["mse"] = losses.mse_sums(logits[lb:], t_logits[lb:], softmax_twice=True)
        # the kernels take the autocast dtype as it comes and accumulate in float32; the per-voxel
        # and per-anchor maps are summed here in float32
        uncl_map = dycon_kernels.uncl(logits, t_logits, beta, reduction="none", backend=backend)
        out["uncl"] = torch.stack([uncl_map.float().sum(), losses.count(uncl_map.numel(), logits)])
        grid = losses.patch_grid(cfg)
        params = dict(temperature=cfg["loss"]["temp"], gamma_pos=cfg["loss"]["gamma"])
        if official:
            # the official threshold term is normalised within the batch it sees: with several
            # processes the loss is the mean of the per-process values
            patch = losses.patch_labels_official(labels, grid)[lb:]
            value = dycon_kernels.fecl(embeddings[lb:], patch, t_embeddings[lb:], patch, preset="official",
                                       backend=backend, teacher_threshold=threshold, **params)
            out["fecl"] = torch.stack([value.float(), losses.count(1, logits)])
        else:
            patch = losses.patch_labels_dycon(labels, t_logits.float().softmax(1), lb, grid, cfg["loss"])
            anchor_map = dycon_kernels.fecl(embeddings, patch, t_embeddings, patch,
                                            anchor_weight=losses.anchor_weights(logits, grid), preset="dycon",
                                            backend=backend, gamma_neg=cfg["loss"]["gamma"], reduction="none",
                                            **params)
            out["fecl"] = torch.stack([anchor_map.float().sum(), (patch >= 0).sum().float()])
        return out

    def weighted(self, cfg, terms, step):
        out = [consistency_weight(step, cfg["train"]) * terms["mse"]] if "mse" in terms else []
        return out + [cfg["train"]["u_weight"] * (terms["fecl"] + terms["uncl"])]


OBJECTIVES = {"supervised": Objective(), "mean_teacher": MeanTeacher(), "dycon": DyCON()}
