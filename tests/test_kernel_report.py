"""benchmarks/kernel_report.py: the whole-call count of the FeCL kernels.

The target case (bfloat16, D = 256, 'dycon', top_k 32, N = 13 824, sm_90) is compiled once in a
subprocess without TRITON_INTERPRET (tests/triton_aot.py's cache is shared); the tests then check
that the report's rows add up to its headline, that every loop of every compiled kernel is in a
row (the SASS control-flow graph's back edges against the loops the report attributes to a
Python `for`), the simulated insertion rounds against their closed form, and, on the pinned
Triton, the call's budget.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEVICE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import kernel_report  # noqa: E402

TARGET = ("bf16", 256, "dycon", 32, 13824)
# float32 at D = 256 with chunked dots (the presets' two paths: dense negatives with the threshold
# teacher; top-k with the teacher top-k and the sparse-pair kernels), on the cards whose held
# float32 blocks spilled most (sm_80) and the budget's card.
FP32_CASES = [("fp32", 256, "official", 0, 13824), ("fp32", 256, "dycon", 32, 13824)]

_SCRIPT = """
import json, sys
import kernel_report as kr
cases, ccs = json.loads(sys.argv[1])
rows = kr.run(False, 1, ccs, ["fecl"], ns=(13824,), cases=[tuple(c) for c in cases])
print(json.dumps(dict(rows=rows, cost=kr.call_cost(rows)), default=str))
"""


def _compile_report(cases, ccs):
    """The report's kernel rows (with their SASS analysis) and cost rows of ``cases`` on ``ccs``."""
    if DEVICE.type == "cuda":
        pytest.skip("compiled on CPU-only machines (the GPU runs the kernels themselves)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "benchmarks")])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([cases, ccs])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    """The target case on sm_90."""
    return _compile_report([TARGET], [90])


@pytest.fixture(scope="module")
def fp32_report():
    return _compile_report(FP32_CASES, [80, 90])


def test_report_compiles_every_launch_of_the_call(report):
    names = [r["kernel"] for r in report["rows"]]
    assert names == ["topk", "topk_teacher", "logneg", "positive", "backward", "pairs", "keys", "coef", "rows"]
    assert all("error" not in r for r in report["rows"]), report["rows"]


def test_launches_of_the_call(report):
    """The headline counts the backward's pair steps as launches: N = 13 824 in super-blocks of
    8 x 64 anchors (27 of them) takes 13 steps of two launches; every other kernel launches once."""
    (call,) = [r for r in report["cost"] if r["level"] == "call"]
    kernels = {r["kernel"]: r["launches"] for r in report["cost"] if r["level"] == "kernel"}
    assert kernels.pop("pairs") == kernels.pop("keys") == 13
    assert set(kernels.values()) == {1}
    assert call["launches"] == 26 + len(kernels)


def test_rows_add_up_to_the_headline(report):
    cost = report["cost"]
    (call,) = [r for r in cost if r["level"] == "call"]
    kernels = [r for r in cost if r["level"] == "kernel"]
    assert {r["kernel"] for r in kernels} == {r["kernel"] for r in report["rows"]}
    for key in ("instr_per_pair", "mufu_per_pair"):
        assert sum(r[key] for r in kernels) == pytest.approx(call[key], rel=1e-12)
        for k in kernels:
            parts = [r[key] for r in cost if r["level"] == "loop" and r["kernel"] == k["kernel"]]
            assert sum(parts) == pytest.approx(k[key], rel=1e-12), (k["kernel"], key)
    assert call["spill"] == sum(r["spill"] for r in report["rows"])
    assert call["triton"] == __import__("triton").__version__


def _every_loop_attributed(report):
    """Every back edge of each kernel's control-flow graph belongs to a loop of the report with its
    Python `for` and a finite trip count; every branch to an earlier address in code a converged
    warp runs is such a back edge (those in the BRA.DIV fallbacks are not loops). Returns the
    loop rows of the cost."""
    for row in report["rows"]:
        code = row["code"]
        attributed = sorted(tuple(e) for lp in code["loops"] for e in lp["back_edges"])
        assert attributed == sorted(map(tuple, code["back_edges"])), row["kernel"]
        assert all(lp["line"] and lp["range"].startswith("range(") for lp in code["loops"]), row["kernel"]
        assert set(map(tuple, code["hot_retreating"])) <= set(map(tuple, code["back_edges"])), row["kernel"]
    loops = [r for r in report["cost"] if r["level"] == "loop" and r["part"] != "outside loops"]
    assert all(0 < r["trips"] < float("inf") for r in loops)
    return loops


def test_no_loop_of_a_compiled_kernel_is_left_out(report):
    loops = _every_loop_attributed(report)
    # The kernels' every `for`: the tile loops (the backward's step 0 and pair steps), the
    # insertion rounds, the sort, the slots of the log-neg pass and the coefficients (bfloat16:
    # stored similarities, no gather; ptxas unrolls each slot loop and keeps remainder loops:
    # log-neg 2 + 3 loops, coefficients 2 + 2), the sparse rows' gathers and key side's entries.
    # The key sums' GROUP slab blocks (a constexpr trip count) are unrolled on sm_90 since their
    # tiles load from one offset per tile (_load_tile): no loop, their code counted once per
    # program as straight-line code.
    assert len(loops) == sum(len(r["code"]["loops"]) for r in report["rows"]) == 3 + 3 + 5 + 1 + 1 + 1 + 0 + 4 + 3


def test_insertion_rounds_match_their_closed_form():
    """With k = 1 a row needs a round on tile t (0-based) iff the tile holds the row's maximum so
    far, probability 1/(t+1) for i.i.d. values; a block of bm rows needs one iff any row does:
    1 - (t/(t+1))^bm. The first tile always fills min(bn, k) slots."""
    bm, bn, tiles = 4, 8, 40
    expected = sum(1 - (t / (t + 1)) ** bm for t in range(tiles)) / tiles
    assert kernel_report.insertion_rounds(bm, bn, 1, bn * tiles, blocks=3000) == pytest.approx(expected, rel=0.02)
    assert kernel_report.insertion_rounds(64, 64, 32, 64) == 32
    assert kernel_report.insertion_rounds(64, 16, 32, 16) == 16


def test_max_in_degree_matches_its_mean_for_one_key():
    """One key per block: the mean in-degree, k (each of the n - 1 other anchors selects it with
    probability k / (n - 1)); a block's maximum grows with the block."""
    assert kernel_report.max_in_degree(1, 32, 13824, blocks=20000) == pytest.approx(32, rel=0.02)
    assert 32 < kernel_report.max_in_degree(16, 32, 13824) < kernel_report.max_in_degree(64, 32, 13824) < 64


def test_trip_counts_from_the_range_source():
    sizes, ce = dict(N=100, K=7), dict(BLOCK_N=32, BLOCK_M=16)
    assert kernel_report.trip_count("range(0, N, BLOCK_N)", sizes, ce) == 4
    assert kernel_report.trip_count("range(0, K)", sizes, ce) == 7


# SASS as nvdisasm prints it: a loop left through CALL.REL.NOINC (ptxas does so on sm_80/86 for
# the D-chunk loops and the top-k rounds) and a subroutine call that returns.
_NOINC_SASS = """
.L_x_0:
        /*0000*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0010*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm70_shflsync_bfly) ;
        /*0020*/              @P0 CALL.REL.NOINC `(.L_x_1) ;
        /*0030*/                   BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   EXIT ;
"""


def test_loop_left_through_call_rel_noinc():
    """A CALL.REL.NOINC to a label of the kernel is a jump (the loop's exit: without it the code
    after the loop looked unreachable and the loop around it was missed); one to a subroutine
    falls through."""
    import sass_loops

    instrs, labels = sass_loops.parse(_NOINC_SASS)
    blks = sass_loops.blocks(instrs, labels)
    assert [b.succs for b in blks] == [[1, 2], [0], []]
    assert sass_loops.back_edges(blks) == [(1, 0)]
    assert sass_loops.reachable(blks, with_div=False) == {0, 1, 2}


def test_float32_kernels_do_not_spill_and_every_loop_is_counted(fp32_report):
    """float32 at D = 256: no kernel of either preset's call spills on sm_80 or sm_90 (issue 21,
    item 4), and the chunked dots' loops (D chunks inside the key-tile loops, which ptxas leaves
    through CALL.REL.NOINC on sm_80) are each attributed to their `for`; on the pinned Triton,
    the budget."""
    spills = {(r["case"], r["target"], r["kernel"]): r["spill"] for r in fp32_report["rows"]}
    assert spills and not any(spills.values()), spills
    loops = _every_loop_attributed(fp32_report)
    chunk_loops = [r for r in loops if "range(0, D, BLOCK_DK)" in r["part"]]
    assert {r["target"] for r in chunk_loops} == {"sm_80", "sm_90"}
    # Nested in a key-tile loop: D / BLOCK_DK chunks per key tile, not D / BLOCK_DK in all.
    assert all(r["trips"] > 256 // 16 for r in chunk_loops), chunk_loops
    import triton

    if triton.__version__ == kernel_report.PINNED_TRITON:
        assert kernel_report.over_budget(fp32_report["cost"]) == []


def test_budget_on_the_pinned_triton(report):
    import triton

    if triton.__version__ != kernel_report.PINNED_TRITON:
        pytest.skip(f"the budget is measured with Triton {kernel_report.PINNED_TRITON}, this is {triton.__version__}")
    assert kernel_report.BUDGET[TARGET + ("sm_90",)]
    assert kernel_report.over_budget(report["cost"]) == []


def test_a_kernel_that_did_not_compile_leaves_its_call_uncounted(monkeypatch):
    """A failed compile must not shrink the headline: the call's count is NaN, the error is kept,
    and the budget check reports it (on any Triton)."""
    monkeypatch.setattr(kernel_report, "PINNED_TRITON", __import__("triton").__version__)
    failed = dict(op="fecl", case="/".join(map(str, TARGET)), target="sm_90", kernel="fecl_topk_kernel",
                  error="CompilationError: out of resources")
    (call,) = kernel_report.call_cost([failed])
    assert call["level"] == "call" and call["instr_per_pair"] != call["instr_per_pair"]  # NaN
    assert call["fits"] is False and "fecl_topk_kernel" in call["error"]
    (fail,) = kernel_report.over_budget([call])
    assert "not counted" in fail and "out of resources" in fail
