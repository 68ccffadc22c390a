"""Numerics of the op library on the CPU against the fp32 math reference: every option, varlen,
packed layouts, GQA, dropout (forward and backward through one rng_state), gradients; plus
torch.library.opcheck and torch.compile(fullgraph=True)."""

import pytest
import torch

import flash_attention as fa
from flash_attention import _ops
from _util import assert_fa_close, grads, max_err, qkv, rand, ref, varlen_qkv

OPS = torch.ops.flash_attention


def test_library_loaded():
    assert _ops.LOADED, _ops.LOAD_ERROR
    info = fa.build_info()
    assert info["version"] == fa.__version__
    assert isinstance(info["cuda_built"], bool)


# (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, options)
DENSE_CASES = [
    (2, 33, 33, 4, 4, 32, {}),
    (2, 33, 47, 4, 2, 40, dict(causal=True)),
    (1, 47, 33, 6, 2, 64, dict(causal=True)),                        # rows with no visible key
    (2, 40, 40, 4, 1, 16, dict(window_size=(8, 0))),                 # MQA, sliding window
    (2, 31, 45, 2, 2, 32, dict(window_size=(5, 3))),
    (1, 29, 29, 2, 2, 24, dict(window_size=(-1, 2))),
    (2, 37, 21, 4, 2, 32, dict(softcap=5.0)),
    (2, 25, 30, 4, 4, 32, dict(alibi="h")),
    (2, 30, 25, 4, 2, 32, dict(alibi="bh", causal=True)),
    (1, 19, 19, 2, 2, 8, dict(softmax_scale=0.3)),
    (2, 23, 41, 6, 3, 48, dict(window_size=(7, 2), softcap=3.0, alibi="h")),
    (1, 1, 65, 4, 2, 128, dict(causal=True)),                        # decode-like
    (1, 9, 9, 2, 2, 256, {}),
]


def _options(case_options, batch, heads):
    options = dict(case_options)
    alibi = options.pop("alibi", None)
    if alibi == "h":
        options["alibi_slopes"] = torch.rand(heads) * 0.5
    elif alibi == "bh":
        options["alibi_slopes"] = torch.rand(batch, heads) * 0.5
    return options


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(map(str, c[:6])) + str(sorted(c[6])))
def test_dense_matches_reference(case):
    b, sq, sk, h, hk, d, case_options = case
    options = _options(case_options, b, h)
    q, k, v = qkv(b, sq, sk, h, hk, d, grad=True)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, return_attn_probs=True, **options)
    expected, expected_lse = ref(q, k, v, **options)
    assert s_dmask is None
    assert out.shape == q.shape and lse.shape == (b, h, sq)
    assert max_err(out, expected) < 2e-5
    assert max_err(lse, expected_lse) < 2e-5
    dout = torch.randn_like(out)
    ours = grads(lambda: (fa.flash_attn_func(q, k, v, **options) * dout).sum(), q, k, v)
    theirs = grads(lambda: (ref(q, k, v, **options)[0] * dout).sum(), q, k, v)
    for name, a, e in zip("qkv", ours, theirs):
        assert max_err(a, e) < 1e-4, name


def test_fully_masked_rows_give_zero_and_inf_lse():
    q, k, v = qkv(1, 8, 3, 2, 2, 16)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :5] == 0)                 # rows 0..4 see no key (bottom-right causal)
    assert torch.all(torch.isinf(lse[..., :5])) and torch.all(lse[..., :5] > 0)
    assert torch.isfinite(lse[..., 5:]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(6, 1), softcap=4.0, alibi="h")],
                         ids=["causal", "window-softcap-alibi"])
