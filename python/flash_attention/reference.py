"""Plain-torch fp32 attention with FlashAttention-2 semantics: the `math` backend and the reference
every other backend is tested against. Slow and memory-hungry (materialises the score matrix).

Dropout uses ``torch.ops.flash_attention.dropout_mask`` so it drops exactly the elements our
kernels drop for the same rng_state.
"""

from __future__ import annotations

import torch


def visible_mask(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int,
                 device=None) -> torch.Tensor:
    """(Sq, Sk) bool: key j visible from query row i (bottom-right aligned window, -1 = unbounded)."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    diagonal = i + seqlen_k - seqlen_q
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_right >= 0:
        visible &= j <= diagonal + window_right
    if window_left >= 0:
        visible &= j >= diagonal - window_left
    return visible


def alibi_bias(slopes: torch.Tensor, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """(B or 1, H, Sq, Sk) fp32 bias  -slope * |i + Sk - Sq - j|  from (H) or (B, H) slopes."""
    i = torch.arange(seqlen_q, device=slopes.device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=slopes.device).unsqueeze(0)
    distance = (i + seqlen_k - seqlen_q - j).abs().float()
    slopes = slopes.float().reshape(-1, slopes.shape[-1])
    return -slopes[:, :, None, None] * distance


def draw_rng_state() -> torch.Tensor:
    """A fresh [seed, offset] (int64, CPU) from torch's default CPU generator."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64)])


def dropout_keep(rng_state, p, batch, heads, seqlen_q, seqlen_k, device) -> torch.Tensor:
    """(B, H, Sq, Sk) bool, True where an element survives dropout."""
    mask = torch.ops.flash_attention.dropout_mask(rng_state, float(p), batch, heads, seqlen_q,
                                                  seqlen_k, device)
    return mask.bool()


def _scores(q, k, scale, softcap, alibi_slopes, visible, dtype):
    """(B, H, Sq, Sk) scores in `dtype` with softcap, alibi and -inf outside the mask."""
    groups = q.shape[2] // k.shape[2]
    k = k.to(dtype).repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, q.shape[1], k.shape[1]).to(dtype)
    return s.masked_fill(~visible, float("-inf"))


def attention_dense(q, k, v, *, softmax_scale, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                    keep=None, dropout_p=0.0, return_probs=False, upcast=True):
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> out (B, Sq, H, D) in q.dtype, lse (B, H, Sq).

    `window` is already causal-folded (causal == (-1, 0)); `keep` is the dropout mask or None.
    With return_probs, also returns the (B, H, Sq, Sk) softmax before dropout. Computes in fp32
    unless upcast=False (then in q.dtype: the "torch in low precision" baseline of the tests).
    """
    dtype = torch.float32 if upcast else q.dtype
    sq, sk = q.shape[1], k.shape[1]
    visible = visible_mask(sq, sk, window[0], window[1], device=q.device)
    s = _scores(q, k, softmax_scale, softcap, alibi_slopes, visible, dtype)
    has_key = visible.any(dim=-1, keepdim=True)
    s = torch.where(has_key, s, torch.zeros_like(s))      # rows with no key: finite, zeroed below
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - lse.unsqueeze(-1)) * has_key
    lse = torch.where(has_key.squeeze(-1), lse, torch.full_like(lse, float("inf")))
    weights = probs if keep is None else probs * keep / (1.0 - dropout_p)
    groups = q.shape[2] // v.shape[2]
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v.to(dtype).repeat_interleave(groups, dim=2))
    out = out.to(q.dtype)
    return (out, lse, probs) if return_probs else (out, lse)


def attention(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              *, softmax_scale, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
              dropout_p=0.0, rng_state=None, return_probs=False, upcast=True):
    """FlashAttention-2 semantics for dense (B, S, H, D) or varlen (total, H, D) inputs.

    Returns (out, lse) — lse (B, H, Sq) or (H, total_q) — plus, with return_probs, the softmax
    before dropout as (B, H, Sq, Sk) with dropped elements negated (FlashAttention-2's S_dmask).
    Dropout needs rng_state ([seed, offset], int64 CPU).
    """
    window = (window[0], 0) if causal else tuple(window)
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, sq, sk = cu_seqlens_q.numel() - 1, int(max_seqlen_q), int(max_seqlen_k)
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    heads = q.shape[-2]
    keep = None
    if dropout_p > 0:
        keep = dropout_keep(rng_state, dropout_p, batch, heads, max(sq, 1), max(sk, 1), q.device)
    options = dict(softmax_scale=softmax_scale, window=window, softcap=softcap, dropout_p=dropout_p,
                   return_probs=True, upcast=upcast)
    if not varlen:
        out, lse, probs = attention_dense(q, k, v, alibi_slopes=alibi_slopes,
                                          keep=None if keep is None else keep[:, :, :sq, :sk], **options)
        return _with_probs(out, lse, probs, keep) if return_probs else (out, lse)
    return _attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, sq, sk, alibi_slopes, keep,
                             return_probs, options)


def _with_probs(out, lse, probs, keep):
    if keep is not None:
        probs = torch.where(keep[:, :, :probs.shape[2], :probs.shape[3]], probs, -probs)
    return out, lse, probs


def _attention_varlen(q, k, v, cu_q, cu_k, max_sq, max_sk, alibi_slopes, keep, return_probs, options):
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    probs_shape = (len(starts_q) - 1, q.shape[1], max_sq, max_sk) if return_probs else (0,)
    probs_all = q.new_zeros(probs_shape, dtype=torch.float32)
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        keep_b = None if keep is None else keep[b:b + 1, :, :q1 - q0, :k1 - k0]
        out, lse, probs = attention_dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                                          alibi_slopes=slopes, keep=keep_b, **options)
        outs.append(out[0])
        lses.append(lse[0])
        if return_probs:
            probs_all[b, :, :q1 - q0, :k1 - k0] = probs[0].detach()
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses, dim=-1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return _with_probs(out, lse, probs_all, keep) if return_probs else (out, lse)
