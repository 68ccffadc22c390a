"""Test helpers: random inputs, the math reference and FlashAttention's tolerance rule."""

import pytest
import torch

import flash_attention
from flash_attention import reference


def rand(*shape, dtype=torch.float32, device="cpu", grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def qkv(b, sq, sk, h, hk, d, dtype=torch.float32, device="cpu", grad=False):
    return (rand(b, sq, h, d, dtype=dtype, device=device, grad=grad),
            rand(b, sk, hk, d, dtype=dtype, device=device, grad=grad),
            rand(b, sk, hk, d, dtype=dtype, device=device, grad=grad))


def cu_seqlens(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def varlen_qkv(lengths_q, lengths_k, h, hk, d, dtype=torch.float32, device="cpu", grad=False):
    q = rand(sum(lengths_q), h, d, dtype=dtype, device=device, grad=grad)
    k = rand(sum(lengths_k), hk, d, dtype=dtype, device=device, grad=grad)
    v = rand(sum(lengths_k), hk, d, dtype=dtype, device=device, grad=grad)
    return q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device), max(lengths_q), max(lengths_k)


def ref(q, k, v, *varlen, upcast=True, **options):
    """Reference (out, lse) with flash_attn_func-style options (window_size, softmax_scale=None)."""
    options.setdefault("softmax_scale", q.shape[-1] ** -0.5)
    if options["softmax_scale"] is None:
        options["softmax_scale"] = q.shape[-1] ** -0.5
    options["window"] = options.pop("window_size", (-1, -1))
    return reference.attention(q, k, v, *varlen, upcast=upcast, **options)


def poison_(t):
    """Fill with NaN so an output a backend forgets to write is caught."""
    return t.fill_(float("nan"))


def max_err(a, b):
    a, b = a.float(), b.float()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "non-finite entries differ"
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def assert_fa_close(ours, ref_fp32, ref_lowp, factor=2.0, slack=1e-5):
    """FlashAttention's rule: max|ours - fp32 ref| <= factor * max|torch low precision - fp32 ref| + slack."""
    err, base = max_err(ours, ref_fp32), max_err(ref_lowp, ref_fp32)
    assert err <= factor * base + slack, f"max error {err:.3g} > {factor} x {base:.3g} + {slack}"


def grads(loss_fn, *tensors):
    for t in tensors:
        t.grad = None
    loss_fn().backward()
    return [t.grad.clone() for t in tensors]


def skip_unless_dtype_built(dtype):
    """Skip the test when the op library has no CUDA kernels for `dtype` (FLASH_ATTENTION_DTYPES)."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    if name is not None and name not in flash_attention.build_info()["dtypes"]:
        pytest.skip(f"{name} kernels not built (FLASH_ATTENTION_DTYPES)")
