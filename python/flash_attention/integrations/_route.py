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


def _note(site: str, outcome: str, message, level: int) -> None:
    """Counts `outcome`; logs `message` (a string, or a callable making it) the first time."""
    with _lock:
        _counts[site][outcome] += 1
        first = (site, outcome) not in _logged
        _logged.add((site, outcome))
    if first:
        log.log(level, "%s: %s", site, message() if callable(message) else message)


def note_fallback(site: str, reason: str) -> None:
    """Records (and logs once) that a call at `site` fell back to the model's own attention."""
    _note(site, f"fallback: {reason}", f"falling back to the default attention: {reason}", logging.INFO)


def our_backend(t: torch.Tensor) -> str:
    return "cuda" if t.is_cuda else "cpu"


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def run(site: str, q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
        max_seqlen_k=None, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        softcap=0.0) -> torch.Tensor | None:
    """Runs attention on our kernels; None (with the reason noted) when they cannot serve it.

    q/k/v follow FlashAttention-2's layouts: (B, S, H, D), or packed (total, H, D) with cu_seqlens.
    The keywords are flash_attn_func's. Models call this once per attention layer and step, so the
    call is checked and built once and handed straight to our backend (no backend choice, no second
    support query): the per-call host cost stays close to torch SDPA's.
    """
    from flash_attention import backends, interface

    backend = our_backend(q)
    if q.dtype not in _DTYPES:
        note_fallback(site, f"{backend} backend: dtype {q.dtype} (fp16, bf16 and fp32 are supported)")
        return None
    call = interface._make_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                softmax_scale, causal, window_size, softcap, None, False, False, "")
    ours = backends.BACKENDS[backend]
    reason = ours.unsupported_reason(call)
    if reason is not None:
        note_fallback(site, f"{backend} backend: {reason}")
        return None
    out, _, _ = ours.run(call)
    _note(site, f"flash_attention[{backend}]",
          lambda: f"attention runs on flash_attention's {backend} kernels (first call: q "
                  f"{'x'.join(str(n) for n in q.shape)} {q.dtype})", logging.INFO)
    return out
