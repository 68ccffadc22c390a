"""Backends: who runs an attention call.

    cuda   our CUDA kernels (CUDA tensors, kernels built and serving the call)
    cpu    our C++ CPU implementation (CPU tensors)
    sdpa   torch.nn.functional.scaled_dot_product_attention, only when it honours every option
    math   plain torch in fp32: slow, serves everything (the reference)

The backend is chosen by ``backend=`` on each call, else ``use_backend(...)``, else the environment
variable FLASH_ATTENTION_BACKEND, else ``auto``: the first of cuda, cpu, sdpa, math with no reason
to refuse. ``auto`` logs its choice and why once per distinct (backend, reason) on the
"flash_attention" logger. An explicit backend that cannot serve a call raises ValueError saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import _ops, reference

NAMES = ("auto", "cuda", "cpu", "sdpa", "math")
ENV = "FLASH_ATTENTION_BACKEND"
logger = logging.getLogger("flash_attention")


@dataclasses.dataclass
class Call:
    """One checked attention call (shapes and options already validated by the interface)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    dropout_p: float = 0.0
    softmax_scale: float = 1.0
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    deterministic: bool = False
    need_lse: bool = False    # return_attn_probs: softmax_lse (and S_dmask) are returned
    config: str = ""          # CUDA KernelConfig string, "" = auto

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.varlen else self.q.shape[0]

    @property
    def seqlens(self) -> tuple:
        if self.varlen:
            return self.max_seqlen_q, self.max_seqlen_k
        return self.q.shape[1], self.k.shape[1]

    @property
    def window_folded(self) -> tuple:
        """(left, right) with causal folded in (causal == right 0)."""
        return (self.window[0], 0) if self.causal else tuple(self.window)

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in (self.q, self.k, self.v))


# Each backend: unsupported_reason(call) -> str | None, and run(call) -> (out, lse, rng_state),
# where lse / rng_state may be None when the backend does not produce them.


class CudaBackend:
    name = "cuda"

    def unsupported_reason(self, call: Call) -> Optional[str]:
        if not call.q.is_cuda:
            return f"q is on {call.q.device.type}, not a CUDA device"
        if not _ops.LOADED:
            return _ops.LOAD_ERROR
        return _ops.cuda_unsupported_reason(_cuda_query_key(call)) or None

    def run(self, call: Call):
        return _run_op(call)


class CpuBackend:
    name = "cpu"

    def unsupported_reason(self, call: Call) -> Optional[str]:
        if call.q.device.type != "cpu":
            return f"q is on {call.q.device.type}, not the CPU"
        if not _ops.LOADED:
            return _ops.LOAD_ERROR
        if call.config:
            return f"config={call.config!r} selects a CUDA kernel"
        return None

    def run(self, call: Call):
        return _run_op(call)


class SdpaBackend:
    name = "sdpa"

    def unsupported_reason(self, call: Call) -> Optional[str]:
        sq, sk = call.seqlens
        left, right = call.window_folded
        reasons = [
            (call.config, f"config={call.config!r} selects a CUDA kernel"),
            (call.varlen, "varlen (cu_seqlens) is not supported by SDPA"),
            (call.softcap > 0, "SDPA has no softcap"),
            (call.need_lse, "SDPA does not return softmax_lse / attention probabilities"),
            (call.deterministic and call.needs_grad and call.q.is_cuda,
             "SDPA's CUDA backward is not guaranteed deterministic"),
            (right >= 0 and sk - sq + right < 0 or sk == 0,
             "some query rows see no key (SDPA returns NaN there, FlashAttention returns 0)"),
        ]
        return next((why for bad, why in reasons if bad), None)

    def run(self, call: Call):
        q, k, v = (t.transpose(1, 2) for t in (call.q, call.k, call.v))
        mask, is_causal = _sdpa_mask(call)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=call.dropout_p, is_causal=is_causal,
            scale=call.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2), None, None


class MathBackend:
    name = "math"

    def unsupported_reason(self, call: Call) -> Optional[str]:
        if call.config:
            return f"config={call.config!r} selects a CUDA kernel"
        if call.dropout_p > 0 and not _ops.LOADED:
            return f"dropout needs the op library's dropout_mask ({_ops.LOAD_ERROR})"
        return None

    def run(self, call: Call):
        rng_state = reference.draw_rng_state() if call.dropout_p > 0 else None
        out, lse = reference.attention(
            call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q,
            call.max_seqlen_k, softmax_scale=call.softmax_scale, causal=call.causal, window=call.window,
            softcap=call.softcap, alibi_slopes=call.alibi_slopes, dropout_p=call.dropout_p,
            rng_state=rng_state)
        return out, lse, rng_state


