"""UnCL in Triton: one program owns a block of voxels of one volume and loads all C channels.

The loss is bandwidth-bound (a few flops per byte), so the kernels read each logit once per
pass, keep everything else in registers and write nothing but the result: the forward writes
one partial sum per program (or the voxel map for reduction='none'), the backward writes the
gradients. The math mirrors csrc/uncl_math.h.
"""
import torch
import triton
import triton.language as tl

from dycon_kernels.backends import new_output

EPS = tl.constexpr(1e-6)


def compute_dtype(dtype):
    """float64 inputs are computed in float64 (gradcheck), everything else in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_sizes(C: int):
    """(BLOCK_C, BLOCK_V): all classes in one tile, about 4096 logits per program."""
    block_c = triton.next_power_of_2(C)
    return block_c, max(16, 4096 // block_c)


@triton.jit
def _softmax_entropy(x, cmask):
    """Softmax over axis 0 of a (BLOCK_C, BLOCK_V) tile, and its entropy -sum p log(p + eps)."""
    x = tl.where(cmask, x, float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0)[None, :])
    p = e / tl.sum(e, axis=0)[None, :]
    return p, -tl.sum(p * tl.log(p + EPS), axis=0)


@triton.jit
def _load_voxels(S, T, C, V, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    """Offsets, masks and float32 logits of this program's voxels (layout (B, C, V))."""
    b = tl.program_id(1).to(tl.int64)
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, BLOCK_C)
    vmask = offs_v < V
    cmask = (offs_c < C)[:, None]
    offs = b * C * V + offs_c[:, None] * V + offs_v[None, :]
    mask = cmask & vmask[None, :]
    # Columns past V load as zeros: a harmless softmax that is never stored.
    s = tl.load(S + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
    return b * V + offs_v, vmask, offs, mask, cmask, s, t


@triton.jit
def _voxel_terms(s, t, cmask, beta):
    """p, q, Hs, Ht, D = sum (p - q)^2, W = 1/(e^{beta Hs} + e^{beta Ht}), share_s = e^{beta Hs} W."""
    p, h_s = _softmax_entropy(s, cmask)
    q, h_t = _softmax_entropy(t, cmask)
    d = tl.sum((p - q) * (p - q), axis=0)
    bs = beta * h_s
    bt = beta * h_t
    m = tl.maximum(bs, bt)
    es = tl.exp(bs - m)
    et = tl.exp(bt - m)
    w = tl.exp(-m) / (es + et)
    return p, q, h_s, h_t, d, w, es / (es + et)


@triton.jit
def uncl_forward_kernel(S, T, W, OUT, C, V, beta, HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    voxel, vmask, offs, mask, cmask, s, t = _load_voxels(S, T, C, V, ACC, BLOCK_C, BLOCK_V)
    p, q, h_s, h_t, d, w, share_s = _voxel_terms(s, t, cmask, beta)
    loss = d * w + beta * (h_s + h_t)
    if HAS_WEIGHT:
        loss = loss * tl.load(W + voxel, mask=vmask, other=0.0)
    if REDUCE:
        partial = tl.sum(tl.where(vmask, loss, 0.0), axis=0)
        tl.store(OUT + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), partial)
    else:
        tl.store(OUT + voxel, loss, mask=vmask)


@triton.jit
def _side_grad(x, y, cmask, w, coef_h, g):
    """g * d l / d logits of one side: x its probabilities, y the other side's (uncl_math.h)."""
    dldx = 2.0 * (x - y) * w[None, :] + coef_h[None, :] * -(tl.log(x + EPS) + x / (x + EPS))
    dldx = tl.where(cmask, dldx, 0.0)
    dot = tl.sum(x * dldx, axis=0)
    return g[None, :] * x * (dldx - dot[None, :])


@triton.jit
def uncl_backward_kernel(G, S, T, W, DS, DT, C, V, beta, GRAD_IS_MAP: tl.constexpr,
                         HAS_WEIGHT: tl.constexpr, NEED_T_GRAD: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    voxel, vmask, offs, mask, cmask, s, t = _load_voxels(S, T, C, V, ACC, BLOCK_C, BLOCK_V)
    p, q, h_s, h_t, d, w, share_s = _voxel_terms(s, t, cmask, beta)
    if GRAD_IS_MAP:
        g = tl.load(G + voxel, mask=vmask, other=0.0).to(ACC)
    else:
        g = tl.zeros_like(d) + tl.load(G).to(ACC)
    if HAS_WEIGHT:
        g = g * tl.load(W + voxel, mask=vmask, other=0.0)
    ds = _side_grad(p, q, cmask, w, beta * (1.0 - d * w * share_s), g)
    tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
    if NEED_T_GRAD:
        dt = _side_grad(q, p, cmask, w, beta * (1.0 - d * w * (1.0 - share_s)), g)
        tl.store(DT + offs, dt.to(DT.dtype.element_ty), mask=mask)


def _grid(B, V, block_v):
    return (triton.cdiv(V, block_v), B)


def uncl_forward(s, t, beta, weight, reduce):
    B, C, V = s.shape
    block_c, block_v = block_sizes(C)
    grid = _grid(B, V, block_v)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    out = new_output(grid[0] * grid[1] if reduce else (B, V), acc, s.device)
    uncl_forward_kernel[grid](s, t, weight, out, C, V, float(beta), HAS_WEIGHT=weight is not None,
                              REDUCE=reduce, ACC=compute_dtype(s.dtype), BLOCK_C=block_c, BLOCK_V=block_v)
    return out.sum() if reduce else out


def uncl_backward(grad, s, t, beta, weight, need_t_grad):
    B, C, V = s.shape
    block_c, block_v = block_sizes(C)
    grad = grad.contiguous()
    ds = new_output(s.shape, s.dtype, s.device)
    dt = new_output(t.shape, t.dtype, t.device) if need_t_grad else None
    uncl_backward_kernel[_grid(B, V, block_v)](
        grad, s, t, weight, ds, dt, C, V, float(beta), GRAD_IS_MAP=grad.dim() > 0,
        HAS_WEIGHT=weight is not None, NEED_T_GRAD=need_t_grad, ACC=compute_dtype(s.dtype), BLOCK_C=block_c, BLOCK_V=block_v)
    return ds, dt


def launch_configs(full: bool = False):
    """(kernel, signature, constexprs) triples that this module launches, for the GPU-compile test.

    By default every flag combination in float32 for two channel tilings, plus each other dtype
    once; ``full=True`` lists every dtype x tiling x flag combination (slow to compile).
    """
    configs = []
    for dtype in ("fp32", "fp16", "bf16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        ACC = tl.float64 if dtype == "fp64" else tl.float32
        for C in ((2, 4, 5) if full else (2, 5)):
            block_c, block_v = block_sizes(C)
            flags_fwd = [(w, r) for w in (False, True) for r in (False, True)]
            flags_bwd = [(m, w, n) for m in (False, True) for w in (False, True) for n in (False, True)]
            if dtype != "fp32" and not full:
                if C != 2:
                    continue
                flags_fwd, flags_bwd = flags_fwd[-1:], flags_bwd[-1:]
            for has_w, reduce in flags_fwd:
                sig = {"S": f"*{dtype}", "T": f"*{dtype}", "W": "*fp32", "OUT": f"*{acc}",
                       "C": "i32", "V": "i32", "beta": "fp32"}
                configs.append((uncl_forward_kernel, sig, dict(HAS_WEIGHT=has_w, REDUCE=reduce, ACC=ACC,
                                                               BLOCK_C=block_c, BLOCK_V=block_v)))
            for grad_map, has_w, need_t in flags_bwd:
                sig = {"G": f"*{acc}", "S": f"*{dtype}", "T": f"*{dtype}", "W": "*fp32",
                       "DS": f"*{dtype}", "DT": f"*{dtype}", "C": "i32", "V": "i32", "beta": "fp32"}
                configs.append((uncl_backward_kernel, sig, dict(
                    GRAD_IS_MAP=grad_map, HAS_WEIGHT=has_w, NEED_T_GRAD=need_t, ACC=ACC,
                    BLOCK_C=block_c, BLOCK_V=block_v)))
    return configs
