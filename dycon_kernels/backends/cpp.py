"""The C++ extension backends ('cpu' and 'cuda'): the dispatcher picks the kernel by device."""
import torch

from dycon_kernels.backends import extension_state

if extension_state().module is None:  # loading it registers torch.ops.dycon_C
    raise ImportError(extension_state().explanation)

_ops = torch.ops.dycon_C


def uncl_forward(s, t, beta, weight, reduce):
    return _ops.uncl_forward(s, t, beta, weight, reduce)


def uncl_forward_grad(s, t, beta, weight, reduction, need_t_grad):
    """CPU tensors only (the op has no CUDA kernel): -> (loss, ds, dt), dt empty unless need_t_grad
    (csrc/ops.cpp says what each is)."""
    return tuple(_ops.uncl_forward_grad(s, t, beta, weight, reduction, need_t_grad))


def uncl_backward(grad, s, t, beta, weight, need_t_grad):
    ds, dt = _ops.uncl_backward(grad, s, t, beta, weight, need_t_grad)
    return ds, (dt if need_t_grad else None)


# ---- FeCL (docs/fecl_kernels.md, "Entry points") -------------------------------------------------

_TEACHER_MODE = {None: 0, "none": 0, "topk": 1, "threshold": 2}


def _fecl_cfg(cfg):
    """FeclConfig -> the op's scalar arguments (attribute access only)."""
    teacher = cfg.teacher
    if teacher not in _TEACHER_MODE:
        raise ValueError(f"unknown FeCL teacher mode {teacher!r}; choose 'none', 'topk' or 'threshold'")
    thr = cfg.teacher_threshold
    return (float(cfg.tau), float(cfg.gamma_pos), float(cfg.gamma_neg), int(cfg.top_k or 0),
            bool(cfg.column_shift), _TEACHER_MODE[teacher], int(cfg.teacher_top_k or 0),
            float(thr) if thr is not None else 0.0)


def fecl_forward(z, y, zt, yt, u, cfg):
    """-> (loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx)."""
    return tuple(_ops.fecl_forward(z, y, zt, yt, u, *_fecl_cfg(cfg)))


def fecl_backward(grad_loss, grad_cross, z, y, zt, yt, u, log_neg, r, n_pos, col_shift, topk_idx,
                  teacher_idx, cfg):
    """-> dz, in z's dtype."""
    return _ops.fecl_backward(grad_loss, grad_cross, z, y, zt, yt, u, log_neg, r, n_pos, col_shift,
                              topk_idx, teacher_idx, *_fecl_cfg(cfg))
