"""The FeCL backward's bfloat16 arithmetic (tests/fecl_bf16_emulation.py) against float64.

CI runs N = 2048 (a few seconds); DYCON_BF16_EMULATION_FULL=1 adds N = 13 824 and 110 592
(minutes). The error of dz is bounded by the rounding model of fecl_bf16_emulation.error_bound
and, relative to max |dz|, stays below half a bfloat16 ulp (the rounding of the returned dz).
The top-k negatives' row side, from the similarities the top-k pass stores at its packed keys'
resolution, likewise (sparse_error_bound).
"""
import os

import pytest
import torch

import fecl_bf16_emulation as emu

FULL = os.environ.get("DYCON_BF16_EMULATION_FULL") == "1"


def test_round_toward_zero_f32():
    x = torch.tensor([1 + 2.0 ** -30, -(1 + 2.0 ** -30), 1 - 2.0 ** -30, 3.0, -0.0, 2.0 ** -130], dtype=torch.float64)
    r = emu.round_toward_zero_f32(x)
    assert r.tolist() == [1.0, -1.0, 1 - 2.0 ** -24, 3.0, -0.0, 2.0 ** -130]
    y = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = emu.round_toward_zero_f32(y)
    assert (r.abs() <= y.abs()).all() and (r.float().double() == r).all()
    up = torch.nextafter(r.float(), torch.sign(y).float() * float("inf")).double()
    assert (up.abs() > y.abs()).all()  # the float32 next away from zero is past y: r is the truncation


def test_mma_truncates_per_block_of_16():
    # 17 products of 1: exact in one block of 16 and one of 1. 2^24 + 1 is not a float32: a
    # truncating accumulator keeps 2^24 where a float64 sum gives 2^24 + 1.
    a = torch.ones(1, 17, dtype=torch.float64)
    b = torch.ones(17, 1, dtype=torch.float64)
    acc = torch.full((1, 1), 2.0 ** 24 - 16, dtype=torch.float64)
    assert emu.mma(a, b, acc, exact=False).item() == 2.0 ** 24
    assert emu.mma(a, b, acc, exact=True).item() == 2.0 ** 24 + 1


@pytest.mark.parametrize("n", [2048] + ([13824, 110592] if FULL else []))
def test_bf16_backward_error_within_its_bound(n):
    rel_max, rel_scale, bound = emu.emulate(n, 256)
    assert rel_scale <= bound, (n, rel_scale, bound)
    assert rel_max < 2.0 ** -9, (n, rel_max)  # below the rounding of the bfloat16 dz it is stored as
    assert rel_max > 0  # the emulation rounds at all


def test_the_bound_catches_a_one_part_coefficient():
    """Without the two-part split (g rounded to one bfloat16, 8 significant bits) the error is
    past the bound: the test above can fail."""
    z = emu.bf16(torch.nn.functional.normalize(torch.randn(512, 64, generator=torch.Generator().manual_seed(1),
                                                           dtype=torch.float64), dim=1))
    y = torch.arange(512) % 3
    stats = emu.statistics(z, y, 0.6, 2.0)
    want, scale = emu.backward_rows(z, y, stats, 8, exact=True)
    got, _ = emu.backward_rows(z, y, stats, 8, exact=False, split=False)
    assert ((got - want).abs() / scale).max() > emu.error_bound(512, 64)


@pytest.mark.parametrize("n", [2048] + ([13824, 110592] if FULL else []))
def test_bf16_topk_rows_from_stored_similarities_within_their_bound(n):
    rel_max, rel_scale, bound = emu.emulate_sparse(n, 256)
    assert rel_scale <= bound, (n, rel_scale, bound)
    assert rel_max < 2.0 ** -9, (n, rel_max)
    assert rel_max > 0


def test_stored_similarity_is_its_buckets_middle():
    s = torch.tensor([0.3, -0.7, 1e-3, 0.99, -1.0], dtype=torch.float32).double()
    got = emu.stored_similarity(s)
    assert ((got.float().view(torch.int32) & 63) == 32).all()
    assert ((got - s).abs() <= 2.0 ** -18 * s.abs()).all() and (got != s).all()


def test_the_sparse_bound_catches_a_coarser_packing():
    """Stored similarities with 12 low bits replaced (2^-12 relative) are past the bound of the
    kernel's 6: the test above can fail."""
    _, rel_scale, bound = emu.emulate_sparse(512, 64, low_bits=12)
    assert rel_scale > bound
