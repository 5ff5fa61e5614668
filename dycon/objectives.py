"""One objective per method: what it adds to the supervised loss of a step.

A framework (dycon/frameworks) runs the networks and the supervised CE + Dice; the method's
objective turns the student's and the teacher's outputs on the batch into the sums of its
unsupervised terms (``sums``), and weighs their ratios into the loss (``weighted``: a dict from
the term's name to its weighted value, so that the loop can measure each term's gradient).

- ``supervised``: nothing.
- ``mean_teacher``: MSE between student and teacher softmax on the unlabelled volumes,
  weighted by the consistency ramp-up.
- ``cps``: nothing here; the co-training framework adds its cross pseudo-label term.
- ``uamt`` (UA-MT, Yu et al. 2019): the same MSE, kept only at voxels where the teacher's
  Monte-Carlo-dropout uncertainty is below a threshold that ramps from 0.75 to 1 x log C
  (``schedules.uamt_threshold``).
- ``dycon``: UnCL on the whole batch (beta from the schedule; or plain MSE, ``loss.uncl: mse``)
  and FeCL on the patch embeddings (``dycon`` preset: patch labels from ground truth and
  teacher, anchors weighted by u = 1 + H, the teacher's top-k hard negatives; ``official``: the
  released code's labels from ground truth, plus its softmax-twice MSE). Each part has its own
  switch in the config's ``loss`` section; a term whose weight is 0 is not computed.

``scalars`` holds the step's scheduled values as 0-dim tensors (a compiled step does not
recompile when they change): ``beta`` (UnCL), ``threshold`` (official FeCL teacher threshold),
``uamt_threshold``, and for UA-MT the teacher's ``uncertainty`` map.
"""
from __future__ import annotations

import torch

import dycon_kernels
from dycon import losses
from dycon.schedules import consistency_weight, unsupervised_weights


class Objective:
    """The supervised baseline: no unsupervised term, no teacher."""
    uses_teacher = False

    def uses_embeddings(self, cfg: dict) -> bool:
        """Whether the projection head is in the loss (DistributedDataParallel must know)."""
        return False

    def sums(self, cfg: dict, student_out, teacher_out, labels, labeled_bs: int, scalars: dict) -> dict:
        """This process's sums of the method's terms. ``*_out`` are the networks' ``(logits,
        embeddings)`` on the whole batch (labelled volumes first)."""
        return {}

    def weighted(self, cfg: dict, terms: dict, step: int) -> dict:
        """The method's weighted terms by name, added in this order to the supervised loss."""
        return {}


class MeanTeacher(Objective):
    uses_teacher = True

    def sums(self, cfg, student_out, teacher_out, labels, labeled_bs, scalars):
        return {"mse": losses.mse_sums(student_out[0][labeled_bs:], teacher_out[0][labeled_bs:])}

    def weighted(self, cfg, terms, step):
        return {"mse": consistency_weight(step, cfg) * terms["mse"]}


class UAMT(MeanTeacher):
    """The Mean-Teacher MSE masked by the teacher's uncertainty (the framework supplies the
    ``uncertainty`` map of the unlabelled volumes from ``loss.uamt_samples`` noisy passes)."""

    def sums(self, cfg, student_out, teacher_out, labels, labeled_bs, scalars):
        s_probs = student_out[0][labeled_bs:].float().softmax(1)
        t_probs = teacher_out[0][labeled_bs:].float().softmax(1)
        mask = (scalars["uncertainty"] < scalars["uamt_threshold"]).float()[:, None]
        # the mean over the certain voxels and classes (UA-MT: sum / (2 sum(mask)) for 2 classes)
        return {"mse": torch.stack([(mask * (s_probs - t_probs) ** 2).sum(), mask.sum() * s_probs.shape[1]])}

    @staticmethod
    @torch.no_grad()
    def uncertainty(teacher, unlabelled: torch.Tensor, noises: torch.Tensor) -> torch.Tensor:
        """Entropy of the teacher's mean softmax over one noisy, dropout-on pass per noise."""
        probs = torch.stack([teacher(unlabelled + n)[0].float().softmax(1) for n in noises]).mean(0)
        return -(probs * torch.log(probs + 1e-6)).sum(1)