def test_low_precision_follows_fa_rule(dtype, options):
    options = _options(options, 2, 4)
    q, k, v = qkv(2, 45, 37, 4, 2, 64, dtype=dtype, grad=True)
    out = fa.flash_attn_func(q, k, v, **options)
    assert out.dtype == dtype
    expected, _ = ref(q, k, v, **options)
    lowp, _ = ref(q, k, v, upcast=False, **options)
    assert_fa_close(out, expected, lowp)
    dout = torch.randn_like(out)
    ours = grads(lambda: (fa.flash_attn_func(q, k, v, **options) * dout).sum(), q, k, v)
    theirs = grads(lambda: (ref(q, k, v, **options)[0] * dout).sum(), q, k, v)
    lowp_grads = grads(lambda: (ref(q, k, v, upcast=False, **options)[0] * dout).sum(), q, k, v)
    for a, e, lo in zip(ours, theirs, lowp_grads):
        assert_fa_close(a, e, lo, factor=3.0)


VARLEN_CASES = [
    ([5, 0, 17, 9], [7, 3, 17, 20], 4, 2, dict()),
    ([5, 0, 17, 9], [7, 3, 17, 20], 4, 2, dict(causal=True)),
    ([12, 4, 1], [3, 9, 30], 2, 1, dict(window_size=(4, 1), softcap=2.0)),
    ([8, 16], [8, 16], 4, 4, dict(alibi="bh", causal=True)),
    ([0, 0], [0, 4], 2, 2, dict()),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{sorted(c[4])}")
def test_varlen_matches_reference(case):
    lengths_q, lengths_k, h, hk, case_options = case
    options = _options(case_options, len(lengths_q), h)
    q, k, v, cu_q, cu_k, max_q, max_k = varlen_qkv(lengths_q, lengths_k, h, hk, 32, grad=True)
    varlen = (cu_q, cu_k, max_q, max_k)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, *varlen, return_attn_probs=True, **options)
    expected, expected_lse = ref(q, k, v, *varlen, **options)
    assert out.shape == q.shape and lse.shape == (h, q.shape[0])
    assert max_err(out, expected) < 2e-5
    assert max_err(lse, expected_lse) < 2e-5
    if q.shape[0] == 0:
        return
    dout = torch.randn_like(out)
    ours = grads(lambda: (fa.flash_attn_varlen_func(q, k, v, *varlen, **options) * dout).sum(), q, k, v)
    theirs = grads(lambda: (ref(q, k, v, *varlen, **options)[0] * dout).sum(), q, k, v)
    for name, a, e in zip("qkv", ours, theirs):
        assert max_err(a, e) < 1e-4, name


def test_varlen_equals_dense_per_sequence():
    lengths = [6, 11, 3]
    q, k, v, cu, _, max_len, _ = varlen_qkv(lengths, lengths, 4, 2, 16)
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
    for b, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        dense = fa.flash_attn_func(q[None, start:end], k[None, start:end], v[None, start:end], causal=True)
        assert max_err(out[start:end], dense[0]) < 1e-6, b


# ---------------------------------------------------------------------------------------------
# Packed layouts, strided views, empty inputs
# ---------------------------------------------------------------------------------------------


def test_qkvpacked_matches_unpacked_with_grads():
    qkv_t = rand(2, 21, 3, 4, 32, grad=True)
    out = fa.flash_attn_qkvpacked_func(qkv_t, causal=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv_t.unbind(2))
    expected = fa.flash_attn_func(q, k, v, causal=True)
    assert max_err(out, expected) == 0
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    (expected * dout).sum().backward()
    assert max_err(qkv_t.grad, torch.stack([q.grad, k.grad, v.grad], dim=2)) == 0


def test_kvpacked_matches_unpacked():
    q = rand(2, 13, 4, 16)
    kv = rand(2, 19, 2, 2, 16)
    expected = fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], window_size=(3, 3))
    assert max_err(fa.flash_attn_kvpacked_func(q, kv, window_size=(3, 3)), expected) == 0


