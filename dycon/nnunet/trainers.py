"""Semi-supervised nnU-Net trainers: Mean Teacher and DyCON on nnU-Net's own network and data.

The network is nnU-Net's (``build_network_architecture`` untouched), so ``nnUNetv2_predict``,
ensembling, post-processing and ``nnUNetv2_find_best_configuration`` see a normal nnU-Net
model. What the trainers add (docs/nnunet.md):

- the EMA teacher, a copy of the network (in train mode and with input noise, as our own
  trainer), updated after every step (``dycon.frameworks.mean_teacher.ema_update``);
- DyCON's projection head, fed by a forward hook on the encoder's last stage
  (``dycon.monai_losses.attach_projection_head``), and the teacher's EMA copy of it;
- a second loader of unlabelled cases (``imagesUnlabelled/``, dycon.nnunet.unlabelled) with the
  training transforms: every step sees nnU-Net's labelled batch plus as many unlabelled cases;
- the step: nnU-Net's deep-supervision Dice + CE on the labelled half, plus the method's
  objective (``dycon.objectives``) on the full-resolution output of the whole batch: UnCL and
  FeCL for DyCON, the softmax MSE for Mean Teacher. Ramps count iterations
  (epochs x iterations per epoch); UnCL's beta decays over nnU-Net's epochs.

Checkpoints keep the teacher, the heads and the step (``--c`` resumes all of them);
``checkpoint_final_teacher.pth`` holds the teacher as ``network_weights``, so
``nnUNetv2_predict ... -chk checkpoint_final_teacher.pth`` predicts with it.

``DYCON_NNUNET_EPOCHS`` / ``DYCON_NNUNET_ITERATIONS`` shorten a run (tests, the demo benchmark);
``DYCON_NNUNET_SEED`` seeds it (nnU-Net seeds nothing); ``nnUNetTrainerBudget`` is plain
supervised nnU-Net under the same settings.
"""
from __future__ import annotations

import copy
import os
import random

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch._dynamo import OptimizedModule

import dycon_kernels
from dycon.config import DEFAULTS
from dycon.frameworks.mean_teacher import ema_update
from dycon.monai_losses import attach_projection_head
from dycon.nnunet.unlabelled import UNLABELLED_FOLDER, preprocess_unlabelled, preprocessed_folder, unlabelled_cases
from dycon.objectives import OBJECTIVES
from dycon.schedules import beta_at

EPOCHS_ENV, ITERATIONS_ENV, SEED_ENV = "DYCON_NNUNET_EPOCHS", "DYCON_NNUNET_ITERATIONS", "DYCON_NNUNET_SEED"
TEACHER_CHECKPOINT = "checkpoint_final_teacher.pth"


def _env_int(name: str) -> int | None:
    """Environment variable ``name`` as an integer; None where it is unset or empty."""
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: not an integer") from None