BACKENDS = {b.name: b for b in (CudaBackend(), CpuBackend(), SdpaBackend(), MathBackend())}
AUTO_ORDER = ("cuda", "cpu", "sdpa", "math")


def _cuda_query_key(call: Call) -> tuple:
    """The CUDA support query's arguments. Under torch.compile, batch, sequence lengths and head
    counts (possibly symbolic) are replaced by 1 — support then depends on dtype, head dim (made
    static) and options; the size limits are checked when the kernel runs."""
    sq, sk = call.seqlens
    sizes = (call.batch, sq, sk, call.q.shape[-2], call.k.shape[-2])
    if torch.compiler.is_compiling():
        sizes = (1,) * len(sizes)
    alibi_dims = 0 if call.alibi_slopes is None else call.alibi_slopes.dim()
    return (call.q.device.index or 0, call.q.dtype, *sizes, operator.index(call.q.shape[-1]), call.varlen,
            float(call.dropout_p), bool(call.causal), int(call.window[0]), int(call.window[1]),
            float(call.softcap), alibi_dims, call.config)


def _run_op(call: Call):
    sq, sk = call.seqlens
    args = (call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, sq, sk, call.dropout_p,
            call.softmax_scale, call.causal, call.window[0], call.window[1], call.softcap,
            call.alibi_slopes, call.config, call.deterministic)
    if call.needs_grad or torch.compiler.is_compiling():
        return torch.ops.flash_attention.fwd(*args)
    # Inference: nothing to record, so skip the (Python) autograd kernel and its per-call cost.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.flash_attention.fwd(*args)


def _sdpa_mask(call: Call):
    """(attn_mask, is_causal) expressing causal / window / alibi for SDPA."""
    sq, sk = call.seqlens
    left, right = call.window_folded
    if call.alibi_slopes is None and left < 0 and right < 0:
        return None, False
    if call.alibi_slopes is None and left < 0 and right == 0 and sq == sk:
        return None, True   # SDPA's is_causal is top-left aligned: equal to ours only when Sq == Sk
    visible = reference.visible_mask(sq, sk, left, right, device=call.q.device)
    if call.alibi_slopes is None:
        return visible, False
    bias = reference.alibi_bias(call.alibi_slopes, sq, sk).masked_fill(~visible, float("-inf"))
    return bias.to(call.q.dtype), False


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------

_forced: Optional[str] = None
_logged: set = set()


def check_name(name, argument="backend") -> str:
    if name not in NAMES:
        raise ValueError(f"{argument} must be one of {', '.join(NAMES)} (got {name!r})")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the calls inside the block on backend `name` (unless a call passes backend=).

    Process-wide (not per thread)."""
    global _forced
    check_name(name, "use_backend(name)")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def requested(backend: Optional[str]) -> str:
    """The backend name in force for a call: backend= > use_backend() > $FLASH_ATTENTION_BACKEND > auto."""
    if backend is not None:
        return check_name(backend)
    if _forced is not None:
        return _forced
    env = os.environ.get(ENV)
    return check_name(env, f"${ENV}") if env else "auto"


def unsupported_reasons(call: Call) -> dict:
    """{backend name: reason or None} for every backend (used by the environment report)."""
    return {name: BACKENDS[name].unsupported_reason(call) for name in AUTO_ORDER}


def choose(call: Call, backend: Optional[str] = None) -> str:
    name = requested(backend)
    if name != "auto":
        reason = BACKENDS[name].unsupported_reason(call)
        if reason:
            raise ValueError(f"backend={name!r} cannot serve this call: {reason}")
        return name
    skipped = []
    for candidate in AUTO_ORDER:
        reason = BACKENDS[candidate].unsupported_reason(call)
        if reason is None:
            _log_once(candidate, "; ".join(skipped) or "first choice")
            return candidate
        skipped.append(f"{candidate}: {reason}")
    raise ValueError("no backend can serve this call: " + "; ".join(skipped))


def _log_once(name: str, why: str) -> None:
    if torch.compiler.is_compiling() or (name, why) in _logged:
        return
    _logged.add((name, why))
    logger.info("flash_attention: auto backend -> %s (%s)", name, why)


def run(call: Call, backend: Optional[str] = None):
    """(out, lse or None, rng_state or None) from the chosen backend, plus its name."""
    name = choose(call, backend)
    return BACKENDS[name].run(call), name
