"""The networks: output shapes, the projection head, the released widths, clear errors, the
configurable dropout, global batch norm across ranks, deterministic-mode upsampling."""
import copy
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.multiprocessing as mp
import torch.nn.functional as F

from dycon.networks import (GlobalBatchNorm, UNet3D, _upsample_trilinear_matmul, build_model,
                            convert_sync_batchnorm, upsample_trilinear)

TINY = dict(in_channels=1, num_classes=2, base_filters=4, embed_dim=16)


@pytest.mark.parametrize("arch", ["unet3d", "vnet"])
@pytest.mark.parametrize("scaler", [2, 4])
def test_shapes_and_unit_embeddings(arch, scaler):
    model = build_model(dict(arch=arch, feature_scaler=scaler, **TINY))
    x = torch.randn(2, 1, 32, 32, 48)
    logits, emb = model(x)
    assert logits.shape == (2, 2, 32, 32, 48)
    grid = [s * scaler // 16 for s in (32, 32, 48)]
    assert emb.shape == (2, grid[0] * grid[1] * grid[2], 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(emb.shape[:2]))
    (logits.mean() + emb.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_released_unet_widths():
    model = build_model(dict(arch="unet3d", in_channels=1, num_classes=2, feature_scaler=2, base_filters=16))
    assert [enc[0].out_channels for enc in model.encoders] == [16, 32, 64, 128, 256]
    head = [m for m in model.head.proj if isinstance(m, torch.nn.Conv3d)]
    assert (head[0].in_channels, head[0].out_channels, head[1].out_channels) == (256, 512, 256)
    assert isinstance(model.encoders[0][1], torch.nn.InstanceNorm3d)
    assert model.dropout.p == 0.3


def test_multichannel_and_multiclass():
    model = UNet3D(in_channels=3, num_classes=4, base_filters=4, embed_dim=8)
    logits, emb = model(torch.randn(1, 3, 32, 32, 32))
    assert logits.shape == (1, 4, 32, 32, 32) and emb.shape == (1, 64, 8)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="model.arch"):
        build_model(dict(arch="unet2d", **TINY))
    with pytest.raises(ValueError, match="unknown model key"):
        build_model(dict(arch="unet3d", filters=3, **TINY))
    with pytest.raises(ValueError, match="feature_scaler"):
        build_model(dict(arch="unet3d", feature_scaler=3, **TINY))
    with pytest.raises(ValueError, match="divisible by 16"):
        build_model(dict(arch="unet3d", **TINY))(torch.randn(1, 1, 24, 32, 32))


@pytest.mark.parametrize("arch,default", [("unet3d", 0.3), ("vnet", 0.5)])
def test_dropout_is_configurable(arch, default):
    def dropout_rates(model):
        return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}

    for unset in ({}, {"dropout": None}):
        assert dropout_rates(build_model(dict(arch=arch, feature_scaler=2, **unset, **TINY))) == {default}
    model = build_model(dict(arch=arch, feature_scaler=2, dropout=0.0, **TINY))
    assert dropout_rates(model) == {0.0}
    # without dropout a training-mode forward no longer depends on the random stream
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    for a, b in zip(first, model(x)):
        assert torch.equal(a, b)


def test_released_initialisation():
    torch.manual_seed(0)
    model = build_model(dict(TINY, arch="vnet", base_filters=8, init="released"))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.weight[0].numel() >= 512]
    for conv in convs:   # Kaiming normal, fan-in: std sqrt(2 / fan_in)
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.15)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    weights = torch.cat([bn.weight for bn in bns])
    assert abs(weights.mean().item() - 1) < 0.01 and 0.015 < weights.std().item() < 0.025
    assert all(torch.equal(bn.bias, torch.zeros_like(bn.bias)) for bn in bns)
    default = build_model(dict(TINY, arch="vnet", base_filters=8))
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in default.modules()
               if isinstance(bn, torch.nn.BatchNorm3d))   # PyTorch's default: ones
    assert convs and bns


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3), (1, 2, 6, 1, 7)])
def test_matmul_upsampling_equals_interpolate(shape, scale, align_corners):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, scale_factor=scale, mode="trilinear", align_corners=align_corners)
    got = _upsample_trilinear_matmul(x, scale, align_corners)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad_out = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad(expected, x, grad_out)
    (grad_got,) = torch.autograd.grad(got, x, grad_out)
    torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-12)


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic algorithms on for one test (cuBLAS needs its workspace setting for that)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def test_upsampling_off_cuda_is_interpolate(deterministic):
    x = torch.randn(1, 2, 3, 4, 5)
    for align_corners in (False, True):
        assert torch.equal(upsample_trilinear(x, 2, align_corners),
                           F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=align_corners))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deterministic_cuda_backward_matches_default(deterministic):
    model = build_model(dict(arch="unet3d", feature_scaler=2, dropout=0.0, **TINY)).cuda().double()
    x = torch.randn(2, 1, 32, 32, 32, device="cuda", dtype=torch.float64)
    logits, emb = model(x)
    (logits.square().mean() + emb.sum()).backward()   # F.interpolate's CUDA backward would raise here
    grads = [p.grad.clone() for p in model.parameters()]
    torch.use_deterministic_algorithms(False)
    model.zero_grad()
    logits, emb = model(x)
    (logits.square().mean() + emb.sum()).backward()
    for got, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_convert_sync_batchnorm_keeps_state_and_single_process_output():
    model = build_model(dict(arch="vnet", feature_scaler=2, dropout=0.0, **TINY))   # batch norm throughout
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):   # non-trivial state, so that carrying it over is tested
            for t in (m.weight, m.bias, m.running_mean):
                t.data.normal_()
            m.running_var.data.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(3)
    reference = copy.deepcopy(model)
    converted = convert_sync_batchnorm(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm3d) for m in reference.modules())
    assert n_bn > 2 and sum(isinstance(m, GlobalBatchNorm) for m in converted.modules()) == n_bn
    _assert_same_state(reference, converted)
    # outside a process group it is plain batch norm: training (batch statistics, running
    # updates) and eval (running statistics) alike
    x = torch.randn(2, 1, 32, 32, 32)
    for mode in (True, False):
        for a, b in zip(reference.train(mode)(x), converted.train(mode)(x)):
            assert torch.equal(a, b)
    _assert_same_state(reference, converted)


