"""Inference with a KV cache: FlashAttention-2's ``flash_attn_with_kvcache`` (same signature and
semantics), the varlen forward over a paged cache (paged prefill), and ``flash_attn_combine``, which
merges attention results computed over disjoint key sets (split-KV, context parallelism).

The ops are ``torch.ops.flash_attention.fwd_kvcache`` and ``fwd_combine`` (src/torch/ops.cpp); their
fake kernels are registered here. There is no backward: these are inference entry points.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _ops

__all__ = ["flash_attn_with_kvcache", "flash_attn_varlen_paged", "flash_attn_combine"]


def _require_library() -> None:
    if not _ops.LOADED:
        raise RuntimeError(f"flash_attention: the op library is not available: {_ops.LOAD_ERROR}")


def _window(window_size) -> tuple:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size must be a pair (left, right) (got {window_size!r})")
    return int(window_size[0]), int(window_size[1])


def _seqlens_tensor(cache_seqlens, batch: int, device) -> Optional[torch.Tensor]:
    if cache_seqlens is None or isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens
    if isinstance(cache_seqlens, int):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    raise TypeError(f"cache_seqlens must be an int or an int32 tensor (got {type(cache_seqlens).__name__})")


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    check_indices: bool = True,
):
    """Attention of q over a KV cache, optionally appending new keys / values first (in place).

    q: (batch, seqlen, nheads, headdim). k_cache / v_cache: (batch_cache, seqlen_cache, nheads_k,
    headdim), or paged (num_blocks, page_block_size, nheads_k, headdim) with ``block_table``
    (batch, max_num_blocks_per_seq) int32; page_block_size must be a multiple of 16.
    k / v: (batch, seqlen_new, nheads_k, headdim), written to the cache at ``cache_seqlens`` (after
    rotary on k). rotary_cos / rotary_sin: (seqlen_ro, rotary_dim / 2), q's dtype; q rotates at
    positions cache_seqlens, cache_seqlens + 1, ... when causal or windowed, else at cache_seqlens.
    cache_seqlens: int or (batch,) int32, the cache rows valid before the append (None: the whole
    cache). cache_batch_idx: (batch,) int32 rows of a contiguous cache. cache_leftpad: (batch,) int32
    padding rows at the start of each sequence. num_splits: split-KV parts (0 = heuristic).

    check_indices (an addition to FlashAttention-2's signature): range-check cache_seqlens,
    cache_leftpad, cache_batch_idx and block_table before touching the cache. On CUDA this costs one
    stream synchronisation; it is skipped automatically under CUDA graph capture. The kernels never
    access memory out of bounds either way.

    Returns out (batch, seqlen, nheads, headdim), and softmax_lse (batch, nheads, seqlen) fp32 when
    return_softmax_lse.
    """
    _require_library()
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    left, right = _window(window_size)
    cache_seqlens = _seqlens_tensor(cache_seqlens, q.shape[0], q.device)
    out, lse = torch.ops.flash_attention.fwd_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
        cache_leftpad, block_table, None, 0, float(softmax_scale), bool(causal), left, right,
        float(softcap), bool(rotary_interleaved), alibi_slopes, int(num_splits), bool(check_indices))
    return (out, lse) if return_softmax_lse else out


def flash_attn_varlen_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_table: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size=(-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_softmax_lse: bool = False,
    num_splits: int = 0,
    check_indices: bool = True,
):
    """``flash_attn_varlen_func`` with ``block_table`` (paged prefill): q (total_q, nheads, headdim)
    packed by cu_seqlens_q; sequence b's keys are the first cu_seqlens_k[b + 1] - cu_seqlens_k[b]
    positions of its pages in k_cache / v_cache (num_blocks, page_block_size, nheads_k, headdim).
    Returns out (total_q, nheads, headdim), and softmax_lse (nheads, total_q) when asked.
    """
    _require_library()
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    left, right = _window(window_size)
    if not (isinstance(cu_seqlens_k, torch.Tensor) and cu_seqlens_k.dim() == 1 and cu_seqlens_k.numel() >= 2):
        raise ValueError("cu_seqlens_k must be a 1-D int32 tensor of batch + 1 entries")
    seqlens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    out, lse = torch.ops.flash_attention.fwd_kvcache(
        q, k_cache, v_cache, None, None, None, None, seqlens_k, None, None, block_table, cu_seqlens_q,
        int(max_seqlen_q), float(softmax_scale), bool(causal), left, right, float(softcap), True,
        alibi_slopes, int(num_splits), bool(check_indices))
    return (out, lse) if return_softmax_lse else out


def flash_attn_combine(out_partial: torch.Tensor, lse_partial: torch.Tensor,
                       out: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None):
    """Merges partial attention results (FlashAttention-3's signature).

    out_partial: (num_splits, batch, seqlen, nheads, headdim) fp32; lse_partial: (num_splits, batch,
    seqlen, nheads) fp32, -inf for a part with no visible key. Returns (out, softmax_lse): out
    (batch, seqlen, nheads, headdim) in out_dtype (default fp32, or out's dtype), softmax_lse (batch,
    seqlen, nheads) fp32 (+inf where no part saw a key).
    """
    _require_library()
    if out is not None and out_dtype is None:
        out_dtype = out.dtype
    result, lse = torch.ops.flash_attention.fwd_combine(out_partial, lse_partial, out_dtype)
    if out is not None:
        out.copy_(result)
        result = out
    return result, lse


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes only)
# ---------------------------------------------------------------------------------------------


def _fwd_kvcache_fake(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                      cache_batch_idx, cache_leftpad, block_table, cu_seqlens_q, max_seqlen_q,
                      softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved,
                      alibi_slopes, num_splits, check_indices=True):
    out = q.new_empty(q.shape)
    if cu_seqlens_q is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return out, q.new_empty(lse_shape, dtype=torch.float32)


def _fwd_combine_fake(out_partial, lse_partial, out_dtype=None):
    _, batch, seqlen, heads, head_dim = out_partial.shape
    out = out_partial.new_empty((batch, seqlen, heads, head_dim), dtype=out_dtype or torch.float32)
    lse = out_partial.new_empty((batch, heads, seqlen), dtype=torch.float32).transpose(1, 2)
    return out, lse


if _ops.LOADED:
    torch.library.register_fake("flash_attention::fwd_kvcache", _fwd_kvcache_fake)
    torch.library.register_fake("flash_attention::fwd_combine", _fwd_combine_fake)
