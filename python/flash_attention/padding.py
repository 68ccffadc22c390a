"""pad_input / unpad_input with FlashAttention-2's bert_padding semantics (unpad_input returns the
5-tuple of FlashAttention-2 >= 2.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Drop padding rows.

    hidden_states: (batch, seqlen, ...); attention_mask: (batch, seqlen) bool/int, 1 = a real token;
    unused_mask: optional (batch, seqlen), 1 = a token that is kept in the packed tensor but not
    counted in used_seqlens (allocated but unused).
    Returns (hidden_states (total, ...), indices (total,) of the kept rows in the flattened
    (batch * seqlen) axis, cu_seqlens (batch + 1,) int32, max_seqlen_in_batch (int),
    used_seqlens_in_batch (batch,) int32).
    """
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of unpad_input: (total, ...) rows placed at `indices` of a zero (batch, seqlen, ...)."""
    rest = hidden_states.shape[1:]
    output = hidden_states.new_zeros((batch * seqlen, *rest))
    output = output.index_put((indices,), hidden_states)
    return output.reshape(batch, seqlen, *rest)
