"""The public API is FlashAttention-2's: same functions, parameters, defaults and returns; plus
pad_input / unpad_input, forward / forward_timed and the package's exports."""

import inspect

import pytest
import torch

import flash_attention as fa
from _util import max_err, qkv, rand, varlen_qkv

_OPTIONS = ("dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
            "alibi_slopes=None, deterministic=False, return_attn_probs=False")

# FlashAttention-2 (flash_attn/flash_attn_interface.py, 2.6+), written out by hand.
FA2_SIGNATURES = {
    "flash_attn_func": f"q, k, v, {_OPTIONS}",
    "flash_attn_qkvpacked_func": f"qkv, {_OPTIONS}",
    "flash_attn_kvpacked_func": f"q, kv, {_OPTIONS}",
    "flash_attn_varlen_func": f"q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, {_OPTIONS}, "
                              "block_table=None",
    "flash_attn_varlen_qkvpacked_func": f"qkv, cu_seqlens, max_seqlen, {_OPTIONS}",
    "flash_attn_varlen_kvpacked_func": f"q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, {_OPTIONS}",
}


def _parameters(text):
    """{name: default or inspect._empty} from 'a, b=1, c=(-1, -1)'."""
    namespace = {}
    exec(f"def f({text}): pass", namespace)
    return {n: p.default for n, p in inspect.signature(namespace["f"]).parameters.items()}


@pytest.mark.parametrize("name", sorted(FA2_SIGNATURES))
def test_signature_equals_flash_attention_2(name):
    params = inspect.signature(getattr(fa, name)).parameters
    positional = {n: p.default for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD}
    assert positional == _parameters(FA2_SIGNATURES[name])
    assert list(positional) == list(_parameters(FA2_SIGNATURES[name]))
    keyword_only = {n: p.default for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
    fp8 = {"q_descale": None, "k_descale": None, "v_descale": None} if name == "flash_attn_func" else {}
    assert keyword_only == {**fp8, "backend": None}


def test_exports():
    for name in list(FA2_SIGNATURES) + ["pad_input", "unpad_input", "forward", "forward_timed",
                                        "use_backend", "build_info"]:
        assert callable(getattr(fa, name)), name
        assert name in fa.__all__


def test_returns_out_or_triple():
    q, k, v = qkv(2, 9, 9, 4, 4, 16)
    out = fa.flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype
    out2, lse, s_dmask = fa.flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.equal(out, out2) and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    assert s_dmask is None
    *_, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=0.1, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 9, 9)


def test_varlen_returns_packed_lse():
    q, k, v, *varlen = varlen_qkv([3, 6], [5, 2], 4, 2, 16)
    out, lse, s_dmask = fa.flash_attn_varlen_func(q, k, v, *varlen, dropout_p=0.2, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, 9)
    assert s_dmask.shape == (2, 4, 6, 5)


# ---------------------------------------------------------------------------------------------
# pad_input / unpad_input (FlashAttention-2's bert_padding)
# ---------------------------------------------------------------------------------------------


def test_unpad_then_pad_round_trip():
    hidden = rand(3, 5, 4, 8, grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    unpadded, indices, cu, max_len, used = fa.unpad_input(hidden, mask)
    assert unpadded.shape == (9, 4, 8)
    assert indices.tolist() == [0, 1, 2, 5, 6, 7, 8, 9, 10]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 8, 9]
    assert max_len == 5 and isinstance(max_len, int)
    assert used.dtype == torch.int32 and used.tolist() == [3, 5, 1]
    padded = fa.pad_input(unpadded, indices, 3, 5)
    assert padded.shape == hidden.shape
    assert torch.equal(padded, hidden * mask[:, :, None, None])
    padded.sum().backward()
    assert torch.equal(hidden.grad, mask[:, :, None, None].float().expand_as(hidden))


def test_unpad_with_unused_mask():
    hidden = rand(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]])
    unpadded, indices, cu, max_len, used = fa.unpad_input(hidden, mask, unused)
    assert indices.tolist() == [0, 1, 2, 4, 5, 6]
    assert cu.tolist() == [0, 3, 6] and max_len == 3 and used.tolist() == [2, 1]
    assert torch.equal(unpadded, hidden.reshape(8, 3)[indices])


def test_unpad_varlen_attention_pad_matches_padded_attention():
    q, k, v = qkv(2, 6, 6, 2, 2, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    (uq, indices, cu, max_len, _), uk, uv = fa.unpad_input(q, mask), fa.unpad_input(k, mask)[0], fa.unpad_input(v, mask)[0]
    out = fa.pad_input(fa.flash_attn_varlen_func(uq, uk, uv, cu, cu, max_len, max_len, causal=True), indices, 2, 6)
    first = fa.flash_attn_func(q[:1, :4], k[:1, :4], v[:1, :4], causal=True)
    second = fa.flash_attn_func(q[1:], k[1:], v[1:], causal=True)
    assert max_err(out[0, :4], first[0]) < 1e-6 and torch.all(out[0, 4:] == 0)
    assert max_err(out[1], second[0]) < 1e-6


# ---------------------------------------------------------------------------------------------
# forward / forward_timed
# ---------------------------------------------------------------------------------------------


def test_forward_equals_flash_attn_func():
    q, k, v = qkv(2, 9, 11, 4, 2, 16)
    options = dict(causal=True, window_size=(3, 0), softcap=2.0)
    assert torch.equal(fa.forward(q, k, v, **options), fa.flash_attn_func(q, k, v, **options))
    assert torch.equal(fa.forward(q, k, v, config="auto", **options), fa.flash_attn_func(q, k, v, **options))


def test_forward_varlen_and_return_attn_probs():
    q, k, v, cu_q, cu_k, max_q, max_k = varlen_qkv([3, 6], [5, 2], 4, 2, 16)
    out, lse, _ = fa.forward(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                             max_seqlen_k=max_k, return_attn_probs=True)
    expected = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
    assert torch.equal(out, expected) and lse.shape == (4, 9)


def test_forward_timed_returns_output_and_milliseconds():
    q, k, v = qkv(1, 32, 32, 2, 2, 16)
    out, ms = fa.forward_timed(q, k, v, causal=True)
    assert torch.equal(out, fa.flash_attn_func(q, k, v, causal=True))
    assert isinstance(ms, float) and ms > 0
