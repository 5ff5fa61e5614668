"""Two students, initialised differently, that teach each other (co-training; the cross
pseudo-labels of CPS, Chen et al. 2021, and of cross teaching).

Each student learns from the labelled volumes (CE + Dice) and from the other's hard
pseudo-labels on the unlabelled volumes (cross-entropy, both directions, weighted by the
consistency ramp-up): ``--method cps``. With ``--method dycon`` each student also takes UnCL and FeCL against the
other student (detached) in the teacher's place. There is no EMA teacher; the first student is
the one validated, tested and saved as ``"student"`` (the second as ``"student_b"``). With
``views.strong`` each student trains on the strong view while the pseudo-labels (and, with
dycon, the other student's outputs) come from a pass without gradient on the weak view.
"""
from __future__ import annotations

import itertools

import torch

from dycon import distributed, frameworks, losses
from dycon.frameworks.mean_teacher import student_view
from dycon.objectives import OBJECTIVES
from dycon.schedules import consistency_weight


class CoTraining:
    def __init__(self, cfg: dict, device: torch.device, ctx: distributed.Context):
        t = cfg["train"]
        self.cfg, self.ctx, self.objective = cfg, ctx, OBJECTIVES[t["method"]]
        self.student = frameworks.new_network(cfg, device, ctx)
        torch.manual_seed(distributed.derived_seed(t["seed"], 6))   # a different initialisation
        self.student_b = frameworks.new_network(cfg, device, ctx)
        self.labeler = self.student_b   # FeCL's patch labels for the (validated) first student
        used = self.objective.uses_embeddings(cfg)   # the projection heads: only FeCL uses them
        self.stepped = [frameworks.distribute(m, device, ctx, all_parameters_used=used)
                        for m in (self.student, self.student_b)]
        self.loss_sums = frameworks.maybe_compile(loss_sums, t, ctx)
        self.slots = distributed.global_slots(t["batch_size"], t["labeled_bs"], ctx)

    def parameters(self):
        return itertools.chain(self.student.parameters(), self.student_b.parameters())

    def networks(self) -> list:
        """The two students: each is clipped on its own, as with the reference's two optimisers."""
        return [self.student, self.student_b]

    def sums(self, image, labels, labeled_bs: int, number: int, scalars: dict) -> dict:
        student_image = student_view(image, self.cfg, number, self.slots)
        with frameworks.autocast(self.cfg["train"], image.device.type):
            return self.loss_sums(self.cfg, image, student_image, labels, *self.stepped, labeled_bs, scalars)

    def weighted(self, terms: dict, step: int) -> dict:
        out = {"cps": consistency_weight(step, self.cfg) * terms["cps"]}
        if self.cfg["train"]["method"] == "dycon":
            second = {name[:-2]: v for name, v in terms.items() if name.endswith("_b")}
            out.update(self.objective.weighted(self.cfg, terms, step))
            out.update({f"{k}_b": v for k, v in self.objective.weighted(self.cfg, second, step).items()})
        return out

    def after_step(self, step: int) -> None:
        pass   # both students are trained by the optimiser; there is no teacher to follow

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "student_b": self.student_b.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.student_b.load_state_dict(ckpt["student_b"])


def loss_sums(cfg: dict, image, student_image, labels, student_a, student_b, labeled_bs: int, scalars: dict) -> dict:
    """This process's sums: both students' supervised terms, the cross pseudo-label term
    ``cps`` and (dycon) each student's UnCL/FeCL against the other; the second's end in ``_b``.
    The students train on ``student_image``; the pseudo-labels come from ``image`` (the weak view)."""
    lb = labeled_bs
    out_a, out_b = student_a(student_image), student_b(student_image)
    if not cfg["views"]["strong"]:   # one view: the pseudo-labels are the outputs themselves
        detached_a, detached_b = (tuple(x.detach() for x in out) for out in (out_a, out_b))
    else:
        with torch.no_grad():
            detached_a, detached_b = student_a(image), student_b(image)
    sums = losses.supervised_sums(out_a[0][:lb], labels[:lb])
    sums.update({f"{k}_b": v for k, v in losses.supervised_sums(out_b[0][:lb], labels[:lb]).items()})
    logits_a, logits_b = out_a[0][lb:].float(), out_b[0][lb:].float()
    pseudo_a, pseudo_b = detached_a[0][lb:].argmax(1), detached_b[0][lb:].argmax(1)
    cross = losses.cross_entropy_sum(logits_a, pseudo_b) + losses.cross_entropy_sum(logits_b, pseudo_a)
    sums["cps"] = torch.stack([cross, losses.count(pseudo_a.numel(), logits_a)])
    if cfg["train"]["method"] == "dycon":
        objective = OBJECTIVES["dycon"]
        sums.update(objective.sums(cfg, out_a, detached_b, labels, lb, scalars))
        sums.update({f"{k}_b": v for k, v in objective.sums(cfg, out_b, detached_a, labels, lb, scalars).items()})
    return sums
