"""flash_attention.nn: FlashAttention and the torch.nn.MultiheadAttention drop-in.

Runs on the GPU when one is present (the device run), else on the CPU (CI)."""

import logging

import pytest
import torch

from flash_attention import _ops, reference
from flash_attention.integrations import fallback_calls, kernel_calls, reset_stats, stats
from flash_attention.nn import FlashAttention, MultiheadAttention

pytestmark = pytest.mark.skipif(not _ops.LOADED, reason=f"op library not loaded: {_ops.LOAD_ERROR}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = torch.bfloat16
DT = torch.float32 if DEVICE == "cpu" else torch.bfloat16   # what our kernels serve on DEVICE
SITE = "nn.MultiheadAttention"


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_stats()
    torch.manual_seed(0)


def _rule(ours, low, ref, factor=2.0, extra=1e-5):
    """FlashAttention's rule: ours is at most `factor` x as far from fp32 as torch's low precision."""
    err = (ours.float() - ref.float()).abs().max().item()
    bound = factor * (low.float() - ref.float()).abs().max().item() + extra
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _torch_low(q, k, v, causal, window, softcap):
    """Attention computed by torch in q's (low) precision: the rule's baseline."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    window = (window[0], 0) if causal else window
    visible = reference.visible_mask(q.shape[1], k.shape[1], *window, device=q.device)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(b=2, sq=33, sk=33, h=4, hk=2, d=32, dtype=torch.float32):
    shape = lambda s, n: torch.randn(b, s, n, d, device=DEVICE, dtype=dtype)  # noqa: E731
    return shape(sq, h), shape(sk, hk), shape(sk, hk)


# ---------------------------------------------------------------------------------------------
# FlashAttention (the core module)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window,softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                                   (False, (5, 3), 0.0), (True, (-1, -1), 20.0)])
def test_flash_attention_matches_reference(causal, window, softcap):
    q, k, v = _qkv(sq=29, sk=41, dtype=LOW)
    module = FlashAttention(causal=causal, window_size=window, softcap=softcap)
    out = module(q, k, v)
    ref, _ = reference.attention(q.float(), k.float(), v.float(), causal=causal, window=window,
                                 softcap=softcap, softmax_scale=q.shape[-1] ** -0.5)
    _rule(out, _torch_low(q, k, v, causal, window, softcap), ref)


def test_flash_attention_varlen_matches_per_sequence_calls():
    lens = [5, 17, 11]
    cu = torch.tensor([0, 5, 22, 33], dtype=torch.int32, device=DEVICE)
    q = torch.randn(33, 4, 32, device=DEVICE, dtype=LOW)
    k, v = torch.randn_like(q), torch.randn_like(q)
    module = FlashAttention(causal=True)
    out = module(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17, max_seqlen_k=17)
    start = 0
    for n in lens:
        part = module(q[None, start:start + n], k[None, start:start + n], v[None, start:start + n])
        torch.testing.assert_close(out[start:start + n], part[0], atol=1e-2, rtol=1e-2)
        start += n


def test_flash_attention_dropout_only_in_training():
    q, k, v = _qkv(dtype=LOW)
    module = FlashAttention(attention_dropout=0.5).eval()
    torch.testing.assert_close(module(q, k, v), FlashAttention()(q, k, v))
    module.train()
    assert not torch.allclose(module(q, k, v), FlashAttention()(q, k, v))


def test_flash_attention_backward_runs():
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=LOW))
    FlashAttention(causal=True)(q, k, v).float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention_dropout=1.5), "attention_dropout"),
    (dict(window_size=(1, 2, 3)), "window_size"),
    (dict(softcap=-1.0), "softcap"),
])
def test_flash_attention_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlashAttention(**kwargs)


def test_flash_attention_bad_call_arguments():
    q, k, v = _qkv(dtype=LOW)
    cu = torch.tensor([0, 33], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens_q and cu_seqlens_k"):
        FlashAttention()(q[0], k[0], v[0], cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="max_seqlen"):
        FlashAttention()(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError):
        FlashAttention()(q, k[..., :16], v)   # head dims differ: the API names the argument


# ---------------------------------------------------------------------------------------------
# MultiheadAttention (drop-in)
# ---------------------------------------------------------------------------------------------


class Trio:
    """torch's module in fp32 (the reference), torch's module in DT and ours in DT, same weights."""

    def __init__(self, batch_first=True, **kwargs):
        self.ref = torch.nn.MultiheadAttention(64, 2, batch_first=batch_first, device=DEVICE, **kwargs).eval()
        self.theirs = torch.nn.MultiheadAttention(64, 2, batch_first=batch_first, device=DEVICE, dtype=DT,
                                                  **kwargs).eval()
        self.ours = MultiheadAttention(64, 2, batch_first=batch_first, device=DEVICE, dtype=DT, **kwargs).eval()
        self.theirs.load_state_dict(self.ref.state_dict())
        self.ours.load_state_dict(self.ref.state_dict())

    def check(self, *inputs, **kwargs):
        """Runs all three on fp32 inputs (cast to DT for the DT modules); applies the rule."""
        low_inputs = [x.to(DT) for x in inputs]
        kwargs_low = {k: (v.to(DT) if torch.is_tensor(v) and v.is_floating_point() else v)
                      for k, v in kwargs.items()}
        ref, _ = self.ref(*inputs, **kwargs)
        low, _ = self.theirs(*low_inputs, **kwargs_low)
        out, weights = self.ours(*low_inputs, **kwargs_low)
        assert weights is None
        _rule(out, low, ref)


def _x(b=3, s=19, e=64, batch_first=True):
    x = torch.randn(b, s, e, device=DEVICE)
    return x if batch_first else x.transpose(0, 1)


def test_mha_is_a_drop_in():
    trio = Trio()
    assert isinstance(trio.ours, torch.nn.MultiheadAttention)
    assert list(trio.ours.state_dict()) == list(trio.ref.state_dict())
    back = torch.nn.MultiheadAttention(64, 2, batch_first=True, device=DEVICE, dtype=DT)
    back.load_state_dict(trio.ours.state_dict())


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_self_attention_follows_rule(batch_first):
    x = _x(batch_first=batch_first)
    Trio(batch_first).check(x, x, x, need_weights=False)
    assert kernel_calls(SITE) == 1 and fallback_calls(SITE) == 0


def test_mha_cross_attention_with_kdim_vdim():
    Trio(kdim=24, vdim=40).check(_x(), _x(s=11, e=24), _x(s=11, e=40), need_weights=False)
    assert kernel_calls(SITE) == 1


def test_mha_unbatched_input():
    x = torch.randn(13, 64, device=DEVICE)
    Trio(batch_first=False).check(x, x, x, need_weights=False)
    assert kernel_calls(SITE) == 1


@pytest.mark.parametrize("form", ["bool", "float", "is_causal"])
def test_mha_causal_masks_run_on_our_kernels(form):
    x = _x()
    mask = torch.nn.Transformer.generate_square_subsequent_mask(19, device=DEVICE)
    kwargs = dict(attn_mask=mask, need_weights=False)
    if form == "bool":
        kwargs["attn_mask"] = mask.isinf()
    if form == "is_causal":
        kwargs["is_causal"] = True
    Trio().check(x, x, x, **kwargs)
    assert kernel_calls(SITE) == 1 and fallback_calls(SITE) == 0


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_mha_key_padding_mask_runs_varlen(dtype):
    x = _x()
    pad = torch.zeros(3, 19, dtype=torch.bool, device=DEVICE)
    pad[0, 12:] = True
    pad[2, :5] = True
    kpm = pad if dtype == torch.bool else torch.zeros(3, 19, device=DEVICE).masked_fill(pad, float("-inf"))
    Trio().check(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert kernel_calls(SITE) == 1 and fallback_calls(SITE) == 0


def test_mha_gradients_follow_rule():
    trio = Trio()
    grads = {}
    for name, module, dtype in (("ref", trio.ref, torch.float32), ("low", trio.theirs, DT), ("ours", trio.ours, DT)):
        module.train()
        x = _x().to(dtype).requires_grad_()
        module(x, x, x, need_weights=False)[0].float().square().sum().backward()
        grads[name] = (x.grad, module.in_proj_weight.grad)
    for i in range(2):
        _rule(grads["ours"][i], grads["low"][i], grads["ref"][i], factor=3.0)
    assert kernel_calls(SITE) == 1


@pytest.mark.parametrize("case", ["need_weights", "general_mask", "bias_kv", "all_padded", "causal_and_padding"])
def test_mha_falls_back_with_reason(case, caplog):
    kwargs = dict(add_bias_kv=True) if case == "bias_kv" else {}
    trio = Trio(**kwargs)
    theirs, ours = trio.theirs, trio.ours
    x = _x().to(DT)
    call = dict(need_weights=case == "need_weights")
    if case == "general_mask":
        call["attn_mask"] = torch.rand(19, 19, device=DEVICE) > 0.5
        call["attn_mask"].fill_diagonal_(False)
    if case in ("all_padded", "causal_and_padding"):
        pad = torch.zeros(3, 19, dtype=torch.bool, device=DEVICE)
        pad[0] = case == "all_padded"
        pad[1, 15:] = True
        call["key_padding_mask"] = pad
    if case == "causal_and_padding":
        call["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(19, device=DEVICE).isinf()
    with caplog.at_level(logging.INFO, logger="flash_attention"):
        expected = theirs(x, x, x, **call)
        actual = ours(x, x, x, **call)
    torch.testing.assert_close(actual[0], expected[0], equal_nan=True)
    if case == "need_weights":
        torch.testing.assert_close(actual[1], expected[1])
    assert kernel_calls(SITE) == 0 and fallback_calls(SITE) == 1
    assert "falling back" in caplog.text
    reason = next(iter(stats()[SITE]))
    assert reason.startswith("fallback: ") and len(reason) > 20


def test_mha_bad_input_raises_clear_error():
    ours = Trio().ours
    x = _x().to(DT)
    with pytest.raises(Exception, match="embed"):
        ours(x[..., :32], x, x, need_weights=False)
    with pytest.raises(Exception, match="is_causal"):
        ours(x, x, x, need_weights=False, is_causal=True)


def test_mha_mismatched_batches_raise_torchs_error():
    ours = Trio().ours
    q, kv = _x(b=3).to(DT), _x(b=2).to(DT)
    with pytest.raises(Exception):
        ours(q, kv, kv, need_weights=False)
    assert kernel_calls(SITE) == 0