class DyCON(Objective):
    uses_teacher = True

    def uses_embeddings(self, cfg):
        return cfg["loss"]["fecl_weight"] > 0

    def sums(self, cfg, student_out, teacher_out, labels, labeled_bs, scalars):
        (logits, _), (t_logits, _) = student_out, teacher_out
        loss, lb, out = cfg["loss"], labeled_bs, {}
        if cfg["train"]["preset"] == "official":
            out["mse"] = losses.mse_sums(logits[lb:], t_logits[lb:], softmax_twice=True)
        if loss["uncl_weight"] > 0 and loss["uncl"] == "mse":
            out["uncl_mse"] = losses.mse_sums(logits, t_logits)
        elif loss["uncl_weight"] > 0:
            # the kernels take the autocast dtype as it comes and accumulate in float32; the
            # per-voxel and per-anchor maps are summed here in float32
            uncl_map = dycon_kernels.uncl(logits, t_logits, scalars["beta"], reduction="none",
                                          backend=cfg["train"]["kernel_backend"])
            out["uncl"] = torch.stack([uncl_map.float().sum(), losses.count(uncl_map.numel(), logits)])
        if loss["fecl_weight"] > 0:
            out.update(self.fecl_sums(cfg, student_out, teacher_out, labels, lb, scalars))
        return out

    def fecl_sums(self, cfg, student_out, teacher_out, labels, lb, scalars) -> dict:
        """FeCL's sums, and the counts of valid and of lesion anchors (a diagnostic)."""
        (logits, embeddings), (t_logits, t_embeddings) = student_out, teacher_out
        loss, backend, grid = cfg["loss"], cfg["train"]["kernel_backend"], losses.patch_grid(cfg)
        params = dict(temperature=loss["temp"], gamma_pos=loss["gamma_pos"])
        if cfg["train"]["preset"] == "official":
            # the official threshold term is normalised within the batch it sees: with several
            # processes the loss is the mean of the per-process values
            patch = losses.patch_labels_official(labels, grid)[lb:]
            value = dycon_kernels.fecl(embeddings[lb:], patch, t_embeddings[lb:], patch, preset="official",
                                       backend=backend, teacher_threshold=scalars["threshold"], **params)
            return {"fecl": torch.stack([value.float(), losses.count(1, logits)]), "fecl_anchors": anchor_counts(patch)}
        patch = losses.patch_labels_dycon(labels, t_logits.float().softmax(1), lb, grid, loss)
        anchor = losses.anchor_weights(logits, grid) if loss["anchor_weight"] == "entropy" else None
        teacher_k = loss["teacher_top_k"] or None
        anchor_map = dycon_kernels.fecl(
            embeddings, patch, t_embeddings if teacher_k else None, patch if teacher_k else None,
            anchor_weight=anchor, preset="dycon", backend=backend, gamma_neg=loss["gamma_neg"],
            top_k=loss["student_top_k"] or None, teacher="topk" if teacher_k else "none",
            teacher_top_k=teacher_k, reduction="none", **params)
        return {"fecl": torch.stack([anchor_map.float().sum(), (patch >= 0).sum().float()]),
                "fecl_anchors": anchor_counts(patch)}

    def weighted(self, cfg, terms, step):
        out = {"mse": consistency_weight(step, cfg) * terms["mse"]} if "mse" in terms else {}
        w_uncl, w_fecl = unsupervised_weights(cfg, step)
        if "fecl" in terms:
            out["fecl"] = w_fecl * terms["fecl"]
        out.update({name: w_uncl * terms[name] for name in ("uncl", "uncl_mse") if name in terms})
        return out


def anchor_counts(patch: torch.Tensor) -> torch.Tensor:
    """Valid anchors (label >= 0) and lesion anchors (label >= 1) of the batch: FeCL's diagnostics."""
    return torch.stack([(patch >= 0).sum(), (patch >= 1).sum()]).float()


OBJECTIVES = {"supervised": Objective(), "mean_teacher": MeanTeacher(), "uamt": UAMT(), "cps": Objective(),
              "dycon": DyCON()}
