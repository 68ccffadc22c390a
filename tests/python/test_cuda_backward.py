"""The CUDA backward kernels, through autograd, against the fp32 reference with FlashAttention's rule:

    max |our grad - fp32 reference grad| <= 3 x max |torch-in-low-precision grad - fp32 reference grad|

(+1e-5: the gradient of a masked row, or of a 1-key softmax, is ~0 in every precision). Fresh random
inputs for every case; the caching allocator is left full of NaN before each call so that an element
the kernels forget to write shows up. Also: determinism (50 repeats, bitwise), large inputs (no
inf/NaN), agreement with the CPU backward. Skipped without a GPU or without CUDA kernels.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import flash_attention

import _util

pytestmark = pytest.mark.gpu

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
HDIMS = [32, 64, 96, 128, 192, 256]
SEQLENS = [(1, 1), (113, 203), (128, 217), (512, 256), (1023, 1024), (2048, 2048)]


@pytest.fixture(autouse=True)
def need_cuda_kernels(request):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not flash_attention.build_info()["cuda_built"]:
        pytest.skip("built without CUDA kernels")
    params = getattr(request.node, "callspec", None)
    _util.skip_unless_dtype_built(params.params.get("dtype") if params else None)


def need_hdim(d):
    built = flash_attention.build_info().get("head_dims")
    if not any(b >= d for b in built or []):
        pytest.skip(f"no head dim >= {d} built")


def poison_pool(*tensors):
    """Leave NaN-filled blocks of the gradients' sizes in the caching allocator."""
    blocks = [torch.full_like(t, float("nan")) for t in tensors]
    del blocks


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]


def reference_grads(q, k, v, dout, varlen=(), upcast=True, **options):
    """Gradients of the math reference, in fp32 (upcast) or in the inputs' low precision."""
    lq, lk, lv = leaves(q, k, v, dtype=torch.float32 if upcast else None)
    out, _ = _util.ref(lq, lk, lv, *varlen, upcast=upcast, **options)
    return torch.autograd.grad(out, (lq, lk, lv), dout.to(out.dtype))


def check_grads(ours, q, k, v, dout, varlen=(), **options):
    """`ours` (dq, dk, dv) against both references, FlashAttention's 3x rule."""
    ref32 = reference_grads(q, k, v, dout, varlen, upcast=True, **options)
    ref16 = reference_grads(q, k, v, dout, varlen, upcast=False, **options)
    for name, g, r32, r16 in zip(("dq", "dk", "dv"), ours, ref32, ref16):
        assert g.dtype == q.dtype and g.shape == r32.shape, name
        assert not g.isnan().any(), f"NaN in {name} (an element left unwritten?)"
        try:
            _util.assert_fa_close(g, r32, r16, factor=3.0, slack=1e-5)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def autograd_grads(fn, q, k, v, dout=None, **options):
    """(out, dout, (dq, dk, dv)) of fn(q, k, v, **options, backend='cuda') through loss.backward();
    dout: the output gradient (default: fresh random)."""
    lq, lk, lv = leaves(q, k, v)
    out = fn(lq, lk, lv, backend="cuda", **options)
    dout = torch.randn_like(out) if dout is None else dout
    poison_pool(lq, lk, lv)
    (out * dout).sum().backward()
    return out, dout, (lq.grad, lk.grad, lv.grad)


def assert_repeatable(run, calls):
    """`calls` calls of run() return bitwise-equal tensors; returns the first call's."""
    first = run()
    for _ in range(calls - 1):
        assert all(torch.equal(a, b) for a, b in zip(first, run()))
    return first


def qkv(b, sq, sk, h, hk, d, dtype):
    return _util.qkv(b, sq, sk, h, hk, d, dtype=dtype, device=DEV)


def batch_heads(sq, sk):
    return (1, 2) if sq * sk >= 1 << 20 else (2, 3)