def apply_budget(trainer: nnUNetTrainer) -> None:
    """Epochs and iterations per epoch from DYCON_NNUNET_EPOCHS / DYCON_NNUNET_ITERATIONS, where set."""
    epochs, iterations = _env_int(EPOCHS_ENV), _env_int(ITERATIONS_ENV)
    if epochs is not None:
        trainer.num_epochs = epochs
    if iterations is not None:
        trainer.num_iterations_per_epoch = iterations
        trainer.num_val_iterations_per_epoch = max(1, iterations // 5)


def apply_seed(epoch: int = 0) -> None:
    """Seed Python, numpy and torch from DYCON_NNUNET_SEED, where set.

    nnU-Net seeds none of them: the network's initialisation (torch), the patch sampling
    (numpy's global generator in nnUNetDataLoader) and the augmentation (numpy and torch) differ
    from run to run. Called before initialize() builds the network, so one seed fixes the
    initialisation; with nnUNet_n_proc_DA=0 the loaders run in this process and draw from the
    same seeded generators (worker processes would not). A run resumed at ``epoch`` > 0 draws
    from a stream of its own (seed, epoch), so it does not replay the first epochs' patches."""
    seed = _env_int(SEED_ENV)
    if seed is None:
        return
    if epoch:
        seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _bare(network: torch.nn.Module) -> torch.nn.Module:
    """The network under a DDP or torch.compile wrapper."""
    network = getattr(network, "module", network)
    return network._orig_mod if isinstance(network, OptimizedModule) else network


class nnUNetTrainerBudget(nnUNetTrainer):
    """Supervised nnU-Net, shortened by the DYCON_NNUNET_* settings: the baseline of a comparison."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget(self)
        apply_seed()

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        apply_seed(self.current_epoch)      # --c: on from the resumed epoch's own stream


class nnUNetTrainerMeanTeacher(nnUNetTrainerBudget):
    """Mean Teacher: the softmax MSE between student and teacher on the unlabelled half, weighted
    by ``consistency`` x a sigmoid ramp over the whole run (as SSL4MIS)."""
    method, preset = "mean_teacher", "dycon"
    uses_head = False
    ema_decay, noise_std, noise_clip = 0.99, 0.1, 0.2
    consistency = 0.1
    embed_dim, feature_scaler = 256, 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dycon_cfg = copy.deepcopy(DEFAULTS)
        self.dycon_cfg["train"].update(method=self.method, preset=self.preset)
        self.objective = OBJECTIVES[self.method]
        self.teacher = self.head = self.teacher_head = self.dataloader_unlabelled = None
        self.dycon_step = 0
        self.epoch_terms = {}   # name -> (sum of raw, sum of weighted, steps), logged per epoch
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise ValueError(f"{type(self).__name__} needs a dataset of plain labels (softmax outputs); "
                             "dataset.json defines regions or an ignore label")
        if self.uses_head and len(self.configuration_manager.patch_size) != 3:
            raise ValueError(f"{type(self).__name__} needs a 3D configuration, got {configuration!r}")
        if self.is_cascaded:
            raise ValueError(f"{type(self).__name__} does not support cascaded configurations ({configuration!r}): "
                             "unlabelled images have no previous-stage segmentation")
        if self.uses_head and self.is_ddp:
            # the head sits outside nnU-Net's DDP wrapper: its gradients would not be averaged
            raise ValueError(f"{type(self).__name__} does not support multi-GPU (DDP) training yet; use one GPU")

    # ---------------------------------------------------------------------------- set-up
    def _do_i_compile(self):
        # the projection head's hook is registered after nnU-Net compiles the network; compile
        # only when asked for explicitly (nnUNet_compile=1)
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def configure_optimizers(self):
        # called by initialize() once the network exists: the teacher and heads join here so that
        # the head's parameters are in the optimiser (and in its checkpointed state)
        self._build_teacher_and_heads()
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.head is not None:
            optimizer.add_param_group({"params": list(self.head.parameters())})
        return optimizer, lr_scheduler

    def _build_teacher_and_heads(self) -> None:
        network = _bare(self.network)
        self.teacher = copy.deepcopy(network)   # before the student's hook exists: the copy has none
        self.teacher.requires_grad_(False)
        self.teacher.decoder.deep_supervision = False
        if self.uses_head:
            example = torch.zeros((1, self.num_input_channels, *self.configuration_manager.patch_size),
                                  device=self.device)
            self.head = attach_projection_head(network, network.encoder.stages[-1], example_input=example,
                                               embed_dim=self.embed_dim, feature_scaler=self.feature_scaler)
            self.teacher_head = attach_projection_head(
                self.teacher, self.teacher.encoder.stages[-1], in_channels=self.head.head.proj[0].in_channels,
                embed_dim=self.embed_dim, feature_scaler=self.feature_scaler)
            self.teacher_head.remember_input_shape(self.configuration_manager.patch_size)
            self.teacher_head.requires_grad_(False)
        self._sync_teacher()

    def _sync_teacher(self) -> None:
        """Teacher = student (before the first step, e.g. after -pretrained_weights)."""
        self.teacher.load_state_dict(_bare(self.network).state_dict())
        if self.head is not None:
            self.teacher_head.load_state_dict(self.head.state_dict())

    def on_train_start(self):
        super().on_train_start()
        if self.dycon_step == 0:
            self._sync_teacher()

    # ------------------------------------------------------------------------------ data
    def get_dataloaders(self):
        train, val = super().get_dataloaders()
        self.dataloader_unlabelled = self._unlabelled_loader()
        return train, val

    def _unlabelled_loader(self):
        raw = os.path.join(nnUNet_raw.get() or "", self.plans_manager.dataset_name)
        cases = unlabelled_cases(raw, self.dataset_json) if nnUNet_raw.is_set() else {}
        if not cases:
            self.print_to_log_file(f"DyCON: no images in {os.path.join(raw, UNLABELLED_FOLDER)}: "
                                   "training as supervised nnU-Net")
            return None
        folder = preprocessed_folder(self.preprocessed_dataset_folder)
        if self.local_rank == 0:
            preprocess_unlabelled(cases, folder, self.plans_manager, self.configuration_manager, self.dataset_json,
                                  log=self.print_to_log_file)
        if self.is_ddp:
            torch.distributed.barrier()
        dataset = nnUNetDatasetBlosc2(folder, sorted(cases))   # what the preprocessor's run_case_save writes
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            foreground_labels=self.label_manager.foreground_labels)
        loader = nnUNetDataLoader(dataset, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, transforms=transforms)
        self.print_to_log_file(f"DyCON: {len(cases)} unlabelled case(s); each step adds {self.batch_size}")
        processes = get_allowed_n_proc_DA()
        if processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, processes, max(6, processes // 2), None,
                                            pin_memory=self.device.type == "cuda", wait_time=0.002)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabelled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabelled._finish()

    # ------------------------------------------------------------------------------ step
    def train_step(self, batch: dict) -> dict:
        if self.dataloader_unlabelled is None:
            return super().train_step(batch)
        unlabelled = next(self.dataloader_unlabelled)
        lb = batch["data"].shape[0]
        data = torch.cat([batch["data"], unlabelled["data"]]).to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            outputs = output if isinstance(output, (list, tuple)) else [output]
            labelled = [o[:lb] for o in outputs] if isinstance(output, (list, tuple)) else output[:lb]
            supervised = self.loss(labelled, target)
            full_res_labels = (target[0] if isinstance(target, list) else target)[:, 0].long()
            unsupervised = self.unsupervised_loss(data, outputs[0], full_res_labels, lb)
            loss = supervised + unsupervised
        parameters = list(self.network.parameters()) + (list(self.head.parameters()) if self.head else [])
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.optimizer.step()
        self._ema_update()
        return {"loss": loss.detach().cpu().numpy()}

    def _ema_update(self) -> None:
        ema_update(self.teacher, _bare(self.network), self.ema_decay, self.dycon_step)
        if self.head is not None:
            ema_update(self.teacher_head, self.head, self.ema_decay, self.dycon_step)
        self.dycon_step += 1

    def unsupervised_loss(self, data: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lb: int):
        """The method's weighted terms on the whole batch (``lb`` labelled cases first)."""
        with torch.no_grad():
            noise = torch.clamp(torch.randn_like(data) * self.noise_std, -self.noise_clip, self.noise_clip)
            teacher_logits = self.teacher(data + noise)
            teacher_embeddings = self.teacher_head() if self.head is not None else None
        embeddings = self.head() if self.head is not None else None
        if self.head is not None:
            self.dycon_cfg["model"]["patch_grid"] = self.head.grid(self.head.feature.shape[2:])
        # nnU-Net has no label for the unlabelled half; the teacher's argmax stands in where an
        # objective reads one (only the official preset's patch labels do)
        labels = torch.cat([labels[:lb], teacher_logits[lb:].argmax(1)])
        epoch, loss_cfg = self.current_epoch, self.dycon_cfg["loss"]
        scalars = {"beta": torch.tensor(beta_at(epoch, self.num_epochs, loss_cfg), dtype=torch.float64),
                   "threshold": torch.tensor(dycon_kernels.teacher_threshold_ramp(epoch), dtype=torch.float64)}
        sums = self.objective.sums(self.dycon_cfg, (logits, embeddings), (teacher_logits, teacher_embeddings),
                                   labels, lb, scalars)
        sums.pop("fecl_anchors", None)   # a diagnostic, not a loss
        terms = {name: v[0] / v[1].clamp_min(1) for name, v in sums.items()}
        weighted = self.weighted(terms)
        self._record_terms(terms, weighted)
        return sum(weighted.values(), torch.zeros((), device=logits.device))

    def _record_terms(self, terms: dict, weighted: dict) -> None:
        # summed on the device: the host reads them once an epoch, not twice per term and step
        # (each .item() would wait for the GPU)
        for name, value in weighted.items():
            raw_sum, weighted_sum, count = self.epoch_terms.get(name, (0.0, 0.0, 0))
            self.epoch_terms[name] = (raw_sum + terms[name].detach(), weighted_sum + value.detach(), count + 1)

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        # the log shows that the unsupervised terms took part, and with which weight
        if self.epoch_terms:
            means = ", ".join(f"{name} {float(raw) / n:.4g} -> {float(weighted) / n:.4g}"
                              for name, (raw, weighted, n) in self.epoch_terms.items())
            self.print_to_log_file(f"DyCON: the epoch's mean unsupervised terms (raw -> weighted): {means}")
        self.epoch_terms = {}

    def weighted(self, terms: dict) -> dict:
        """The method's weighted terms, on its own schedules (dycon.schedules: MT ramps over the
        whole run, DyCON keeps the released ones) counted in nnU-Net's iterations."""
        self.dycon_cfg["train"].update(max_iterations=self.num_epochs * self.num_iterations_per_epoch,
                                       consistency=self.consistency)
        return self.objective.weighted(self.dycon_cfg, terms, self.dycon_step)

    # ------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank != 0 or self.disable_checkpointing or self.teacher is None:
            return
        # nnU-Net writes its checkpoint; ours adds the teacher, the heads and the step to it
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
        checkpoint["dycon"] = {"teacher": self.teacher.state_dict(), "step": self.dycon_step,
                               "head": self.head.state_dict() if self.head else None,
                               "teacher_head": self.teacher_head.state_dict() if self.head else None}
        torch.save(checkpoint, filename)
        if os.path.basename(filename) == "checkpoint_final.pth":
            teacher_as_network = {**checkpoint, "network_weights": checkpoint["dycon"]["teacher"]}
            torch.save(teacher_as_network, os.path.join(os.path.dirname(filename), TEACHER_CHECKPOINT))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get("dycon")
        if state is None:
            self.print_to_log_file("DyCON: the checkpoint has no teacher; it starts as a copy of the network")
            self._sync_teacher()
            return
        self.teacher.load_state_dict(state["teacher"])
        self.dycon_step = state["step"]
        if self.head is not None:
            self.head.load_state_dict(state["head"])
            self.teacher_head.load_state_dict(state["teacher_head"])


class nnUNetTrainerDyCON(nnUNetTrainerMeanTeacher):
    """DyCON (``dycon`` preset): UnCL on the whole batch, FeCL on the head's patch embeddings with
    leak-free patch labels (ground truth on the labelled half, the teacher's on the rest), the
    released weights 0.5 / 0.5 without ramps (``dycon.config.DEFAULTS["loss"]``)."""
    method, preset = "dycon", "dycon"
    uses_head = True


class nnUNetTrainerDyCONOfficial(nnUNetTrainerDyCON):
    """DyCON with the released code's settings (``official`` preset: its FeCL, its extra softmax-twice
    MSE). The released code takes FeCL's patch labels of the unlabelled volumes from their ground
    truth; nnU-Net has none, so the teacher's argmax stands in."""
    preset = "official"
