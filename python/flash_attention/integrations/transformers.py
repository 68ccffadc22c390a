"""transformers integration: attn_implementation="flash_attention".

Importing this module registers our attention function with transformers' AttentionInterface (and
the matching 2-D padding-mask builder with AttentionMaskInterface), so

    import flash_attention.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="flash_attention")
    # or: model.set_attn_implementation("flash_attention")

runs the model's attention on our kernels: GQA natively, padding masks (and packed sequences) through
the varlen path, causal / sliding window / softcap as kernel options. A call our kernels cannot serve
(a 4-D custom mask, attention sinks, an unsupported dtype, ...) runs transformers' SDPA or an eager
reference instead; the reason is logged once on the "flash_attention" logger and counted in
flash_attention.integrations.stats()["transformers"].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from flash_attention.integrations import _route

__all__ = ["NAME", "attention_forward", "register", "enable", "disable"]

NAME = "flash_attention"
_SITE = "transformers"


def _fallback_reason(query, attention_mask, s_aux) -> str | None:
    if s_aux is not None:
        return "attention sinks (s_aux) are not supported"
    if attention_mask is not None and attention_mask.dim() != 2:
        return f"a {attention_mask.dim()}-D attention mask (only 2-D padding masks are expressible)"
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return f"a {attention_mask.dtype} attention mask (a 2-D bool padding mask is expected)"
    if query.shape[2] == 0 or query.shape[0] == 0:
        return "an empty query"
    return None


def _window(sliding_window: int | None, seqlen_k: int) -> tuple[int, int]:
    # transformers' convention for flash kernels: look back at most sliding_window - 1 keys.
    if sliding_window is None or seqlen_k <= sliding_window:
        return (-1, -1)
    return (sliding_window - 1, sliding_window - 1)


def _packed_cu_seqlens(kwargs, query) -> tuple[torch.Tensor, int] | None:
    """cu_seqlens of sequences packed into one batch row (collator kwargs or restarting position_ids)."""
    if query.shape[0] != 1:
        return None
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"]
        if not torch.equal(cu_q, cu_k):
            return None
        return cu_q.to(torch.int32), int(kwargs.get("max_length_q") or (cu_q[1:] - cu_q[:-1]).max())
    pos = kwargs.get("position_ids")
    if pos is None or pos.dim() != 2 or pos.shape[1] != query.shape[2]:
        return None
    pos = pos[0]
    starts = torch.nonzero(pos == pos.min()).flatten()
    if starts.numel() <= 1:
        return None
    total = torch.tensor([pos.numel()], device=pos.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _flash(q, k, v, attention_mask, packed, options) -> torch.Tensor | None:
    """q (B, Sq, H, D), k/v (B, Sk, Hk, D) -> (B, Sq, H, D) on our kernels, or None."""
    bsz, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    if packed is not None:
        cu, max_len = packed
        out = _route.run(_SITE, q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu,
                         max_seqlen_q=max_len, max_seqlen_k=max_len, **options)
        return None if out is None else out.unsqueeze(0)
    if attention_mask is None:
        return _route.run(_SITE, q, k, v, **options)
    keep_k = attention_mask[:, -sk:].to(q.device)
    keep_q = keep_k[:, -sq:]
    idx_q = keep_q.flatten().nonzero().flatten()
    lens_q = keep_q.sum(1, dtype=torch.int32)
    lens_k = keep_k.sum(1, dtype=torch.int32)
    cu_q = F.pad(lens_q.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    out = _route.run(_SITE, q.reshape(bsz * sq, *q.shape[2:])[idx_q], k[keep_k], v[keep_k],
                     cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(lens_q.max()),
                     max_seqlen_k=int(lens_k.max()), **options)
    if out is None:
        return None
    full = out.new_zeros(bsz * sq, *out.shape[1:]).index_copy(0, idx_q, out)
    return full.view(bsz, sq, *out.shape[1:])


def _dense_mask(attention_mask, packed, bsz, sq, sk, causal, window, device) -> torch.Tensor | None:
    """(B, 1, Sq, Sk) bool mask (True = visible) with the semantics _flash gives a 2-D padding mask
    or packed sequences; None where SDPA's own is_causal (top-left, equal lengths) says the same."""
    if attention_mask is None and packed is None and window == (-1, -1) and (not causal or sq == sk):
        return None
    i = torch.arange(sq, device=device).view(-1, 1) + (sk - sq)
    j = torch.arange(sk, device=device).view(1, -1)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= i
    if window[0] >= 0:
        visible &= j >= i - window[0]
        if not causal:
            visible &= j <= i + window[1]
    visible = visible.expand(bsz, 1, sq, sk)
    if attention_mask is not None:
        visible = visible & attention_mask[:, None, None, -sk:].to(device)
    if packed is not None:   # one batch row holding several sequences: no attention across them
        segment = torch.zeros(sk, dtype=torch.int32, device=device)
        segment[packed[0][1:-1].long()] = 1
        segment = segment.cumsum(0)
        visible = visible & (segment[:, None] == segment[None, :])
    return visible


