"""Loads the op library (_C.so) and registers its fake kernels and autograd formula.

The ops themselves (``torch.ops.flash_attention.fwd / fwd_fp8 / bwd / dropout_mask / build_info /
cuda_unsupported_reason``) are defined once, in C++ (src/torch/ops.cpp). The library is looked up at
``$FLASH_ATTENTION_LIBRARY`` (developer builds) or next to this file (pip installs). When it cannot
be loaded the package still imports: ``LOAD_ERROR`` says why and the backends that need it step aside.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

LIBRARY_ENV = "FLASH_ATTENTION_LIBRARY"


def _library_path() -> Path:
    env = os.environ.get(LIBRARY_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    candidates = sorted(here.glob("_C*.so"))
    return candidates[0] if candidates else here / "_C.so"


def _load() -> str | None:
    path = _library_path()
    if not path.exists():
        return f"op library not found at {path} (build it, or set ${LIBRARY_ENV})"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as error:
        return f"cannot load op library {path}: {error}"
    return None


LOAD_ERROR: str | None = _load()
LOADED: bool = LOAD_ERROR is None


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the op library was built with: version, cuda_built, archs, head_dims, dtypes."""
    if not LOADED:
        return {"version": None, "cuda_built": False, "archs": [], "head_dims": [], "dtypes": [],
                "error": LOAD_ERROR}
    return json.loads(torch.ops.flash_attention.build_info())


@torch.compiler.assume_constant_result
def _cuda_reason_cached(key: tuple) -> str:
    return _cuda_reason_query(key)


@functools.lru_cache(maxsize=4096)
def _cuda_reason_query(key: tuple) -> str:
    return torch.ops.flash_attention.cuda_unsupported_reason(*key)


def cuda_unsupported_reason(key: tuple) -> str:
    """Why the CUDA kernels cannot serve a call described by `key` ("" = they can); cached.

    key = (device_index, dtype, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, varlen,
           dropout_p, causal, window_left, window_right, softcap, alibi_dims, config)
    """
    if not LOADED:
        return LOAD_ERROR
    return _cuda_reason_cached(key)


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes only) and autograd
# ---------------------------------------------------------------------------------------------


def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
              softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, config="",
              deterministic=False):
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)
    rng_state = torch.empty(2, dtype=torch.int64, device="cpu")
    return out, lse, rng_state


def _fwd_fp8_fake(q, k, v, q_descale, k_descale, v_descale, softmax_scale, causal, window_left,
                  window_right, softcap, config=""):
    out = q.new_empty(q.shape, dtype=torch.bfloat16)
    lse = q.new_empty(_lse_shape(q, None), dtype=torch.float32)
    return out, lse


def _bwd_fake(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
              max_seqlen_k, dropout_p, softmax_scale, causal, window_left, window_right, softcap,
              alibi_slopes, deterministic, rng_state):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _dropout_mask_fake(rng_state, p, batch, heads, seqlen_q, seqlen_k, device):
    return torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)


_OPTION_NAMES = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                 "softmax_scale", "causal", "window_left", "window_right", "softcap", "alibi_slopes",
                 "config", "deterministic")


def _fwd_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    options = dict(zip(_OPTION_NAMES, inputs[3:]))
    out, lse, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, rng_state, options.pop("cu_seqlens_q"),
                          options.pop("cu_seqlens_k"), options.pop("alibi_slopes"))
    options.pop("config")
    ctx.options = options


def _fwd_backward(ctx, dout, dlse, drng_state):
    q, k, v, out, lse, rng_state, cu_q, cu_k, alibi = ctx.saved_tensors
    o = ctx.options
    dq, dk, dv = torch.ops.flash_attention.bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, o["max_seqlen_q"], o["max_seqlen_k"], o["dropout_p"],
        o["softmax_scale"], o["causal"], o["window_left"], o["window_right"], o["softcap"], alibi,
        o["deterministic"], rng_state)
    return (dq, dk, dv) + (None,) * len(_OPTION_NAMES)


def _fwd_fp8_setup_context(ctx, inputs, output):
    pass


def _fwd_fp8_backward(ctx, dout, dlse):
    raise NotImplementedError(
        "flash_attention: FP8 (float8_e4m3fn) attention is forward only: there is no backward through "
        "fwd_fp8 (its q, k, v or descale tensors require grad)")


def _register() -> None:
    torch.library.register_fake("flash_attention::fwd", _fwd_fake)
    torch.library.register_fake("flash_attention::fwd_fp8", _fwd_fp8_fake)
    torch.library.register_autograd("flash_attention::fwd_fp8", _fwd_fp8_backward,
                                    setup_context=_fwd_fp8_setup_context)
    torch.library.register_fake("flash_attention::bwd", _bwd_fake)
    torch.library.register_fake("flash_attention::dropout_mask", _dropout_mask_fake)
    torch.library.register_autograd("flash_attention::fwd", _fwd_backward,
                                    setup_context=_fwd_setup_context)


if LOADED:
    _register()
