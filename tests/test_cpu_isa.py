"""The C++ CPU kernels' vector-ISA variants (csrc/cpu_isa.h): the report names them, DYCON_CPU_ISA
picks one, and the kernels' reference checks pass under every variant this CPU runs."""
import pytest
import torch

import test_fecl_cpp
import test_uncl
import dycon_kernels
from dycon_kernels import backends
from dycon_kernels.backends import cpu_isa

pytestmark = pytest.mark.skipif(not backends.can_run("cpu", torch.device("cpu")), reason="dycon_kernels._C not built")
VARIANTS = cpu_isa.runnable()


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    """Every test using it runs once per variant this CPU runs, with the kernels forced to it."""
    monkeypatch.setenv(cpu_isa.ENV, request.param)
    assert cpu_isa.used() == request.param
    return request.param


def test_report_names_the_cpu_and_the_variant(monkeypatch):
    monkeypatch.delenv(cpu_isa.ENV, raising=False)
    r = cpu_isa.report()
    assert r["cpu"] and r["torch_cpu_capability"]
    assert VARIANTS[0] == "baseline"
    # Unforced, the kernels use the best variant, never above the level /proc/cpuinfo lists (equal
    # to it with a GCC build on x86, lower where the compiler built fewer variants).
    assert r["kernel_variant"] == VARIANTS[-1]
    if r["cpu_isa"] != "unknown":
        levels = list(cpu_isa.LEVEL_FLAGS)
        assert levels.index(VARIANTS[-1]) <= levels.index(r["cpu_isa"])
    assert r["kernel_variant"] in cpu_isa.summary()


def test_unknown_variant_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV, "avx9000")
    s = torch.randn(1, 2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="DYCON_CPU_ISA=avx9000 is not a kernel variant this CPU runs"):
        dycon_kernels.uncl(s, s, 1.0, backend="cpu")
    assert "error: DYCON_CPU_ISA=avx9000" in cpu_isa.report()["kernel_variant"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("weighted", [False, True])
def test_uncl_matches_reference(variant, dtype, C, weighted):
    test_uncl.test_backend_matches_reference("cpu", dtype, C, "none" if weighted else "mean", weighted)


@pytest.mark.parametrize("beta", [0.0, 40.0])
def test_uncl_extreme_logits(variant, beta):
    test_uncl.test_beta_extremes_and_extreme_logits("cpu", beta, 80.0)


@pytest.mark.parametrize("name", list(test_fecl_cpp.CONFIGS))
def test_fecl_matches_reference(variant, name):
    test_fecl_cpp.test_configs("cpu", name, torch.float32)


@pytest.mark.parametrize("name", ["dycon", "topk_mid_teacher"])
def test_fecl_teacher_top_k_over_many_keys(variant, name):
    # More teacher keys than one chunk of the top-k scan, so that full-heap chunks are skipped.
    cfg = test_fecl_cpp.make_cfg(**test_fecl_cpp.CONFIGS[name])
    test_fecl_cpp.check("cpu", cfg, dtype=torch.float32, N=100, Nt=200, D=16)


def test_fecl_strips(variant):
    test_fecl_cpp.test_cpu_strips("dycon", torch.float32)


def test_fecl_float64(variant):
    test_fecl_cpp.test_configs("cpu", "official", torch.float64)