# ---------------------------------------------------------------------------------------------
# The sweep: head dims x lengths x causal x dtype
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("d", HDIMS)
def test_sweep(d, seqlens, causal, dtype):
    need_hdim(d)
    sq, sk = seqlens
    b, h = batch_heads(sq, sk)
    q, k, v = qkv(b, sq, sk, h, h, d, dtype)
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, causal=causal)
    check_grads(ours, q, k, v, dout, causal=causal)


@pytest.mark.parametrize("d", [40, 59, 80, 111, 160, 224])
def test_padded_head_dims(d):
    need_hdim(d)
    q, k, v = qkv(2, 177, 139, 2, 2, d, torch.float16)
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, causal=True)
    check_grads(ours, q, k, v, dout, causal=True)


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("window", [(64, 0), (32, 48), (-1, 17), (100, -1), (0, 0)], ids=str)
@pytest.mark.parametrize("seqlens", [(256, 256), (113, 333), (400, 129)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_window(seqlens, window, dtype):
    q, k, v = qkv(2, *seqlens, 2, 2, 64, dtype)
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, window_size=window)
    check_grads(ours, q, k, v, dout, window_size=window)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_softcap(d, causal):
    q, k, v = qkv(2, 257, 300, 3, 3, d, torch.bfloat16)
    q = q * 4  # scores well into tanh's curved part
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, causal=causal, softcap=5.0)
    check_grads(ours, q, k, v, dout, causal=causal, softcap=5.0)


@pytest.mark.parametrize("per_batch", [False, True], ids=["heads", "batch_heads"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(causal, per_batch):
    b, h = 2, 4
    q, k, v = qkv(b, 200, 310, h, h, 64, torch.float16)
    slopes = torch.rand(b, h, device=DEV) if per_batch else torch.rand(h, device=DEV)
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, causal=causal, alibi_slopes=slopes)
    check_grads(ours, q, k, v, dout, causal=causal, alibi_slopes=slopes)


@pytest.mark.parametrize("heads", [(8, 2), (6, 1), (4, 4)], ids=lambda t: f"h{t[0]}hk{t[1]}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_gqa(d, causal, heads):
    h, hk = heads
    q, k, v = qkv(2, 333, 257, h, hk, d, torch.bfloat16)
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, causal=causal)
    check_grads(ours, q, k, v, dout, causal=causal)


def bwd_op(dout, q, k, v, out, lse, rng_state, *, dropout_p, causal=False, window=(-1, -1), softcap=0.0,
           alibi=None, deterministic=False, varlen=None):
    cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, q.shape[1], k.shape[1])
    poison_pool(q, k, v)
    return torch.ops.flash_attention.bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p,
                                         q.shape[-1] ** -0.5, causal, window[0], window[1], softcap, alibi,
                                         deterministic, rng_state)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("p", [0.17, 0.5])
def test_dropout(p, d, causal):
    """The backward drops exactly what the forward dropped (rng_state from the forward op)."""
    q, k, v = qkv(2, 239, 311, 4, 2, d, torch.float16)
    scale = d ** -0.5
    out, lse, rng_state = torch.ops.flash_attention.fwd(q, k, v, None, None, q.shape[1], k.shape[1], p, scale,
                                                        causal, -1, -1, 0.0, None, "")
    dout = torch.randn_like(out)
    ours = bwd_op(dout, q, k, v, out, lse, rng_state, dropout_p=p, causal=causal)
    check_grads(ours, q, k, v, dout, causal=causal, dropout_p=p, rng_state=rng_state)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_varlen(d, causal):
    lengths_q, lengths_k = [1, 130, 77, 512, 0, 300], [9, 128, 200, 512, 33, 1]
    q, k, v, cu_q, cu_k, max_q, max_k = _util.varlen_qkv(lengths_q, lengths_k, 4, 2, d, dtype=torch.float16,
                                                          device=DEV)
    fn = lambda q, k, v, **o: flash_attention.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **o)
    _, dout, ours = autograd_grads(fn, q, k, v, causal=causal)
    check_grads(ours, q, k, v, dout, (cu_q, cu_k, max_q, max_k), causal=causal)


