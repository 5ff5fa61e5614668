"""Backend discovery and selection (engineering.md, "Backends and dispatch")."""
import importlib.util

import pytest
import torch

import dycon_kernels as dk
from dycon_kernels import backends

CPU = torch.device("cpu")


def test_the_built_extension_provides_both_ops_on_the_cpu():
    # The test suite runs after `pip install -e .`: a missing kernel must fail loudly here
    # rather than shrink the parametrised backend tests to nothing.
    assert backends.extension_has("CPU")
    for op in ("uncl", "fecl"):
        assert backends.implements("cpu", op)
        assert backends.resolve("auto", CPU, op) == "cpu"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_implements_both_ops():
    for op in ("uncl", "fecl"):
        assert backends.implements("triton", op)


def test_environment_variable_replaces_auto(monkeypatch):
    monkeypatch.setenv("DYCON_BACKEND", "reference")
    assert backends.resolve("auto", CPU, "uncl") == "reference"
    assert backends.resolve("cpu", CPU, "uncl") == "cpu"  # an explicit choice wins


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in dk.available_backends(CPU)
    with pytest.raises(ValueError, match="cannot run on cpu"):
        backends.resolve("triton", CPU, "uncl")


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on cpu"):
        backends.resolve("cuda", CPU, "uncl")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("opencl", CPU, "uncl")


def test_poisoned_outputs_are_nan(monkeypatch):
    monkeypatch.setenv("DYCON_POISON", "1")
    assert torch.isnan(backends.new_output((3,), torch.float32, CPU)).all()
    assert (backends.new_output((3,), torch.int64, CPU) == -12345).all()
