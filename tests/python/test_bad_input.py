"""Every malformed call raises a Python exception of the documented type whose message names the
offending argument — at the public API (before any backend runs) and at the op level."""

import pytest
import torch

import flash_attention as fa
from _util import cu_seqlens, qkv, rand, varlen_qkv

OPS = torch.ops.flash_attention


def dense(**override):
    q, k, v = qkv(2, 8, 8, 4, 2, 16)
    args = dict(q=q, k=k, v=v)
    args.update(override)
    return args


def varlen(**override):
    q, k, v, cu_q, cu_k, max_q, max_k = varlen_qkv([3, 5], [4, 4], 4, 2, 16)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    args.update(override)
    return args


# (id, function, kwargs, exception, words the message must contain)
CASES = [
    ("q-not-tensor", fa.flash_attn_func, dense(q=[1.0]), TypeError, ["q", "Tensor"]),
    ("q-int-dtype", fa.flash_attn_func, dense(q=torch.ones(2, 8, 4, 16, dtype=torch.int32)), TypeError, ["q", "float16"]),
    ("q-float64", fa.flash_attn_func, dense(q=rand(2, 8, 4, 16).double()), TypeError, ["q", "float64"]),
    ("k-dtype-mismatch", fa.flash_attn_func, dense(k=rand(2, 8, 2, 16).half()), TypeError, ["k", "dtype"]),
    ("v-dtype-mismatch", fa.flash_attn_func, dense(v=rand(2, 8, 2, 16).bfloat16()), TypeError, ["v", "dtype"]),
    ("k-other-device", fa.flash_attn_func, dense(k=torch.empty(2, 8, 2, 16, device="meta")), ValueError, ["k", "meta"]),
    ("v-other-device", fa.flash_attn_func, dense(v=torch.empty(2, 8, 2, 16, device="meta")), ValueError, ["v", "device"]),
    ("q-3d", fa.flash_attn_func, dense(q=rand(8, 4, 16)), ValueError, ["q", "4-D"]),
    ("k-5d", fa.flash_attn_func, dense(k=rand(2, 8, 2, 16, 1), v=rand(2, 8, 2, 16, 1)), ValueError, ["k", "4-D"]),
    ("k-batch", fa.flash_attn_func, dense(k=rand(3, 8, 2, 16), v=rand(3, 8, 2, 16)), ValueError, ["k", "batch"]),
    ("v-shape", fa.flash_attn_func, dense(v=rand(2, 9, 2, 16)), ValueError, ["v", "shape"]),
    ("k-headdim", fa.flash_attn_func, dense(k=rand(2, 8, 2, 32), v=rand(2, 8, 2, 32)), ValueError, ["k", "head dim"]),
    ("heads-not-multiple", fa.flash_attn_func, dense(k=rand(2, 8, 3, 16), v=rand(2, 8, 3, 16)), ValueError, ["heads", "multiple"]),
    ("headdim-zero", fa.flash_attn_func, dense(q=rand(2, 8, 4, 0), k=rand(2, 8, 2, 0), v=rand(2, 8, 2, 0)), ValueError, ["head dim"]),
    ("dropout-one", fa.flash_attn_func, dense(dropout_p=1.0), ValueError, ["dropout_p"]),
    ("dropout-negative", fa.flash_attn_func, dense(dropout_p=-0.1), ValueError, ["dropout_p"]),
    ("dropout-nan", fa.flash_attn_func, dense(dropout_p=float("nan")), ValueError, ["dropout_p"]),
    ("dropout-str", fa.flash_attn_func, dense(dropout_p="0.1"), TypeError, ["dropout_p"]),
    ("window-below-minus-one", fa.flash_attn_func, dense(window_size=(-2, 0)), ValueError, ["window_size"]),
    ("window-right-below", fa.flash_attn_func, dense(window_size=(4, -5)), ValueError, ["window_size"]),
    ("window-not-pair", fa.flash_attn_func, dense(window_size=(1, 2, 3)), ValueError, ["window_size"]),
    ("window-float", fa.flash_attn_func, dense(window_size=(1.5, 0)), TypeError, ["window_size"]),
    ("softcap-negative", fa.flash_attn_func, dense(softcap=-1.0), ValueError, ["softcap"]),
    ("softmax-scale-zero", fa.flash_attn_func, dense(softmax_scale=0.0), ValueError, ["softmax_scale"]),
    ("softmax-scale-inf", fa.flash_attn_func, dense(softmax_scale=float("inf")), ValueError, ["softmax_scale"]),
    ("alibi-shape", fa.flash_attn_func, dense(alibi_slopes=torch.rand(3)), ValueError, ["alibi_slopes", "shape"]),
    ("alibi-batch-shape", fa.flash_attn_func, dense(alibi_slopes=torch.rand(3, 4)), ValueError, ["alibi_slopes"]),
    ("alibi-dtype", fa.flash_attn_func, dense(alibi_slopes=torch.rand(4).half()), TypeError, ["alibi_slopes", "float32"]),
    ("alibi-device", fa.flash_attn_func, dense(alibi_slopes=torch.empty(4, device="meta")), ValueError, ["alibi_slopes"]),
    ("alibi-not-tensor", fa.flash_attn_func, dense(alibi_slopes=[0.1] * 4), TypeError, ["alibi_slopes"]),
    ("backend-unknown", fa.flash_attn_func, dense(backend="triton"), ValueError, ["backend", "triton"]),
    ("backend-cuda-on-cpu", fa.flash_attn_func, dense(backend="cuda"), ValueError, ["cuda", "cpu"]),
    ("backend-sdpa-softcap", fa.flash_attn_func, dense(backend="sdpa", softcap=2.0), ValueError, ["sdpa", "softcap"]),
    ("backend-sdpa-lse", fa.flash_attn_func, dense(backend="sdpa", return_attn_probs=True), ValueError, ["sdpa", "softmax_lse"]),
    ("qkv-shape", fa.flash_attn_qkvpacked_func, dict(qkv=rand(2, 8, 2, 4, 16)), ValueError, ["qkv"]),
    ("kv-shape", fa.flash_attn_kvpacked_func, dict(q=rand(2, 8, 4, 16), kv=rand(2, 8, 3, 4, 16)), ValueError, ["kv"]),
    ("varlen-qkv-shape", fa.flash_attn_varlen_qkvpacked_func,
     dict(qkv=rand(8, 4, 16), cu_seqlens=cu_seqlens([8]), max_seqlen=8), ValueError, ["qkv"]),
    ("varlen-kv-shape", fa.flash_attn_varlen_kvpacked_func,
     dict(q=rand(8, 4, 16), kv=rand(8, 4, 16), cu_seqlens_q=cu_seqlens([8]), cu_seqlens_k=cu_seqlens([8]),
          max_seqlen_q=8, max_seqlen_k=8), ValueError, ["kv"]),
    ("varlen-q-4d", fa.flash_attn_varlen_func, varlen(q=rand(1, 8, 4, 16)), ValueError, ["q", "3-D"]),
    ("cu-seqlens-int64", fa.flash_attn_varlen_func, varlen(cu_seqlens_q=torch.tensor([0, 3, 8])), TypeError, ["cu_seqlens_q", "int32"]),
    ("cu-seqlens-k-float", fa.flash_attn_varlen_func, varlen(cu_seqlens_k=torch.tensor([0.0, 4, 8])), TypeError, ["cu_seqlens_k", "int32"]),
    ("cu-seqlens-missing", fa.flash_attn_varlen_func, varlen(cu_seqlens_k=None), TypeError, ["cu_seqlens_k"]),
    ("cu-seqlens-length-mismatch", fa.flash_attn_varlen_func, varlen(cu_seqlens_k=cu_seqlens([4, 2, 2])), ValueError, ["cu_seqlens_k", "length"]),
    ("cu-seqlens-too-short", fa.flash_attn_varlen_func, varlen(cu_seqlens_q=cu_seqlens([]), cu_seqlens_k=cu_seqlens([])), ValueError, ["cu_seqlens_q", "entries"]),
    ("cu-seqlens-2d", fa.flash_attn_varlen_func, varlen(cu_seqlens_q=cu_seqlens([3, 5])[None]), ValueError, ["cu_seqlens_q", "1-D"]),
    ("cu-seqlens-device", fa.flash_attn_varlen_func, varlen(cu_seqlens_q=torch.empty(3, dtype=torch.int32, device="meta")), ValueError, ["cu_seqlens_q", "meta"]),
    ("cu-seqlens-not-monotone", fa.flash_attn_varlen_func, varlen(cu_seqlens_q=torch.tensor([0, 6, 5, 8], dtype=torch.int32),
                                                                   cu_seqlens_k=cu_seqlens([4, 2, 2])), ValueError, ["cu_seqlens_q", "non-decreasing"]),
    ("cu-seqlens-last-not-total", fa.flash_attn_varlen_func, varlen(cu_seqlens_k=cu_seqlens([4, 3])), ValueError, ["cu_seqlens_k", "rows"]),
    ("cu-seqlens-first-not-zero", fa.flash_attn_varlen_func, varlen(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, ["cu_seqlens_q", "start"]),
    ("max-seqlen-too-small", fa.flash_attn_varlen_func, varlen(max_seqlen_q=4), ValueError, ["max_seqlen_q"]),
    ("max-seqlen-negative", fa.flash_attn_varlen_func, varlen(max_seqlen_k=-1), ValueError, ["max_seqlen_k"]),
    ("max-seqlen-float", fa.flash_attn_varlen_func, varlen(max_seqlen_k=4.5), TypeError, ["max_seqlen_k"]),
    ("block-table", fa.flash_attn_varlen_func, varlen(block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError, ["block_table", "k", "paged"]),  # k/v are not paged caches
    ("forward-unknown-option", fa.forward, dense(dropout=0.1), TypeError, ["dropout"]),
    ("forward-config-type", fa.forward, dense(config=128), TypeError, ["config"]),
    ("forward-config-on-cpu", fa.forward, dense(config="sm80:m128n64w4s2"), ValueError, ["config", "CUDA"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_public_api_rejects(case):
    _, fn, kwargs, error, words = case
    with pytest.raises(error) as info:
        fn(**kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_env_backend_unknown(monkeypatch):
    monkeypatch.setenv("FLASH_ATTENTION_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FLASH_ATTENTION_BACKEND"):
        fa.flash_attn_func(**dense())


def test_use_backend_unknown():
    with pytest.raises(ValueError, match="use_backend"):
        with fa.use_backend("gpu"):
            pass


# ---------------------------------------------------------------------------------------------
# Op level (torch.ops.flash_attention.*): the C++ checks name the argument too
# ---------------------------------------------------------------------------------------------


def fwd_args(**override):
    q, k, v = qkv(2, 8, 8, 4, 2, 16)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=8, max_seqlen_k=8,
                dropout_p=0.0, softmax_scale=0.25, causal=False, window_left=-1, window_right=-1,
                softcap=0.0, alibi_slopes=None)
    args.update(override)
    return args


OP_CASES = [
    ("q-dtype", dict(q=torch.ones(2, 8, 4, 16, dtype=torch.int32)), TypeError, "q must be"),
    ("k-dtype", dict(k=rand(2, 8, 2, 16).half()), TypeError, "k must have the dtype"),
    ("q-dims", dict(q=rand(8, 4, 16)), ValueError, "q must be 4-D"),
    ("v-shape", dict(v=rand(2, 8, 2, 8)), ValueError, "v must have the shape"),
    ("k-batch", dict(k=rand(1, 8, 2, 16), v=rand(1, 8, 2, 16)), ValueError, "k must have the batch"),
    ("heads", dict(k=rand(2, 8, 3, 16), v=rand(2, 8, 3, 16)), ValueError, "heads of q"),
    ("headdim", dict(k=rand(2, 8, 2, 8), v=rand(2, 8, 2, 8)), ValueError, "k must have the head_dim"),
    ("cu-only-one", dict(cu_seqlens_q=cu_seqlens([8, 8])), ValueError, "cu_seqlens_q and cu_seqlens_k"),
    ("cu-dtype", dict(q=rand(16, 4, 16), k=rand(16, 2, 16), v=rand(16, 2, 16),
                      cu_seqlens_q=torch.tensor([0, 8, 16]), cu_seqlens_k=cu_seqlens([8, 8])), TypeError, "cu_seqlens_q must be int32"),
    ("cu-length", dict(q=rand(16, 4, 16), k=rand(16, 2, 16), v=rand(16, 2, 16),
                       cu_seqlens_q=cu_seqlens([8, 8]), cu_seqlens_k=cu_seqlens([16])), ValueError, "cu_seqlens_k must have the length"),
    ("cu-values", dict(q=rand(16, 4, 16), k=rand(16, 2, 16), v=rand(16, 2, 16),
                       cu_seqlens_q=cu_seqlens([8, 7]), cu_seqlens_k=cu_seqlens([8, 8])), ValueError, "cu_seqlens_q"),
    ("alibi-shape", dict(alibi_slopes=torch.rand(2)), ValueError, "alibi_slopes must have shape"),
    ("alibi-dtype", dict(alibi_slopes=torch.rand(4).double()), TypeError, "alibi_slopes must be float32"),
    ("window", dict(window_left=-3), ValueError, "window_left"),
    ("dropout", dict(dropout_p=1.5), ValueError, "dropout_p"),
    ("softcap", dict(softcap=-2.0), ValueError, "softcap"),
    ("softmax-scale", dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("config", dict(config="sm80:m128n64w4s2"), ValueError, "config"),
    ("config-parse", dict(config="turbo"), ValueError, "config"),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_fwd_op_rejects(case):
    _, override, error, words = case
    with pytest.raises(error, match=words):
        OPS.fwd(**fwd_args(**override))


def test_bwd_op_rejects_bad_lse_and_rng_state():
    args = fwd_args()
    out, lse, rng_state = OPS.fwd(**args)
    names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
             "softmax_scale", "causal", "window_left", "window_right", "softcap", "alibi_slopes")
    rest = [args[n] for n in names[3:]]

    def bwd(lse_=lse, rng_=rng_state, dout=out):
        return OPS.bwd(dout, args["q"], args["k"], args["v"], out, lse_, *rest, False, rng_)

    with pytest.raises(ValueError, match="softmax_lse must have shape"):
        bwd(lse_=lse[:, :, :4])
    with pytest.raises(TypeError, match="softmax_lse must be float32"):
        bwd(lse_=lse.double())
    with pytest.raises(ValueError, match="rng_state"):
        bwd(rng_=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="dout must have the shape"):
        bwd(dout=out[:, :4])


def test_dropout_mask_op_rejects():
    with pytest.raises(ValueError, match="rng_state"):
        OPS.dropout_mask(torch.zeros(2), 0.5, 1, 1, 4, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="dropout_p"):
        OPS.dropout_mask(torch.zeros(2, dtype=torch.int64), 1.0, 1, 1, 4, 4, torch.device("cpu"))
