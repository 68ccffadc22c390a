"""FlashAttention-2's public functions (same names, signatures, defaults, layouts and returns), plus
`forward` / `forward_timed`. Every function also takes a keyword-only ``backend=`` (see backends.py).

Layouts: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim) with
nheads % nheads_k == 0; varlen: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim) and int32
cu_seqlens of length batch + 1. Causal / window masks are aligned to the bottom-right corner.

With return_attn_probs=True the functions return (out, softmax_lse, S_dmask): softmax_lse is
(batch, nheads, seqlen_q) or, varlen, (nheads, total_q); S_dmask is, when dropout_p > 0, the softmax
before dropout as (batch, nheads, seqlen_q, seqlen_k) fp32 with dropped elements negated (recomputed
for testing; O(seqlen^2) memory), and None when dropout_p == 0 — as in FlashAttention-2.

FP8, as FlashAttention-3 exposes it: float8_e4m3fn q, k, v with optional fp32 q_descale / k_descale /
v_descale of shape (batch, nheads_k) (the inputs are q * q_descale etc., per batch and kv head) run the
Hopper (sm90) kernels; out is bfloat16. Forward only (backward raises), no varlen / dropout / alibi.
"""

from __future__ import annotations

import time

import torch

from . import _checks, _ops, backends, reference

__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
    "forward", "forward_timed",
]


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
               softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
               return_attn_probs, backend, config="", descale=(None, None, None)):
    """Checks every argument, runs the chosen backend, shapes the FlashAttention-2 return value."""
    if _is_fp8(q, k, v, descale):
        varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
        return _fp8_attention(q, k, v, varlen, dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, return_attn_probs, backend, config, descale)
    call = _make_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, config)
    (out, lse, rng_state), _ = backends.run(call, backend)
    if not return_attn_probs:
        return out
    return out, lse, _attn_probs(call, rng_state) if call.dropout_p > 0 else None


def _make_call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size,
               softcap, alibi_slopes, deterministic, need_lse, config) -> backends.Call:
    varlen = cu_q is not None or cu_k is not None
    _checks.qkv(q, k, v, varlen)
    if varlen:
        max_q, max_k = _checks.varlen(q, k, cu_q, cu_k, max_q, max_k)
    batch = cu_q.shape[0] - 1 if varlen else q.shape[0]
    _checks.alibi_slopes(alibi_slopes, q, batch)
    return backends.Call(
        q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q or 0,
        max_seqlen_k=max_k or 0, dropout_p=_checks.dropout_p(dropout_p),
        softmax_scale=_checks.softmax_scale(softmax_scale, q.shape[-1]), causal=bool(causal),
        window=_checks.window_size(window_size), softcap=_checks.softcap(softcap),
        alibi_slopes=alibi_slopes, deterministic=bool(deterministic), need_lse=bool(need_lse),
        config=config)


_FP8 = torch.float8_e4m3fn
_DESCALE_NAMES = ("q_descale", "k_descale", "v_descale")


def _is_fp8(q, k, v, descale) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == _FP8 for t in (q, k, v)) or \
        any(d is not None for d in descale)