def test_varlen_packed_variants_match_unpacked():
    lengths = [4, 9, 1]
    qkv_t = rand(14, 3, 2, 16, grad=True)
    cu = torch.tensor([0, 4, 13, 14], dtype=torch.int32)
    out = fa.flash_attn_varlen_qkvpacked_func(qkv_t, cu, max(lengths), causal=True)
    q, k, v = qkv_t.unbind(1)
    expected = fa.flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True)
    assert max_err(out, expected) == 0
    out.sum().backward()
    assert qkv_t.grad.shape == qkv_t.shape
    kv = torch.stack([k, v], dim=1).detach()
    out_kv = fa.flash_attn_varlen_kvpacked_func(q.detach(), kv, cu, cu, 9, 9, causal=True)
    assert max_err(out_kv, expected) == 0


def test_non_contiguous_last_dim_is_handled():
    q, k, v = (rand(2, 11, 24, 4).transpose(-1, -2) for _ in range(3))   # (2, 11, 4, 24), stride(-1) = 4
    assert q.stride(-1) != 1
    out = fa.flash_attn_func(q, k, v, causal=True)
    expected = fa.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert max_err(out, expected) == 0


def test_strided_views_without_copy_match():
    big = rand(3, 20, 6, 32)
    q, k, v = big[::2, :, 0:2], big[::2, :, 2:4], big[::2, :, 4:6]       # batch-strided head slices
    out = fa.flash_attn_func(q, k, v)
    assert max_err(out, ref(q, k, v)[0]) < 2e-5


@pytest.mark.parametrize("shape_q,shape_k", [((0, 5, 2, 16), (0, 7, 2, 16)), ((2, 0, 2, 16), (2, 7, 2, 16)),
                                             ((2, 5, 2, 16), (2, 0, 2, 16))], ids=["batch0", "sq0", "sk0"])
def test_empty_inputs(shape_q, shape_k):
    q, k, v = rand(*shape_q, grad=True), rand(*shape_k, grad=True), rand(*shape_k, grad=True)
    out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and torch.all(out == 0)
    assert torch.all(lse == float("inf"))
    out.sum().backward()
    assert torch.all(q.grad == 0) and k.grad.shape == k.shape


def test_deterministic_backward_is_reproducible():
    q, k, v = qkv(1, 30, 30, 2, 2, 32, grad=True)
    a = grads(lambda: fa.flash_attn_func(q, k, v, deterministic=True).square().sum(), q, k, v)
    b = grads(lambda: fa.flash_attn_func(q, k, v, deterministic=True).square().sum(), q, k, v)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Dropout: one Philox stream shared by forward, backward, dropout_mask and the reference
# ---------------------------------------------------------------------------------------------


def _fwd_op(q, k, v, p, varlen=(None, None, 0, 0), **kw):
    cu_q, cu_k, max_q, max_k = varlen
    sq = max_q if cu_q is not None else q.shape[1]
    sk = max_k if cu_k is not None else k.shape[1]
    return OPS.fwd(q, k, v, cu_q, cu_k, sq, sk, p, q.shape[-1] ** -0.5, kw.get("causal", False),
                   -1, -1, 0.0, None)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_forward_and_backward_match_reference(causal):
    q, k, v = qkv(2, 29, 35, 4, 2, 32, grad=True)
    out, lse, rng_state = _fwd_op(q, k, v, 0.25, causal=causal)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,) and rng_state.device.type == "cpu"
    expected, expected_lse = ref(q, k, v, causal=causal, dropout_p=0.25, rng_state=rng_state)
    assert max_err(out, expected) < 2e-5
    assert max_err(lse, expected_lse) < 2e-5         # lse never includes dropout
    dout = torch.randn_like(out)
    ours = torch.autograd.grad((out * dout).sum(), (q, k, v))
    theirs = torch.autograd.grad((expected * dout).sum(), (q, k, v))
    for name, a, e in zip("qkv", ours, theirs):
        assert max_err(a, e) < 1e-4, name


