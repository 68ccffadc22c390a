"""Attention modules built on flash_attention's kernels.

FlashAttention       the core attention (no projections) as a module: causal, sliding window,
                     softcap, dropout (active in training only), varlen through cu_seqlens.
MultiheadAttention   a drop-in for torch.nn.MultiheadAttention: same constructor, forward signature
                     and parameter names (a state_dict loads unchanged). Calls our kernels when it
                     can; anything it cannot express (need_weights=True, general masks, bias_kv, ...)
                     runs torch's implementation, with the reason logged once and counted in
                     flash_attention.integrations.stats()["nn.MultiheadAttention"].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_attention.integrations import _route

__all__ = ["FlashAttention", "MultiheadAttention"]

_SITE = "nn.MultiheadAttention"


class FlashAttention(torch.nn.Module):
    """Softmax(q k^T * scale) v over (B, S, H, D) tensors, or packed (total, H, D) with cu_seqlens.

    Arguments mirror flash_attn_func; `attention_dropout` applies only in training mode.
    """

    def __init__(self, softmax_scale: float | None = None, attention_dropout: float = 0.0,
                 causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                 deterministic: bool = False, backend: str = "auto"):
        super().__init__()
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {attention_dropout}")
        if len(tuple(window_size)) != 2:
            raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
        if softcap < 0:
            raise ValueError(f"softcap must be >= 0, got {softcap}")
        self.softmax_scale = softmax_scale
        self.attention_dropout = attention_dropout
        self.causal = causal
        self.window_size = tuple(window_size)
        self.softcap = softcap
        self.deterministic = deterministic
        self.backend = backend

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, window_size={self.window_size}, softcap={self.softcap}, "
                f"attention_dropout={self.attention_dropout}, backend={self.backend!r}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor | None = None,
                cu_seqlens_k: Tensor | None = None, max_seqlen_q: int | None = None,
                max_seqlen_k: int | None = None, causal: bool | None = None) -> Tensor:
        import flash_attention as fa

        options = dict(
            dropout_p=self.attention_dropout if self.training else 0.0,
            softmax_scale=self.softmax_scale,
            causal=self.causal if causal is None else causal,
            window_size=self.window_size, softcap=self.softcap,
            deterministic=self.deterministic, backend=self.backend)
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
        if cu_seqlens_q is None:
            return fa.flash_attn_func(q, k, v, **options)
        if max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError("max_seqlen_q and max_seqlen_k are required with cu_seqlens_q/k")
        return fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, **options)


def _is_causal_mask(mask: Tensor, seqlen_q: int, seqlen_k: int) -> bool:
    """True when a (Sq, Sk) bool / additive mask hides exactly the keys j > i + Sk - Sq."""
    if mask.dim() != 2 or tuple(mask.shape) != (seqlen_q, seqlen_k):
        return False
    hidden = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=mask.device)
    hidden = hidden.triu(seqlen_k - seqlen_q + 1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, hidden))
    return bool(torch.all(torch.where(hidden, mask == float("-inf"), mask == 0)))


def _is_empty_mask(mask: Tensor) -> bool:
    return bool((~mask).all()) if mask.dtype == torch.bool else bool((mask == 0).all())


def _padding_as_bool(mask: Tensor) -> Tensor | None:
    """key_padding_mask as bool (True = padded), or None for a float mask that is not 0 / -inf."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(((mask == 0) | (mask == float("-inf"))).all()):
        return None
    return mask == float("-inf")


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on flash_attention's kernels.

    Served by our kernels: need_weights=False; attn_mask None, all-visible, or the causal mask
    (is_causal=True, or a bool / -inf mask equal to it); key_padding_mask without a causal mask
    (through the varlen path). Everything else runs torch's implementation (reason logged once).
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        reason = self._unsupported_reason(query, key, value, key_padding_mask, need_weights,
                                          attn_mask, is_causal)
        out = None
        if reason is None:
            out = self._flash_forward(query, key, value, key_padding_mask, attn_mask, is_causal)
        else:
            _route.note_fallback(_SITE, reason)
        if out is None:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        return out, None

    def _unsupported_reason(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                            is_causal) -> str | None:
        if need_weights:
            return "need_weights=True asks for the attention weights (pass need_weights=False)"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported"
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return "inputs must all be batched (3-D) or all unbatched (2-D)"
        if query.is_nested:
            return "nested tensors are not supported"
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            return "embedding sizes differ from embed_dim / kdim / vdim"
        batch = 0 if self.batch_first else 1
        if key.shape[:-1] != value.shape[:-1] or (query.dim() == 3 and query.shape[batch] != key.shape[batch]):
            return "query / key / value batch or sequence sizes do not match"
        if torch.is_autocast_enabled(query.device.type):
            return "autocast is enabled"
        if is_causal and attn_mask is None:
            return "is_causal=True without attn_mask (torch requires the mask as well)"
        if is_causal and self._lengths(query, key)[0] != self._lengths(query, key)[1]:
            return "is_causal=True with seqlen_q != seqlen_k (torch aligns that mask top-left)"
        if attn_mask is not None and not is_causal:
            sq, sk = self._lengths(query, key)
            empty = attn_mask.dim() == 2 and _is_empty_mask(attn_mask)
            if not (empty or _is_causal_mask(attn_mask, sq, sk)):
                return "attn_mask is neither causal nor empty (only those are expressible)"
        causal = is_causal or (attn_mask is not None and not _is_empty_mask(attn_mask))
        if key_padding_mask is not None:
            if causal:
                return "key_padding_mask together with a causal mask is not supported"
            padded = _padding_as_bool(key_padding_mask)
            if padded is None:
                return "float key_padding_mask with values other than 0 / -inf"
            if bool(padded.all(dim=-1).any()):
                return "a batch row has every key padded"
        return None

    def _lengths(self, query: Tensor, key: Tensor) -> tuple[int, int]:
        d = 1 if query.dim() == 3 and self.batch_first else 0
        return query.shape[d], key.shape[d]

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _flash_forward(self, query, key, value, key_padding_mask, attn_mask,
                       is_causal) -> Tensor | None:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value)
        bsz, sq, sk, h = q.shape[0], q.shape[1], k.shape[1], self.num_heads
        q, k, v = q.view(bsz, sq, h, -1), k.view(bsz, sk, h, -1), v.view(bsz, sk, h, -1)
        causal = is_causal or (attn_mask is not None and not _is_empty_mask(attn_mask))
        dropout = self.dropout if self.training else 0.0
        if key_padding_mask is None:
            out = _route.run(_SITE, q, k, v, dropout_p=dropout, causal=causal)
        else:
            out = self._padded_attention(q, k, v, _padding_as_bool(key_padding_mask), dropout)
        if out is None:
            return None
        out = self.out_proj(out.reshape(bsz, sq, self.embed_dim))
        if unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    @staticmethod
    def _padded_attention(q, k, v, padded: Tensor, dropout: float) -> Tensor | None:
        """Non-causal attention over the unpadded keys of each batch row, via the varlen path."""
        bsz, sq = q.shape[:2]
        keep = ~padded.to(q.device)
        lens_k = keep.sum(dim=1, dtype=torch.int32)
        cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (bsz + 1) * sq, sq, dtype=torch.int32, device=q.device)
        out = _route.run(_SITE, q.reshape(bsz * sq, *q.shape[2:]), k[keep], v[keep],
                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq,
                         max_seqlen_k=int(lens_k.max()), dropout_p=dropout)
        return None if out is None else out.view(bsz, sq, *q.shape[2:])
