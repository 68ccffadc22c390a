"""The CUDA forward kernels against the fp32 reference, with FlashAttention's tolerance rule:

    max |ours - fp32 reference| <= 2 x max |torch in low precision - fp32 reference| (+1e-5 masked)

Every call draws fresh random inputs and runs on an allocator pool filled with NaN, so an output
element the kernel forgets to write shows up. Skipped without a GPU or without CUDA kernels.
"""

import math

import pytest
import torch

import flash_attention
from flash_attention import _ops

import _util

pytestmark = pytest.mark.gpu

HDIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
SEQLENS = [(1, 1), (113, 203), (128, 217), (512, 256), (1023, 1024), (2048, 2048)]
DTYPES = [torch.float16, torch.bfloat16]
DEV = "cuda"


@pytest.fixture(autouse=True)
def need_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _ops.LOADED:
        pytest.skip(_ops.LOAD_ERROR)


def poison_pool(*shapes_dtypes):
    """Leave NaN-filled blocks of the outputs' sizes in the caching allocator for the kernel to reuse."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEV) for shape, dtype in shapes_dtypes]
    del blocks


def fwd(q, k, v, varlen=None, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, dropout_p=0.0,
        scale=None, config=""):
    """torch.ops.flash_attention.fwd with flash_attn_func-style options -> (out, lse, rng_state)."""
    cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, q.shape[1], k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads, rows = q.shape[-2], (q.shape[0] if varlen is not None else q.shape[0] * q.shape[1])
    poison_pool((q.shape, q.dtype), ((rows * heads,), torch.float32))
    return torch.ops.flash_attention.fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal,
                                         window[0], window[1], softcap, alibi, config)


def check(q, k, v, varlen=None, *, lse_too=True, **options):
    """Runs ours and both references; asserts the rule on out (and a matching rule on lse)."""
    out, lse, rng_state = fwd(q, k, v, varlen, **options)
    ref_opts = dict(causal=options.get("causal", False), window_size=options.get("window", (-1, -1)),
                    softcap=options.get("softcap", 0.0), alibi_slopes=options.get("alibi"),
                    softmax_scale=options.get("scale"), dropout_p=options.get("dropout_p", 0.0),
                    rng_state=rng_state if options.get("dropout_p", 0.0) > 0 else None)
    args = () if varlen is None else varlen
    out32, lse32 = _util.ref(q, k, v, *args, upcast=True, **ref_opts)
    out16, lse16 = _util.ref(q, k, v, *args, upcast=False, **ref_opts)
    masked = ref_opts["causal"] or ref_opts["window_size"] != (-1, -1)
    assert not out.isnan().any(), "NaN in out (an element left unwritten?)"
    _util.assert_fa_close(out, out32, out16, factor=2.0, slack=1e-5 if masked else 0.0)
    if lse_too:
        assert not lse.isnan().any(), "NaN in softmax_lse"
        _util.assert_fa_close(lse, lse32, lse16.float(), factor=2.0, slack=1e-4)
    return out, lse


def qkv(b, sq, sk, h, hk, d, dtype):
    return _util.qkv(b, sq, sk, h, hk, d, dtype=dtype, device=DEV)


def batch_heads(sq, sk):
    return (1, 2) if sq * sk >= 1 << 20 else (2, 3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("hdim", HDIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_shapes(dtype, hdim, seqlens, causal):
    b, h = batch_heads(*seqlens)
    check(*qkv(b, *seqlens, h, h, hdim, dtype), causal=causal)


FEATURES = {
    "window": dict(window=(37, 11)),
    "window_left": dict(window=(100, -1)),
    "window_causal": dict(window=(64, 0)),
    "softcap": dict(softcap=2.5, scale=0.5),
    "alibi_h": dict(alibi="h"),
    "alibi_bh_causal": dict(alibi="bh", causal=True),
    "softcap_alibi_window": dict(softcap=5.0, alibi="h", window=(50, 20)),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("seqlens", [(113, 203), (512, 256), (1023, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("hdim", [59, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_features(dtype, hdim, seqlens, feature):
    options = dict(FEATURES[feature])
    b, h = 2, 4
    if "alibi" in options:
        shape = (h,) if options["alibi"] == "h" else (b, h)
        options["alibi"] = torch.rand(shape, device=DEV, dtype=torch.float32) * 0.3
    check(*qkv(b, *seqlens, h, h, hdim, dtype), **options)


@pytest.mark.parametrize("heads_k", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_gqa(dtype, hdim, causal, heads_k):
    check(*qkv(2, 257, 300, 8, heads_k, hdim, dtype), causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hdim", [64, 111, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_varlen(dtype, hdim, causal):
    gen = torch.Generator().manual_seed(hdim * 2 + causal)
    lengths_q = torch.randint(1, 400, (5,), generator=gen).tolist() + [0]
    lengths_k = torch.randint(1, 500, (5,), generator=gen).tolist() + [7]
    q, k, v, cu_q, cu_k, max_q, max_k = _util.varlen_qkv(lengths_q, lengths_k, 4, 2, hdim, dtype=dtype, device=DEV)
    check(q, k, v, (cu_q, cu_k, max_q, max_k), causal=causal, window=(-1, -1) if causal else (90, 30))


@pytest.mark.parametrize("hdim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_dropout_matches_mask(dtype, hdim):
    """Dropout drops exactly the elements of dropout_mask (the reference applies that mask)."""
    check(*qkv(2, 300, 333, 3, 3, hdim, dtype), dropout_p=0.17, causal=True)  # lse ignores dropout


def test_varlen_dropout():
    lengths = [77, 0, 130]
    q, k, v, cu_q, cu_k, max_q, max_k = _util.varlen_qkv(lengths, [90, 5, 140], 2, 2, 64, dtype=torch.float16,
                                                         device=DEV)
    check(q, k, v, (cu_q, cu_k, max_q, max_k), dropout_p=0.3)


@pytest.mark.parametrize("layout", ["qkvpacked", "bhsd", "padded_dim", "odd_dim_unaligned"])
def test_strides(layout):
    """Views with any batch/row/head strides run without a copy (head dim contiguous)."""
    b, s, h, d, dtype = 2, 301, 4, 64, torch.bfloat16
    if layout == "qkvpacked":
        qkv_ = torch.randn(b, s, 3, h, d, dtype=dtype, device=DEV)
        q, k, v = qkv_.unbind(2)
    elif layout == "bhsd":
        q, k, v = (torch.randn(b, h, s, d, dtype=dtype, device=DEV).transpose(1, 2) for _ in range(3))
    elif layout == "padded_dim":
        q, k, v = (torch.randn(b, s, h, d + 8, dtype=dtype, device=DEV)[..., :d] for _ in range(3))
    else:  # head dim 59 inside rows of 61: not 16-byte aligned, runs on packed copies
        q, k, v = (torch.randn(b, s, h, 61, dtype=dtype, device=DEV)[..., 1:60] for _ in range(3))
    check(q, k, v, causal=True)


def test_agrees_with_cpu():
    """Same inputs through the CUDA kernels and the C++ CPU implementation."""
    q, k, v = qkv(2, 200, 260, 4, 2, 96, torch.float16)
    opts = dict(causal=True, softcap=3.0)
    ours = flash_attention.flash_attn_func(q, k, v, backend="cuda", **opts)
    cpu = flash_attention.flash_attn_func(q.cpu(), k.cpu(), v.cpu(), backend="cpu", **opts)
    out32, _ = _util.ref(q, k, v, upcast=True, **opts)
    out16, _ = _util.ref(q, k, v, upcast=False, **opts)
    base = _util.max_err(out16, out32)
    assert _util.max_err(ours.cpu(), cpu) <= 2 * base + 1e-5


def test_large_offsets():
    """q / out with more than 2^31 elements: offsets are 64-bit."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 << 30:
        pytest.skip("needs 12 GiB of free GPU memory")
    b, sq, sk, h, d = 1030, 2048, 48, 8, 128  # q: 2.16e9 elements
    q = torch.empty(b, sq, h, d, dtype=torch.float16, device=DEV).normal_()
    k = torch.randn(b, sk, h, d, dtype=torch.float16, device=DEV)
    v = torch.randn(b, sk, h, d, dtype=torch.float16, device=DEV)
    out, lse, _ = torch.ops.flash_attention.fwd(q, k, v, None, None, sq, sk, 0.0, d ** -0.5, False, -1, -1,
                                                0.0, None, "")
    tail = slice(b - 2, b)
    out32, lse32 = _util.ref(q[tail], k[tail], v[tail], upcast=True)
    out16, _ = _util.ref(q[tail], k[tail], v[tail], upcast=False)
    _util.assert_fa_close(out[tail], out32, out16)
    assert torch.allclose(lse[tail], lse32, atol=1e-3)


