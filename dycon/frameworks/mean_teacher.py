"""One student and its teacher, an exponential moving average of it (method.md section 3).

The teacher sees the batch plus noise, in train mode as released (dropout and batch statistics
in the teacher too), without gradient; it follows the student after every optimiser step. With
``views.strong`` the student (and the supervised baseline) sees the strong view of the batch
(dycon/views.py), the teacher still the weak one.
"""
from __future__ import annotations

import copy

import torch

from dycon import distributed, frameworks, losses
from dycon.objectives import OBJECTIVES
from dycon.views import strong_view


class MeanTeacher:
    def __init__(self, cfg: dict, device: torch.device, ctx: distributed.Context):
        t = cfg["train"]
        self.cfg, self.ctx, self.objective = cfg, ctx, OBJECTIVES[t["method"]]
        self.student = frameworks.new_network(cfg, device, ctx)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.labeler = self.teacher   # whose predictions label the unlabelled patches for FeCL
        self.stepped = frameworks.distribute(self.student, device, ctx,
                                             all_parameters_used=self.objective.uses_embeddings(cfg))
        self.loss_sums = frameworks.maybe_compile(loss_sums, t, ctx)
        self.slots = distributed.global_slots(t["batch_size"], t["labeled_bs"], ctx)   # this process's volumes

    def parameters(self):
        return self.student.parameters()

    def networks(self) -> list:
        """The trained networks, each clipped on its own (dycon.loop.clip_gradients)."""
        return [self.student]

    def sums(self, image, labels, labeled_bs: int, number: int, scalars: dict) -> dict:
        """Every term's sums on this process's share of global batch ``number``."""
        t = self.cfg["train"]
        noise = teacher_noise(image, t["seed"], number, self.slots) if self.objective.uses_teacher else None
        if t["method"] == "uamt":   # one more noise draw per Monte-Carlo pass, keyed by the pass
            noises = [teacher_noise(image[labeled_bs:], t["seed"], number, self.slots[labeled_bs:], 1 + i)
                      for i in range(self.cfg["loss"]["uamt_samples"])]
            with frameworks.autocast(t, image.device.type):
                uncertainty = self.objective.uncertainty(self.teacher, image[labeled_bs:], torch.stack(noises))
            scalars = {**scalars, "uncertainty": uncertainty}
        student_image = student_view(image, self.cfg, number, self.slots)
        with frameworks.autocast(t, image.device.type):
            return self.loss_sums(self.cfg, image, student_image, labels, noise, self.stepped, self.teacher,
                                  labeled_bs, scalars)

    def weighted(self, terms: dict, step: int) -> list:
        return self.objective.weighted(self.cfg, terms, step)

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.cfg["train"]["ema_decay"], step)

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        self.student.load_state_dict(ckpt["student"])
        self.teacher.load_state_dict(ckpt["teacher"])


def student_view(image: torch.Tensor, cfg: dict, number: int, slots: list[int]) -> torch.Tensor:
    """What the student trains on: the batch itself, or its strong view under ``views.strong``."""
    if not cfg["views"]["strong"]:
        return image
    # supervised batches hold the labelled volumes only: the first slots
    return strong_view(image, cfg["views"], cfg["train"]["seed"], number, slots[:len(image)])


def loss_sums(cfg: dict, image, student_image, labels, noise, student, teacher, labeled_bs: int,
              scalars: dict) -> dict:
    """This process's batch sums of every loss term: ``{term: tensor of sums}`` (compiled as one
    graph under ``--compile``). ``image``/``labels`` hold ``labeled_bs`` labelled volumes first;
    the student sees ``student_image`` (the batch, or its strong view), the teacher ``image + noise``."""
    objective = OBJECTIVES[cfg["train"]["method"]]
    student_out = student(student_image)
    out = losses.supervised_sums(student_out[0][:labeled_bs], labels[:labeled_bs])
    if not objective.uses_teacher:
        return out
    with torch.no_grad():
        teacher_out = teacher(image + noise)
    return {**out, **objective.sums(cfg, student_out, teacher_out, labels, labeled_bs, scalars)}


def teacher_noise(image: torch.Tensor, seed: int, number: int, slots: list[int], draw: int = 0) -> torch.Tensor:
    """The teacher's input noise, clamp(0.1 N(0, 1), -0.2, 0.2), drawn per volume from a generator
    keyed by the volume's slot in global batch ``number``: the same whatever the process count.
    ``draw`` > 0: UA-MT's further draws for its Monte-Carlo passes."""
    noise = torch.empty_like(image)
    for i, slot in enumerate(slots):
        key = (seed, 3, number, slot) + ((draw,) if draw else ())   # draw 0: the key as before
        g = torch.Generator(image.device).manual_seed(distributed.derived_seed(*key))
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