def test_varlen_dropout_window_alibi():
    lengths_q, lengths_k = [65, 1, 200], [70, 90, 130]
    q, k, v, cu_q, cu_k, max_q, max_k = _util.varlen_qkv(lengths_q, lengths_k, 4, 4, 64, dtype=torch.bfloat16,
                                                          device=DEV)
    slopes = torch.rand(4, device=DEV)
    out, lse, rng_state = torch.ops.flash_attention.fwd(q, k, v, cu_q, cu_k, max_q, max_k, 0.25, 0.125, False,
                                                        40, 10, 0.0, slopes, "")
    dout = torch.randn_like(out)
    ours = bwd_op(dout, q, k, v, out, lse, rng_state, dropout_p=0.25, window=(40, 10), alibi=slopes,
                  varlen=(cu_q, cu_k, max_q, max_k))
    check_grads(ours, q, k, v, dout, (cu_q, cu_k, max_q, max_k), dropout_p=0.25, rng_state=rng_state,
                window_size=(40, 10), alibi_slopes=slopes)


def test_packed_strides():
    """qkv-packed and kv-packed inputs reach the kernels as strided views (no copies)."""
    b, s, h, d = 2, 301, 4, 64
    qkv_t = torch.randn(b, s, 3, h, d, device=DEV, dtype=torch.float16)
    lqkv = qkv_t.clone().requires_grad_()
    out = flash_attention.flash_attn_qkvpacked_func(lqkv, causal=True, backend="cuda")
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    ours = lqkv.grad.unbind(2)
    check_grads(ours, *qkv_t.unbind(2), dout, causal=True)

    q = torch.randn(b, s, h, d, device=DEV, dtype=torch.float16)
    kv = torch.randn(b, 177, 2, 2, d, device=DEV, dtype=torch.float16)
    lq, lkv = leaves(q, kv)
    out = flash_attention.flash_attn_kvpacked_func(lq, lkv, backend="cuda")
    (out * dout).sum().backward()
    check_grads((lq.grad, *lkv.grad.unbind(2)), q, *kv.unbind(2), dout)


def test_transposed_layouts():
    """(B, H, S, D)-contiguous tensors viewed as (B, S, H, D): non-default strides end to end."""
    q, k, v = (torch.randn(2, 3, n, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for n in (250, 190, 190))
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, causal=True)
    check_grads(ours, q, k, v, dout, causal=True)


# ---------------------------------------------------------------------------------------------
# Determinism, large inputs, agreement with the CPU backward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["causal_gqa", "dropout_window", "varlen"])
def test_deterministic(case):
    """deterministic=True: 50 calls give bitwise-identical gradients."""
    if case == "varlen":
        q, k, v, cu_q, cu_k, max_q, max_k = _util.varlen_qkv([700, 1, 1500], [900, 64, 1500], 8, 2, 128,
                                                              dtype=torch.float16, device=DEV)
        varlen = (cu_q, cu_k, max_q, max_k)
    else:
        q, k, v = qkv(2, 1024, 1536, 8, 2, 128, torch.float16)
        varlen = None
    dropout_p, window = (0.2, (256, 64)) if case == "dropout_window" else (0.0, (-1, -1))
    causal = case == "causal_gqa"
    args = () if varlen is None else varlen
    cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, q.shape[1], k.shape[1])
    out, lse, rng_state = torch.ops.flash_attention.fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p,
                                                        q.shape[-1] ** -0.5, causal, *window, 0.0, None, "")
    dout = torch.randn_like(out)
    run = lambda: bwd_op(dout, q, k, v, out, lse, rng_state, dropout_p=dropout_p, causal=causal, window=window,
                         deterministic=True, varlen=varlen)
    first = assert_repeatable(run, 50)
    check_grads(first, q, k, v, dout, args, causal=causal, window_size=window, dropout_p=dropout_p,
                rng_state=rng_state if dropout_p else None)