def test_dropout_varlen_matches_reference():
    q, k, v, *varlen = varlen_qkv([9, 4, 0, 13], [9, 14, 2, 5], 4, 4, 16, grad=True)
    out, _, rng_state = _fwd_op(q, k, v, 0.4, varlen)
    expected, _ = ref(q, k, v, *varlen, dropout_p=0.4, rng_state=rng_state)
    assert max_err(out, expected) < 2e-5
    ours = torch.autograd.grad(out.sum(), (q, k, v))
    theirs = torch.autograd.grad(expected.sum(), (q, k, v))
    for name, a, e in zip("qkv", ours, theirs):
        assert max_err(a, e) < 1e-4, name


def test_s_dmask_is_consistent_with_output():
    q, k, v = qkv(1, 40, 50, 2, 2, 16)
    out, lse, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)
    assert s_dmask.shape == (1, 2, 40, 50)
    from_mask = torch.einsum("bhqk,bkhd->bqhd", s_dmask.clamp(min=0) / 0.7, v)
    assert max_err(out, from_mask) < 2e-5
    dropped = (s_dmask < 0).float().mean().item()
    assert 0.2 < dropped < 0.4


def test_dropout_mask_op_rate_and_reproducibility():
    state = torch.tensor([1234, 0], dtype=torch.int64)
    mask = OPS.dropout_mask(state, 0.25, 2, 3, 64, 96, torch.device("cpu"))
    assert mask.dtype == torch.uint8 and mask.shape == (2, 3, 64, 96)
    assert abs(mask.float().mean().item() - 0.75) < 0.02
    assert torch.equal(mask, OPS.dropout_mask(state, 0.25, 2, 3, 64, 96, torch.device("cpu")))
    other = OPS.dropout_mask(torch.tensor([1234, 8]), 0.25, 2, 3, 64, 96, torch.device("cpu"))
    assert not torch.equal(mask, other)


def test_dropout_follows_torch_manual_seed():
    q, k, v = qkv(1, 16, 16, 2, 2, 16)
    torch.manual_seed(7)
    a = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    b = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(7)
    c = fa.flash_attn_func(q, k, v, dropout_p=0.5)
    assert torch.equal(a, c) and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ---------------------------------------------------------------------------------------------


def _fwd_args(varlen=False, alibi=False):
    if varlen:
        q, k, v, cu_q, cu_k, max_q, max_k = varlen_qkv([5, 8], [6, 3], 4, 2, 16)
    else:
        (q, k, v), cu_q, cu_k, max_q, max_k = qkv(2, 9, 12, 4, 2, 16), None, None, 9, 12
    slopes = torch.rand(4) if alibi else None
    return (q, k, v, cu_q, cu_k, max_q, max_k, 0.0, 0.25, True, -1, -1, 0.0, slopes, "", False)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck_fwd(varlen):
    torch.library.opcheck(OPS.fwd.default, _fwd_args(varlen, alibi=not varlen))


def test_opcheck_bwd():
    q, k, v, cu_q, cu_k, max_q, max_k, *options = _fwd_args()
    out, lse, rng_state = OPS.fwd(q, k, v, cu_q, cu_k, max_q, max_k, *options)
    dropout_p, scale, causal, left, right, softcap, slopes, _, deterministic = options
    args = (torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, scale,
            causal, left, right, softcap, slopes, deterministic, rng_state)
    torch.library.opcheck(OPS.bwd.default, args)


def test_opcheck_dropout_mask():
    state = torch.tensor([5, 0], dtype=torch.int64)
    torch.library.opcheck(OPS.dropout_mask.default, (state, 0.5, 1, 2, 8, 8, torch.device("cpu")))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def loss(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=True, window_size=(8, 0)).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    q, k, v = qkv(2, 24, 24, 4, 2, 32, grad=True)
    ours = grads(lambda: compiled(q, k, v), q, k, v)
    eager = grads(lambda: loss(q, k, v), q, k, v)
    for a, e in zip(ours, eager):
        assert max_err(a, e) < 1e-5
