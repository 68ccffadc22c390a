"""The Hopper (sm90a: wgmma + TMA) backward, through autograd, against the fp32 reference with
FlashAttention's rule (grads within 3x the error of torch in low precision, +1e-5 where rows are
masked). FLASH_ATTENTION_BWD_PATH=sm90 is set for every test, so a call the sm90 backward does not
serve raises (with its reason) instead of quietly running the sm80 kernel: each passing case ran on
the sm90 path. Fresh random inputs per case; the allocator is left full of NaN before each backward.
Skipped unless the GPU is sm90 and the op library was built with 90a."""

import pytest
import torch

import flash_attention as fa
import _util
from test_cuda_backward import assert_repeatable, autograd_grads, check_grads, poison_pool, reference_grads

pytestmark = pytest.mark.gpu
DEV = "cuda"
SM90_BWD_HEAD_DIMS = (64, 128, 256)  # src/cuda/sm90/bwd_dispatch.h: kBwdHeadDims
SPECIALISATIONS = (32, 64, 96, 128, 192, 256)


@pytest.fixture(autouse=True)
def on_sm90_path(monkeypatch):
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm90 (Hopper) GPU")
    info = fa.build_info()
    if not info["cuda_built"] or 90 not in info["archs"]:
        pytest.skip("the op library was built without the sm90 path (FLASH_ATTENTION_CUDA_ARCHS without 90a)")
    monkeypatch.setenv("FLASH_ATTENTION_BWD_PATH", "sm90")


def need(d, dtype):
    """Skip unless the build has an sm90 backward kernel for head dim d and dtype."""
    _util.skip_unless_dtype_built(dtype)
    info = fa.build_info()
    spec = next((s for s in SPECIALISATIONS if s >= d and s in info["head_dims"]), None)
    if spec not in SM90_BWD_HEAD_DIMS:
        pytest.skip(f"head dim {d} is served by the {spec} specialisation, which has no sm90 backward")


def qkv(b, sq, sk, h, hk, d, dtype=torch.bfloat16):
    return _util.qkv(b, sq, sk, h, hk, d, dtype=dtype, device=DEV)


def run_and_check(q, k, v, **options):
    _, dout, ours = autograd_grads(fa.flash_attn_func, q, k, v, **options)
    check_grads(ours, q, k, v, dout, **options)


SEQLENS = [(1, 1), (113, 203), (128, 128), (512, 256), (1023, 1024), (1, 1023)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_sweep(d, seqlens, causal, dtype):
    need(d, dtype)
    b, h = (1, 2) if seqlens[0] * seqlens[1] >= 1 << 20 else (2, 3)
    run_and_check(*qkv(b, *seqlens, h, h, d, dtype), causal=causal)


@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (6, 1)], ids=lambda t: f"h{t[0]}hk{t[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa(d, causal, heads):
    need(d, torch.bfloat16)
    h, hk = heads
    run_and_check(*qkv(2, 333, 517, h, hk, d), causal=causal)