def test_explicit_configs():
    """Every built config of a head dim gives a correct result; an unbuilt one raises naming it."""
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "gen", pathlib.Path(__file__).resolve().parents[2] / "tools" / "generate_instantiations.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    hdim = 128
    for cfg in gen.CONFIGS[hdim]:
        check(*qkv(2, 333, 444, 2, 2, hdim, torch.float16), causal=True, config=gen.config_name(cfg))
    with pytest.raises(Exception, match="was not built"):
        fwd(*qkv(1, 64, 64, 1, 1, hdim, torch.float16), config="sm80:m96n48w3s7")


def test_unsupported_reasons():
    q, k, v = qkv(1, 16, 16, 2, 2, 64, torch.float32)
    with pytest.raises(Exception, match="fp16 or bf16"):
        flash_attention.flash_attn_func(q, k, v, backend="cuda")
    q, k, v = qkv(1, 16, 16, 2, 2, 264, torch.float16)
    with pytest.raises(Exception, match="head_dim"):
        flash_attention.flash_attn_func(q, k, v, backend="cuda")


def test_fully_masked_rows():
    """A window that leaves some rows without keys: out = 0 and lse = +inf there."""
    q, k, v = qkv(1, 64, 16, 2, 2, 64, torch.float16)
    out, lse, _ = fwd(q, k, v, window=(0, 0))  # row i sees key i - 48 only
    assert torch.all(out[:, :48] == 0)
    assert torch.all(torch.isinf(lse[:, :, :48]) & (lse[:, :, :48] > 0))
    check(q, k, v, window=(0, 0))
