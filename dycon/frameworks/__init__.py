"""Frameworks: which networks a step runs and how they learn from each other.

A framework holds its networks and gives the loop (dycon/loop.py) what it needs, whatever the
method: ``student`` (the network that is validated, tested and saved as ``"student"``),
``labeler`` (the network whose predictions give the first student's FeCL pseudo-labels),
``parameters()`` for the optimiser, ``networks()`` (each clipped on its own), ``sums(...)`` (the forward passes and every term's batch
sums), ``after_step(step)``, and ``state_dict()`` / ``load_state_dict(ckpt)`` for checkpoints.

- ``mean_teacher``: one student and its EMA teacher (mean_teacher.py);
- ``co_training``: two students teaching each other with cross pseudo-labels (co_training.py;
  ``--method cps``, or ``dycon`` with UnCL and FeCL between the students).

Both also give ``weighted(terms, step)``: the unsupervised terms by name, weighted, for the total loss.
"""
from __future__ import annotations

import torch

from dycon import distributed
from dycon.networks import build_model, convert_sync_batchnorm

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(cfg: dict, device: torch.device, ctx: distributed.Context):
    """The framework of the config, its networks on ``device``."""
    from dycon.frameworks.co_training import CoTraining
    from dycon.frameworks.mean_teacher import MeanTeacher

    return {"mean_teacher": MeanTeacher, "co_training": CoTraining}[cfg["train"]["framework"]](cfg, device, ctx)


def new_network(cfg: dict, device: torch.device, ctx: distributed.Context) -> torch.nn.Module:
    """A freshly initialised network of the config in train mode (global batch norm with several
    processes); the official preset initialises as the released code unless ``model.init`` says."""
    init = cfg["model"]["init"] or ("released" if cfg["train"]["preset"] == "official" else "pytorch")
    model = build_model({**cfg["model"], "init": init})
    if ctx.distributed:
        model = convert_sync_batchnorm(model)   # batch statistics of the global batch
    return model.to(device).train()


def distribute(model: torch.nn.Module, device: torch.device, ctx: distributed.Context,
               all_parameters_used: bool) -> torch.nn.Module:
    """The module the step calls: ``model`` itself, or wrapped in DistributedDataParallel."""
    if not ctx.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=not all_parameters_used)


def maybe_compile(fn, train_cfg: dict, ctx: distributed.Context):
    """``fn`` (a framework's loss sums) compiled under ``train.compile``."""
    if not train_cfg["compile"]:
        return fn
    # one graph per step: our kernels are custom ops that compile without a break; with
    # several processes DistributedDataParallel's forward (its logging) breaks the graph
    backend = train_cfg["compile"] if isinstance(train_cfg["compile"], str) else "inductor"
    return torch.compile(fn, fullgraph=not ctx.distributed, backend=backend)


def autocast(train_cfg: dict, device_type: str):
    """The step's mixed-precision context (a no-op without ``train.amp``)."""
    return torch.autocast(device_type, dtype=AMP_DTYPES[train_cfg["amp"]], enabled=train_cfg["amp"] is not None)
