"""diffusers integration: an attention processor that runs on flash_attention's kernels.

    from flash_attention.integrations import diffusers as fa_diffusers
    fa_diffusers.enable(pipe)      # a pipeline, or one model (UNet, DiT / transformer, VAE)
    fa_diffusers.disable(pipe)     # restores the processors enable() replaced

enable() installs FlashAttnProcessor on every attention module (diffusers' `Attention`) whose
processor is one of the standard SDPA / eager processors; modules with other processors (fused QKV,
IP-adapter, model-specific processors, ...) are left alone and listed in the log. Per call, what our
kernels cannot serve (an attention mask, an unsupported dtype or head dim, ...) runs the module's
previous processor or torch SDPA; the reason is logged once on the "flash_attention" logger and
counted in flash_attention.integrations.stats()["diffusers"].
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from flash_attention.integrations import _route

__all__ = ["FlashAttnProcessor", "enable", "disable"]

log = logging.getLogger("flash_attention")
_SITE = "diffusers"
_REPLACEABLE = (AttnProcessor, AttnProcessor2_0)
_previous: "weakref.WeakKeyDictionary[Attention, object]" = weakref.WeakKeyDictionary()


class FlashAttnProcessor:
    """Standard diffusers self/cross attention (AttnProcessor2_0's semantics, using attn.scale),
    with the attention itself on our kernels. `fallback` serves the calls we cannot."""

    def __init__(self, fallback=None):
        self.fallback = fallback if fallback is not None else AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            _route.note_fallback(_SITE, "an attention_mask was given (masks are not expressible)")
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.dim() == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        q, k, v = self._heads(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context))
        out = _attention(q, k, v, attn.scale)
        out = out.flatten(2).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))

        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _heads(attn: Attention, q, k, v):
        """(B, S, H*D) projections -> (B, S, H, D), with the module's q/k norms (over D)."""
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.unflatten(-1, (attn.heads, head_dim)) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v


def _attention(q, k, v, scale: float) -> torch.Tensor:
    """(B, S, H, D) attention on our kernels, or torch SDPA when they cannot serve the call."""
    out = _route.run(_SITE, q, k, v, softmax_scale=scale)
    if out is not None:
        return out
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2)


def _models(x) -> list[tuple[str, torch.nn.Module]]:
    """The torch modules of a pipeline (its components), or [x] for a model."""
    if isinstance(x, torch.nn.Module):
        return [(type(x).__name__, x)]
    components = getattr(x, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"enable/disable expects a diffusers pipeline or a torch.nn.Module, got {type(x).__name__}")
    return [(name, m) for name, m in components.items() if isinstance(m, torch.nn.Module)]


def enable(x) -> int:
    """Installs FlashAttnProcessor on every replaceable attention module of `x` (a pipeline or a
    model); returns how many modules now use it. Idempotent."""
    installed, skipped = 0, Counter()
    for owner, model in _models(x):
        for module in model.modules():
            if not isinstance(module, Attention):
                continue
            processor = module.processor
            if isinstance(processor, FlashAttnProcessor):
                installed += 1
            elif type(processor) in _REPLACEABLE:
                _previous[module] = processor
                module.set_processor(FlashAttnProcessor(fallback=processor))
                installed += 1
            else:
                skipped[f"{owner}: {type(processor).__name__}"] += 1
    log.info("diffusers: flash_attention processor on %d attention modules", installed)
    for what, n in skipped.items():
        log.info("diffusers: left %d attention modules with processor %s unchanged (not covered)", n, what)
    return installed


def disable(x) -> int:
    """Restores the processors that enable() replaced; returns how many modules were restored."""
    restored = 0
    for _, model in _models(x):
        for module in model.modules():
            if isinstance(module, Attention) and isinstance(module.processor, FlashAttnProcessor):
                previous = _previous.pop(module, None) or module.processor.fallback
                module.set_processor(previous)
                restored += 1
    log.info("diffusers: restored the previous processor on %d attention modules", restored)
    return restored