# Float64 rounding of inputs near 1e4 is ~2e-12, and the gradients sum ~100 such terms; a
# one-pass variance would be off by ~1e-9.
GLOBAL_BN_TOL = dict(rtol=1e-10, atol=1e-11)


def _global_bn_worker(rank: int, world_size: int, init_file: str) -> None:
    """One rank of test_global_batchnorm_equals_full_batch_norm."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)                      # same data and layers on both ranks
        sizes = [2, 3]                            # uneven: the global count must come from the ranks
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        for momentum in (0.1, None):              # exponential and cumulative running averages
            full = torch.nn.BatchNorm3d(3, momentum=momentum).double()
            full.weight.data.normal_()
            full.bias.data.normal_()
            bn = convert_sync_batchnorm(copy.deepcopy(full))
            for _ in range(2):                    # running statistics accumulate over steps
                _check_global_step(full, bn, sum(sizes), lo, hi, world_size)
            # eval mode uses the running statistics and communicates nothing: rank 0 alone
            x = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64)
            if rank == 0:
                torch.testing.assert_close(bn.eval()(x), full.eval()(x), **GLOBAL_BN_TOL)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_global_step(full, bn, batch, lo, hi, world_size):
    """One training step on the whole batch (``full``) and on this rank's rows ``lo:hi`` (``bn``)."""
    # a mean far from 0 relative to the spread, so that a one-pass E[x^2] - E[x]^2 variance fails
    x = 3 * torch.randn(batch, 3, 4, 3, 2, dtype=torch.float64) + 1e4
    w = torch.randn_like(x)                       # loss weights: a non-trivial output gradient
    x_full = x.clone().requires_grad_()
    y_full = full(x_full)
    (y_full * w).sum().backward()

    x_rank = x[lo:hi].clone().requires_grad_()
    y_rank = bn(x_rank)
    # every rank holds the same global loss, the sum of the ranks' shares
    dist_fn.all_reduce((y_rank * w[lo:hi]).sum()).backward()

    torch.testing.assert_close(y_rank, y_full[lo:hi], **GLOBAL_BN_TOL)
    # All world_size ranks seed the backward of their copy of the global loss L and the
    # all_reduce backward sums those seeds, so each rank back-propagates world_size * L:
    # its input gradient is world_size times the exact one ...
    torch.testing.assert_close(x_rank.grad, world_size * x_full.grad[lo:hi], **GLOBAL_BN_TOL)
    # ... and its weight/bias gradients are world_size times its rows' share of dL/dweight, so
    # their average over the ranks (what DistributedDataParallel applies) is exactly dL/dweight.
    for p_rank, p_full in ((bn.weight, full.weight), (bn.bias, full.bias)):
        averaged = p_rank.grad.clone()
        dist.all_reduce(averaged)
        torch.testing.assert_close(averaged / world_size, p_full.grad, **GLOBAL_BN_TOL)
        p_rank.grad = p_full.grad = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(full, name), **GLOBAL_BN_TOL)


def test_global_batchnorm_equals_full_batch_norm(tmp_path):
    """Two gloo processes on the CPU, each with its part of one batch, against one process
    with plain batch norm on the whole batch: outputs, gradients, running statistics."""
    mp.spawn(_global_bn_worker, args=(2, str(tmp_path / "store")), nprocs=2)
