"""Routing shared by nn.MultiheadAttention and the diffusers / transformers integrations.

Each call site asks `run(site, q, k, v, ...)` to run one attention call on our kernels (the `cuda`
backend for CUDA tensors, the `cpu` backend for CPU tensors). When our kernels cannot serve the call,
`run` returns None and the caller falls back to the model's own attention. Either way the outcome is
counted (see `stats()`) and logged once per distinct (site, outcome) on the "flash_attention" logger,
so a user can see that our kernel ran, or why it did not.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict

import torch

log = logging.getLogger("flash_attention")

_lock = threading.Lock()
_counts: dict[str, Counter] = defaultdict(Counter)
_logged: set[tuple[str, str]] = set()


def stats() -> dict[str, dict[str, int]]:
    """Calls per site: {"diffusers": {"flash_attention[cuda]": 48, "fallback: <reason>": 2}, ...}."""
    with _lock:
        return {site: dict(c) for site, c in _counts.items()}


def reset_stats() -> None:
    """Clears the counts; the next outcome of each kind is logged again."""
    with _lock:
        _counts.clear()
        _logged.clear()


def kernel_calls(site: str) -> int:
    """How many calls at `site` ran on our kernels."""
    return sum(n for k, n in stats().get(site, {}).items() if k.startswith("flash_attention["))


def fallback_calls(site: str) -> int:
    return sum(n for k, n in stats().get(site, {}).items() if k.startswith("fallback"))


def _note(site: str, outcome: str, message: str, level: int) -> None:
    with _lock:
        _counts[site][outcome] += 1
        first = (site, outcome) not in _logged
        _logged.add((site, outcome))
    if first:
        log.log(level, "%s: %s", site, message)


def note_fallback(site: str, reason: str) -> None:
    """Records (and logs once) that a call at `site` fell back to the model's own attention."""
    _note(site, f"fallback: {reason}", f"falling back to the default attention: {reason}", logging.INFO)


def our_backend(t: torch.Tensor) -> str:
    return "cuda" if t.is_cuda else "cpu"


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens_q=None,
                       cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, dropout_p=0.0,
                       softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0) -> str | None:
    """Why our kernels cannot serve this call (None when they can). Runs nothing."""
    from flash_attention import backends

    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (fp16, bf16 and fp32 are supported)"
    call = backends.Call(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q or 0, max_seqlen_k=max_seqlen_k or 0, dropout_p=dropout_p,
        softmax_scale=softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5,
        causal=causal, window=tuple(window_size), softcap=softcap)
    return backends.BACKENDS[our_backend(q)].unsupported_reason(call)


def run(site: str, q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
        max_seqlen_k=None, **options) -> torch.Tensor | None:
    """Runs attention on our kernels; None (with the reason noted) when they cannot serve it.

    q/k/v follow FlashAttention-2's layouts: (B, S, H, D), or packed (total, H, D) with cu_seqlens.
    `options` are flash_attn_func's keywords (dropout_p, softmax_scale, causal, window_size, softcap).
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        options.update(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
    backend = our_backend(q)
    reason = unsupported_reason(q, k, v, **options)
    if reason is not None:
        note_fallback(site, f"{backend} backend: {reason}")
        return None
    import flash_attention as fa

    fn = fa.flash_attn_varlen_func if varlen else fa.flash_attn_func
    out = fn(q, k, v, backend=backend, **options)
    shape = "x".join(str(s) for s in q.shape)
    _note(site, f"flash_attention[{backend}]",
          f"attention runs on flash_attention's {backend} kernels (first call: q {shape} {q.dtype})",
          logging.INFO)
    return out
