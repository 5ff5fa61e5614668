"""The C++ extension backends ('cpu' and 'cuda'): the dispatcher picks the kernel by device."""
import torch

import dycon_kernels._C  # noqa: F401  (registers torch.ops.dycon_C)

_ops = torch.ops.dycon_C


def uncl_forward(s, t, beta, weight, reduce):
    return _ops.uncl_forward(s, t, beta, weight, reduce)


def uncl_backward(grad, s, t, beta, weight, need_t_grad):
    ds, dt = _ops.uncl_backward(grad, s, t, beta, weight, need_t_grad)
    return ds, (dt if need_t_grad else None)