def _eager(q, k, v, mask, scale, softcap, dropout, s_aux) -> torch.Tensor:
    """Reference attention over (B, H, S, D) tensors with a bool mask, softcap and sinks."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if s_aux is not None:
        sink = s_aux.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # rows with no visible key give 0, as our kernels do
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs.to(v.dtype), v).transpose(1, 2).contiguous()


def _fallback(module, query, key, value, attention_mask, packed, causal, window, scale, softcap,
              dropout, s_aux) -> torch.Tensor:
    bsz, _, sq, _ = query.shape
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask  # a custom mask, already in SDPA's form
    else:
        mask = _dense_mask(attention_mask, packed, bsz, sq, key.shape[2], causal, window, query.device)
    if softcap or s_aux is not None:
        if mask is not None and mask.dtype != torch.bool:
            raise NotImplementedError("softcap / attention sinks with an additive 4-D mask")
        return _eager(query, key, value, mask, scale, softcap, dropout, s_aux)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                    scaling=scale, is_causal=causal and mask is None)
    return out


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, S, D) inputs -> ((B, S, H, D) output, None)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] < key.shape[2]:
        # a static cache: keys past the mask are unused slots
        key, value = key[:, :, :attention_mask.shape[1]], value[:, :, :attention_mask.shape[1]]
    window = _window(sliding_window, key.shape[2])
    packed = None
    if attention_mask is None and query.shape[2] == key.shape[2]:
        packed = _packed_cu_seqlens(kwargs, query)
    reason = _fallback_reason(query, attention_mask, s_aux)
    out = None
    if reason is None:
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        options = dict(dropout_p=dropout, softmax_scale=scale, causal=causal, window_size=window,
                       softcap=float(softcap or 0.0))
        out = _flash(q, k, v, attention_mask, packed, options)
    else:
        _route.note_fallback(_SITE, reason)
    if out is None:
        out = _fallback(module, query, key, value, attention_mask, packed, causal, window, scale,
                        float(softcap or 0.0), dropout, s_aux)
    return out, None


def _flash_kernel_functions():
    """Our FA2-compatible functions, in the tuple transformers' flash loader returns."""
    import flash_attention as fa
    from transformers import modeling_flash_attention_utils as fau

    return (fa.flash_attn_func, fa.flash_attn_varlen_func, getattr(fa, "flash_attn_with_kvcache", None),
            fau._pad_input, fau._unpad_input)


def _teach_flash_loader(name: str) -> None:
    """transformers treats any implementation named "*flash*" as a FlashAttention package and asks
    its loader for one; answer with ours instead of letting it search the hub."""
    from transformers import modeling_flash_attention_utils as fau

    loader = getattr(fau, "_lazy_imports", None)
    if loader is None or getattr(loader, "_flash_attention_names", None) is not None:
        if loader is not None:
            loader._flash_attention_names.add(name)
        return

    def lazy_imports(implementation, *args, **kwargs):
        if implementation is not None and implementation.split("|")[-1] in lazy_imports._flash_attention_names:
            return _flash_kernel_functions()
        return loader(implementation, *args, **kwargs)

    lazy_imports._flash_attention_names = {name}
    fau._lazy_imports = lazy_imports


def register(name: str = NAME) -> None:
    """Registers `name` as an attn_implementation (done on import for "flash_attention")."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    _teach_flash_loader(name)


def enable(model, name: str = NAME):
    """Switches a loaded model to our attention; returns the implementation it had."""
    register(name)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    return previous


def disable(model, previous: str = "sdpa"):
    """Switches the model back to `previous` (what enable() returned)."""
    model.set_attn_implementation(previous)


register()