def test_deterministic_through_autograd():
    q, k, v = qkv(1, 600, 600, 4, 4, 64, torch.bfloat16)
    dout = torch.randn_like(q)

    assert_repeatable(
        lambda: autograd_grads(flash_attention.flash_attn_func, q, k, v, dout, causal=True, deterministic=True)[2], 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_large_inputs(dtype):
    """Big scores (|S| ~ 1e3) stay finite: no inf/NaN in the gradients where the reference has none."""
    q, k, v = qkv(2, 300, 300, 2, 2, 128, dtype)
    q, k = q * 12, k * 12
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, causal=True)
    ref32 = reference_grads(q, k, v, dout, causal=True)
    for g, r in zip(ours, ref32):
        assert torch.isfinite(r).all()
        assert torch.isfinite(g).all()
    check_grads(ours, q, k, v, dout, causal=True)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(50, 20), softcap=3.0)], ids=["causal", "extras"])
def test_matches_cpu_backward(options):
    """The CUDA and CPU backwards compute the same function (both within the rule of the fp32 reference,
    and within 3x the low-precision error of each other)."""
    q, k, v = qkv(2, 190, 250, 4, 2, 64, torch.float16)
    _, dout, ours = autograd_grads(flash_attention.flash_attn_func, q, k, v, **options)
    lq, lk, lv = leaves(q.cpu(), k.cpu(), v.cpu())
    out = flash_attention.flash_attn_func(lq, lk, lv, backend="cpu", **options)
    (out * dout.cpu()).sum().backward()
    cpu = (lq.grad, lk.grad, lv.grad)
    ref32 = reference_grads(q, k, v, dout, **options)
    ref16 = reference_grads(q, k, v, dout, upcast=False, **options)
    for g, c, r32, r16 in zip(ours, cpu, ref32, ref16):
        base = _util.max_err(r16, r32)
        assert _util.max_err(g, c.to(DEV)) <= 3 * base + 1e-5


# ---------------------------------------------------------------------------------------------
# compute-sanitizer racecheck (slow: only with FLASH_ATTENTION_SANITIZE=1)
# ---------------------------------------------------------------------------------------------

SANITIZE_SCRIPT = """
import torch, flash_attention
torch.manual_seed(0)
cases = [(100, 200, 2, 1, 64, True, 0.0, False), (130, 70, 2, 2, 128, False, 0.3, True), (257, 257, 4, 2, 128, True, 0.0, True)]
if 256 in flash_attention.build_info()["head_dims"]:  # the shared-keys tile on sm90
    cases.append((200, 150, 4, 2, 256, True, 0.0, False))
for (sq, sk, h, hk, d, causal, p, det) in cases:
    q = torch.randn(1, sq, h, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, sk, hk, d, device="cuda", dtype=torch.float16) for _ in range(2))
    out, lse, rng = torch.ops.flash_attention.fwd(q, k, v, None, None, sq, sk, p, d ** -0.5, causal, -1, -1, 0.0,
                                                  None, "")
    torch.ops.flash_attention.bwd(torch.randn_like(out), q, k, v, out, lse, None, None, sq, sk, p, d ** -0.5, causal,
                                  -1, -1, 0.0, None, det, rng)
torch.cuda.synchronize()
print("sanitize-script-done")
"""


@pytest.mark.parametrize("tool", ["racecheck", "memcheck"])
def test_compute_sanitizer(tool):
    if os.environ.get("FLASH_ATTENTION_SANITIZE") != "1":
        pytest.skip("set FLASH_ATTENTION_SANITIZE=1 to run compute-sanitizer")
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(exe):
        pytest.skip("compute-sanitizer not found")

    def sanitize(*only):
        return subprocess.run([exe, f"--tool={tool}", *only, "--error-exitcode=3", sys.executable, "-c",
                               SANITIZE_SCRIPT], capture_output=True, text=True, timeout=900)

    result = sanitize("--kernel-regex", "kns=bwd_")  # the backward's kernels only
    if result.returncode != 0 and "sanitize-script-done" not in result.stdout:
        result = sanitize()  # an older compute-sanitizer without kernel filters
    report = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0 and "sanitize-script-done" in result.stdout, report
    assert "0 hazards" in report or "ERROR SUMMARY: 0 errors" in report, report
