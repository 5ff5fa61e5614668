"""A cubin's SASS as a control-flow graph, for benchmarks/kernel_report.py: instructions with
their source lines (``nvdisasm -g``, shipped with Triton), basic blocks, back edges (an edge to a
block that dominates its source), natural loops and their nesting, and the blocks a converged
warp never executes (those reached only through ``BRA.DIV``, the fallback taken when a warp
diverges before a shuffle reduction; Triton's warps stay converged).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LINE = re.compile(r'//## File "(.*)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_PRED = re.compile(r"^@!?U?P[T0-9]+\s+")


@dataclass
class Instr:
    addr: int
    op: str          # opcode with modifiers, predicate dropped
    text: str
    predicated: bool
    file: str | None
    line: int | None
    target: str | None = None  # branch target label


@dataclass
class Block:
    index: int
    instrs: list
    succs: list = field(default_factory=list)      # block indices
    div_succs: list = field(default_factory=list)  # successors through BRA.DIV only


@dataclass
class Loop:
    head: int           # block index
    tails: list         # blocks with the back edges
    body: set           # block indices (natural loop)
    parent: "Loop | None" = None


def _nvdisasm() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm")


def disassemble(cubin: bytes) -> tuple[list[Instr], dict]:
    """(instructions in address order, {label: address}) of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_nvdisasm(), "-g", "-c", f.name], capture_output=True, text=True, check=True).stdout
    return parse(text)


def parse(text: str) -> tuple[list[Instr], dict]:
    instrs, labels, pending, file, line = [], {}, [], None, None
    for raw in text.splitlines():
        if m := _LINE.search(raw):
            file, line = m.group(1), int(m.group(2))
        elif m := _LABEL.match(raw):
            pending.append(m.group(1))
        elif m := _INSTR.search(raw):
            addr, body = int(m.group(1), 16), m.group(2).strip()
            for label in pending:
                labels[label] = addr
            pending = []
            target = _TARGET.search(body)
            instrs.append(Instr(addr, _PRED.sub("", body).split()[0], body, bool(_PRED.match(body)), file, line,
                                target.group(1) if target else None))
    for label in pending:  # a label after the last instruction (the function's end)
        labels[label] = instrs[-1].addr + 16
    return instrs, labels


def _is_jump(ins: Instr) -> bool:
    """BRA, or CALL.REL.NOINC to a label of the kernel: ptxas leaves some loops that way (``@P
    CALL.REL.NOINC .L_x_2``, nothing returns to it); a CALL.REL.NOINC to a subroutine (the
    shuffle fallback's ``$__internal_..._shflsync``) returns and falls through."""
    return ins.op.startswith("BRA") or (ins.op.startswith("CALL.REL.NOINC") and ins.target is not None)


def _is_branch(ins: Instr) -> bool:
    return ((ins.op.startswith(("BRA", "EXIT", "RET", "BRX", "JMP")) or _is_jump(ins))
            and not ins.op.startswith("BRA.CONV"))


def blocks(instrs: list[Instr], labels: dict) -> list[Block]:
    """Basic blocks with their successors: a branch's target (WARPSYNC/BSSY targets are not
    control flow) and, unless the branch is unconditional, the next block."""
    by_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        if _is_jump(ins) and ins.target in labels and labels[ins.target] in by_addr:
            leaders.add(by_addr[labels[ins.target]])
        if _is_branch(ins) and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    block_of = {}
    out = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(instrs)
        out.append(Block(n, instrs[start:end]))
        block_of[start] = n
    for blk in out:
        last = blk.instrs[-1]
        nxt = blk.index + 1 if blk.index + 1 < len(out) else None
        falls = not _is_branch(last) or last.predicated or last.op.startswith("BRA.DIV")
        if falls and nxt is not None:
            blk.succs.append(nxt)
        if _is_jump(last) and last.target in labels and labels[last.target] in by_addr:
            dest = block_of[by_addr[labels[last.target]]]
            (blk.div_succs if last.op.startswith("BRA.DIV") else blk.succs).append(dest)
    return out


def reachable(blks: list[Block], with_div: bool) -> set:
    """Blocks reachable from the entry (through BRA.DIV edges too, or not)."""
    seen, stack = {0}, [0]
    while stack:
        b = blks[stack.pop()]
        for s in b.succs + (b.div_succs if with_div else []):
            if s not in seen:
                seen.add(s)
                stack.append(s)
    return seen


def dominators(blks: list[Block]) -> list[set]:
    """dom[b]: the blocks that dominate b (iterative data-flow; unreachable blocks: all)."""
    preds = [[] for _ in blks]
    for b in blks:
        for s in b.succs + b.div_succs:
            preds[s].append(b.index)
    every = set(range(len(blks)))
    dom = [every.copy() for _ in blks]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in blks[1:]:
            ps = [dom[p] for p in preds[b.index]]
            new = (set.intersection(*ps) if ps else set()) | {b.index}
            if new != dom[b.index]:
                dom[b.index], changed = new, True
    return dom


def back_edges(blks: list[Block]) -> list[tuple[int, int]]:
    """(tail, head) edges whose head dominates the tail: one per loop latch."""
    dom = dominators(blks)
    return [(b.index, s) for b in blks for s in b.succs + b.div_succs if s in dom[b.index]]


def retreating_branches(instrs: list[Instr], labels: dict) -> list[tuple[int, int]]:
    """(branch address, target address) of every branch to an earlier or equal address: what a
    loop finder reading addresses alone takes for loops."""
    return [(ins.addr, labels[ins.target]) for ins in instrs
            if _is_jump(ins) and ins.target in labels and labels[ins.target] <= ins.addr]


def natural_loops(blks: list[Block]) -> list[Loop]:
    """One loop per head (back edges sharing a head merged), outermost first, with parents."""
    preds = [[] for _ in blks]
    for b in blks:
        for s in b.succs + b.div_succs:
            preds[s].append(b.index)
    heads: dict[int, Loop] = {}
    for tail, head in back_edges(blks):
        loop = heads.setdefault(head, Loop(head, [], {head}))
        loop.tails.append(tail)
        stack = [tail]
        while stack:
            n = stack.pop()
            if n not in loop.body:
                loop.body.add(n)
                stack += preds[n]
    loops = sorted(heads.values(), key=lambda lp: -len(lp.body))
    for i, loop in enumerate(loops):
        enclosing = [o for o in loops[:i] if loop.body < o.body]
        loop.parent = min(enclosing, key=lambda o: len(o.body)) if enclosing else None
    return loops


def own_blocks(loop: Loop, loops: list[Loop]) -> set:
    """The loop's blocks outside its inner loops."""
    inner = set().union(*[lp.body for lp in loops if lp.parent is loop])
    return loop.body - inner