@pytest.mark.parametrize("window", [(64, 0), (32, 48), (-1, 17), (100, -1)], ids=str)
@pytest.mark.parametrize("seqlens", [(300, 300), (129, 400), (400, 129)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("d", [64, 256])
def test_window(d, seqlens, window):
    need(d, torch.bfloat16)
    run_and_check(*qkv(2, *seqlens, 2, 2, d), window_size=window)


@pytest.mark.parametrize("d", [40, 80, 120, 200, 248])
def test_padded_head_dims(d):
    """Head dims below the kernel's: TMA zero-fills the missing columns, the stores skip them."""
    need(d, torch.bfloat16)
    run_and_check(*qkv(2, 177, 139, 2, 2, d), causal=True)


def test_packed_and_transposed_strides():
    """qkv-packed views and (B, H, S, D)-contiguous tensors reach the kernel as strided views."""
    need(128, torch.bfloat16)
    b, s, h, d = 2, 301, 4, 128
    packed = torch.randn(b, s, 3, h, d, device=DEV, dtype=torch.bfloat16)
    lqkv = packed.clone().requires_grad_()
    out = fa.flash_attn_qkvpacked_func(lqkv, causal=True, backend="cuda")
    dout = torch.randn_like(out)
    poison_pool(lqkv)
    (out * dout).sum().backward()
    check_grads(lqkv.grad.unbind(2), *packed.unbind(2), dout, causal=True)

    q, k, v = (torch.randn(2, 3, n, d, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for n in (250, 190, 190))
    run_and_check(q, k, v, causal=True)


@pytest.mark.parametrize("d", [128, 256])
def test_large_scores_stay_finite(d):
    need(d, torch.bfloat16)
    q, k, v = qkv(2, 300, 300, 2, 2, d)
    q, k = q * 12, k * 12
    _, dout, ours = autograd_grads(fa.flash_attn_func, q, k, v, causal=True)
    assert all(torch.isfinite(g).all() for g in ours)
    check_grads(ours, q, k, v, dout, causal=True)


@pytest.mark.parametrize("d", [128, 256])
def test_agrees_with_sm80_backward(d, monkeypatch):
    """Both CUDA backwards compute the same function: each within 3x the low-precision error of the other."""
    need(d, torch.bfloat16)
    q, k, v = qkv(2, 700, 900, 4, 2, d)
    dout = torch.randn_like(q)

    def grads():
        return autograd_grads(fa.flash_attn_func, q, k, v, dout, causal=True)[2]

    ours = grads()
    monkeypatch.setenv("FLASH_ATTENTION_BWD_PATH", "sm80")
    theirs = grads()
    ref32 = reference_grads(q, k, v, dout, causal=True)
    ref16 = reference_grads(q, k, v, dout, upcast=False, causal=True)
    for a, b, r32, r16 in zip(ours, theirs, ref32, ref16):
        assert _util.max_err(a, b) <= 3 * _util.max_err(r16, r32) + 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_deterministic(d, causal):
    """deterministic=True: the key blocks add into each dQ tile in a fixed order, so 50 calls give
    bitwise-identical gradients (many key blocks per tile, GQA: several heads per CTA)."""
    need(d, torch.float16)
    q, k, v = qkv(2, 1100, 1500, 8, 2, d, torch.float16)
    dout = torch.randn_like(q)

    first = assert_repeatable(
        lambda: autograd_grads(fa.flash_attn_func, q, k, v, dout, causal=causal, deterministic=True)[2], 50)
    check_grads(first, q, k, v, dout, causal=causal)


# Calls the sm90 backward declines: under FLASH_ATTENTION_BWD_PATH=sm90 they raise with the reason,
# under auto they run on the sm80 backward (covered by test_cuda_backward.py).
DECLINED = [
    (dict(softcap=5.0), "softcap"),
    (dict(deterministic=True, window_size=(16, 0)), "deterministic"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(alibi_slopes="slopes"), "alibi"),
]


@pytest.mark.parametrize("options,reason", DECLINED, ids=[r for _, r in DECLINED])
def test_declined_calls_name_the_reason(options, reason, monkeypatch):
    need(64, torch.bfloat16)
    q, k, v = qkv(1, 64, 64, 2, 2, 64)
    if options.get("alibi_slopes") == "slopes":
        options = dict(alibi_slopes=torch.rand(2, device=DEV))
    with pytest.raises(NotImplementedError, match=f"sm90 backward: {reason}"):
        autograd_grads(fa.flash_attn_func, q, k, v, **options)
    monkeypatch.setenv("FLASH_ATTENTION_BWD_PATH", "auto")
    _, _, grads = autograd_grads(fa.flash_attn_func, q, k, v, **options)
    assert all(torch.isfinite(g).all() for g in grads)


def test_declined_varlen_and_head_dim(monkeypatch):
    need(64, torch.bfloat16)
    q, k, v, cu_q, cu_k, max_q, max_k = _util.varlen_qkv([5, 70], [9, 64], 2, 2, 64, dtype=torch.bfloat16,
                                                          device=DEV)
    fn = lambda q, k, v, **o: fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **o)
    with pytest.raises(NotImplementedError, match="sm90 backward: varlen"):
        autograd_grads(fn, q, k, v)
    if 96 in fa.build_info()["head_dims"]:
        with pytest.raises(NotImplementedError, match="sm90 backward: head_dim 96"):
            autograd_grads(fa.flash_attn_func, *qkv(1, 64, 64, 1, 1, 96))


def test_bad_path_variable_is_named(monkeypatch):
    monkeypatch.setenv("FLASH_ATTENTION_BWD_PATH", "fastest")
    q, k, v = qkv(1, 64, 64, 2, 2, 64)
    with pytest.raises(ValueError, match="FLASH_ATTENTION_BWD_PATH"):
        autograd_grads(fa.flash_attn_func, q, k, v)
