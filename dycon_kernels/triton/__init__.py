"""Triton backend: the entry points of every fused op (contract in backends/reference.py)."""
from dycon_kernels.triton.uncl import uncl_backward, uncl_forward  # noqa: F401
from dycon_kernels.triton.fecl import fecl_backward, fecl_forward, stored_sims  # noqa: F401