def _fp8_attention(q, k, v, varlen, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   return_attn_probs, backend, config, descale):
    """float8_e4m3fn q, k, v (or descale factors given): the op fwd_fp8 (CUDA sm90), out in bfloat16."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(t, name)
    if not any(t.dtype == _FP8 for t in (q, k, v)):
        given = next(n for n, d in zip(_DESCALE_NAMES, descale) if d is not None)
        raise ValueError(f"{given} is only for float8_e4m3fn inputs (q is {q.dtype})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != _FP8:
            raise TypeError(f"{name} must be float8_e4m3fn like the other inputs (FP8 attention), got {t.dtype}")
    _checks.qkv(q, k, v, varlen, dtypes=(_FP8,), dtype_names="float8_e4m3fn")
    if varlen:
        raise NotImplementedError("float8_e4m3fn inputs: varlen (cu_seqlens) is not supported")
    name = backends.requested(backend)
    if name not in ("auto", "cuda"):
        raise ValueError(f"backend={name!r} cannot run float8_e4m3fn inputs: FP8 attention runs on the cuda "
                         "backend only")
    if _checks.dropout_p(dropout_p) != 0.0:
        raise ValueError(f"dropout_p must be 0 with float8_e4m3fn inputs (got {dropout_p})")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes are not supported with float8_e4m3fn inputs")
    for dname, d in zip(_DESCALE_NAMES, descale):
        if d is not None:
            _checks.same_device(_checks.tensor(d, dname), dname, q)   # dtype and shape: checked by the op
    if not _ops.LOADED:
        raise RuntimeError(f"float8_e4m3fn inputs need the op library: {_ops.LOAD_ERROR}")
    left, right = _checks.window_size(window_size)
    out, lse = torch.ops.flash_attention.fwd_fp8(
        q, k, v, *descale, _checks.softmax_scale(softmax_scale, q.shape[-1]), bool(causal), left, right,
        _checks.softcap(softcap), config)
    return (out, lse, None) if return_attn_probs else out


@torch.no_grad()
def _attn_probs(call: backends.Call, rng_state: torch.Tensor) -> torch.Tensor:
    *_, probs = reference.attention(
        call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q,
        call.max_seqlen_k, softmax_scale=call.softmax_scale, causal=call.causal, window=call.window,
        softcap=call.softcap, alibi_slopes=call.alibi_slopes, dropout_p=call.dropout_p,
        rng_state=rng_state, return_probs=True)
    return probs


def _paged_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs,
                   block_table):
    """flash_attn_varlen_func with block_table: k / v are paged caches (num_blocks, page_size, Hk, D);
    forward only (inference), as in FlashAttention-2."""
    from .kvcache import flash_attn_varlen_paged  # the paged path lives with the KV-cache code

    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"with block_table, {name} must be a paged cache (num_blocks, page_size, nheads_k, "
                             f"headdim), got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0 with block_table (paged KV is inference only), got {dropout_p}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("block_table (paged KV) has no backward: call it under torch.no_grad() "
                         "or with tensors that do not require grad")
    out, lse = flash_attn_varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       block_table, softmax_scale=softmax_scale, causal=causal,
                                       window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                       return_softmax_lse=True)
    return (out, lse, None) if return_attn_probs else out


# ---------------------------------------------------------------------------------------------
# FlashAttention-2 API
# ---------------------------------------------------------------------------------------------


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                    *, q_descale=None, k_descale=None, v_descale=None, backend=None):
    """Attention over q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim).

    dropout_p: in [0, 1) (pass 0.0 at evaluation). softmax_scale: default 1/sqrt(headdim).
    causal: bottom-right aligned causal mask. window_size: (left, right) sliding window, -1 = unbounded.
    softcap: > 0 caps scores as softcap * tanh(scores / softcap). alibi_slopes: (nheads,) or
    (batch, nheads) fp32; adds -slope * |i + seqlen_k - seqlen_q - j| to the scores.
    deterministic: deterministic backward. return_attn_probs: also return (softmax_lse, S_dmask).
    q_descale / k_descale / v_descale (keyword only): with float8_e4m3fn q, k, v only (see the module
    docstring).
    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask).
    """
    return _attention(q, k, v, None, None, None, None, dropout_p, softmax_scale, causal, window_size,
                      softcap, alibi_slopes, deterministic, return_attn_probs, backend,
                      descale=(q_descale, k_descale, v_descale))


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False, *, backend=None):
    """flash_attn_func with qkv packed as (batch, seqlen, 3, nheads, headdim)."""
    _checks.packed(qkv, "qkv", 5, 3, "(batch, seqlen, 3, nheads, headdim)")
    q, k, v = qkv.unbind(dim=2)
    return _attention(q, k, v, None, None, None, None, dropout_p, softmax_scale, causal, window_size,
                      softcap, alibi_slopes, deterministic, return_attn_probs, backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False, *, backend=None):
    """flash_attn_func with kv packed as (batch, seqlen_k, 2, nheads_k, headdim)."""
    _checks.packed(kv, "kv", 5, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(dim=2)
    return _attention(q, k, v, None, None, None, None, dropout_p, softmax_scale, causal, window_size,
                      softcap, alibi_slopes, deterministic, return_attn_probs, backend)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None, *, backend=None):
    """Attention over packed sequences: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim).

    cu_seqlens_q/k: int32 (batch + 1,) cumulative sequence lengths starting at 0 and ending at
    total_q/k; max_seqlen_q/k: the longest sequence. Values are checked (on CUDA this reads
    cu_seqlens to the host once per call; skipped under torch.compile). With block_table (int32
    (batch, max_pages)), k / v are paged caches (num_blocks, page_size, nheads_k, headdim): paged
    prefill, forward only.
    """
    if block_table is not None:
        return _paged_prefill(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                              softmax_scale, causal, window_size, softcap, alibi_slopes,
                              return_attn_probs, block_table)
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, backend)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                     *, backend=None):
    """flash_attn_varlen_func with qkv packed as (total, 3, nheads, headdim)."""
    _checks.packed(qkv, "qkv", 4, 3, "(total, 3, nheads, headdim)")
    q, k, v = qkv.unbind(dim=1)
    return _attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False, *, backend=None):
    """flash_attn_varlen_func with kv packed as (total_k, 2, nheads_k, headdim)."""
    _checks.packed(kv, "kv", 4, 2, "(total_k, 2, nheads_k, headdim)")
    k, v = kv.unbind(dim=1)
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                      softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                      return_attn_probs, backend)


# ---------------------------------------------------------------------------------------------
# forward / forward_timed
# ---------------------------------------------------------------------------------------------

_FORWARD_OPTIONS = {
    "cu_seqlens_q": None, "cu_seqlens_k": None, "max_seqlen_q": None, "max_seqlen_k": None,
    "dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1),
    "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "return_attn_probs": False,
    "backend": None, "q_descale": None, "k_descale": None, "v_descale": None,
}


def forward(q, k, v, config=None, **options):
    """Attention with an optional CUDA kernel config (e.g. "sm80:m128n64w4s2"; None/"auto" = tuned).

    options: any keyword of flash_attn_func / flash_attn_varlen_func (cu_seqlens_q/k and
    max_seqlen_q/k select varlen) and backend=. A config runs only on the cuda backend and raises
    ValueError when the kernels were not built with it.
    """
    unknown = sorted(set(options) - set(_FORWARD_OPTIONS))
    if unknown:
        raise TypeError(f"forward() got unexpected keyword argument(s): {', '.join(unknown)}")
    if config is not None and not isinstance(config, str):
        raise TypeError(f"config must be a str such as 'sm80:m128n64w4s2' (got {type(config).__name__})")
    o = {**_FORWARD_OPTIONS, **options}
    config = "" if config in (None, "auto") else config
    return _attention(q, k, v, o["cu_seqlens_q"], o["cu_seqlens_k"], o["max_seqlen_q"],
                      o["max_seqlen_k"], o["dropout_p"], o["softmax_scale"], o["causal"],
                      o["window_size"], o["softcap"], o["alibi_slopes"], o["deterministic"],
                      o["return_attn_probs"], o["backend"], config,
                      (o["q_descale"], o["k_descale"], o["v_descale"]))


def forward_timed(q, k, v, config=None, **options):
    """(forward(q, k, v, config, **options), milliseconds): CUDA events on a GPU, perf_counter on CPU."""
    if isinstance(q, torch.Tensor) and q.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = forward(q, k, v, config, **options)
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end)
    begin = time.perf_counter()
    result = forward(q, k, v, config, **options)
    return result, (time.perf_counter() - begin) * 1e3
