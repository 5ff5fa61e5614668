"""Fused kernels for the DyCON losses: UnCL and FeCL (see shared spec ``losses.md``).

    import dycon_kernels as dk
    loss = dk.uncl(student_logits, teacher_logits, beta=2.0)
    loss = dk.fecl(embeddings, patch_labels, teacher_embeddings, preset="dycon")
    dk.available_backends()   # e.g. ['cpu', 'reference'] on a CPU machine
"""
from dycon_kernels import reference
from dycon_kernels._compile_cache import tag_compile_caches
from dycon_kernels.backends import available_backends
from dycon_kernels.fecl import FeCLoss, fecl
from dycon_kernels.presets import FECL_PRESETS, teacher_threshold_ramp
from dycon_kernels.uncl import UnCLoss, uncl

__all__ = ["uncl", "UnCLoss", "fecl", "FeCLoss", "FECL_PRESETS", "teacher_threshold_ramp",
           "available_backends", "reference"]
__version__ = "0.1.0"

tag_compile_caches()  # a changed dycon_kernels must not replay compiled graphs of an older one
