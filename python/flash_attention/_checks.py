"""Argument checks shared by every public function. They run before any backend, so a malformed call
raises the same TypeError / ValueError (naming the argument) whichever backend would have run it."""

from __future__ import annotations

import math
import numbers
import operator

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (got {type(x).__name__})")
    return x


def packed(x, name: str, dims: int, count: int, layout: str) -> torch.Tensor:
    """A packed qkv / kv tensor: `dims`-D with `count` at dim -3."""
    tensor(x, name)
    if x.dim() != dims or x.shape[-3] != count:
        raise ValueError(f"{name} must have shape {layout} (got {tuple(x.shape)})")
    return x


def same_device(t: torch.Tensor, name: str, q: torch.Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device} (all tensors must be on one device)")


def qkv(q, k, v, varlen: bool, dtypes=DTYPES, dtype_names="float16, bfloat16 or float32") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(t, name)
    if q.dtype not in dtypes:
        raise TypeError(f"q must be {dtype_names} (got {q.dtype})")
    dims, layout = (3, "(total, nheads, headdim)") if varlen else (4, "(batch, seqlen, nheads, headdim)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        same_device(t, name, q)
        if t.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {layout} (got shape {tuple(t.shape)})")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} (got {tuple(v.shape)})")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have the batch size of q ({q.shape[0]}), got {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the head dim of q ({q.shape[-1]}), got {k.shape[-1]}")
    if q.shape[-1] < 1:
        raise ValueError("q must have a head dim >= 1 (got 0)")
    heads, heads_k = q.shape[-2], k.shape[-2]
    if heads_k < 1 or heads % heads_k != 0:
        raise ValueError(f"the number of heads of q ({heads}) must be a multiple of the number of "
                         f"heads of k and v ({heads_k})")


def number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number (got {type(x).__name__})")
    return float(x)


def integer(x, name: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int (got bool)")
    if isinstance(x, torch.SymInt):
        return x
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int (got {type(x).__name__})") from None


def dropout_p(p) -> float:
    p = number(p, "dropout_p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1) (got {p})")
    return p


def softmax_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    scale = number(scale, "softmax_scale")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0 (got {scale})")
    return scale


def window_size(window) -> tuple:
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window_size must be a pair (left, right) (got {window!r})")
    left, right = (integer(w, "window_size") for w in window)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {tuple(window)}")
    return left, right


def softcap(cap) -> float:
    cap = number(cap, "softcap")
    if not (math.isfinite(cap) and cap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0 = off), got {cap}")
    return cap


def alibi_slopes(slopes, q: torch.Tensor, batch: int) -> None:
    if slopes is None:
        return
    tensor(slopes, "alibi_slopes")
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (got {slopes.dtype})")
    same_device(slopes, "alibi_slopes", q)
    heads = q.shape[-2]
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({heads},) or (batch, nheads) = "
                         f"({batch}, {heads}), got {tuple(slopes.shape)}")


def cu_seqlens(cu, name: str, q: torch.Tensor) -> None:
    tensor(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (got {cu.dtype})")
    same_device(cu, name, q)
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries (got shape {tuple(cu.shape)})")


def cu_seqlens_values(values: list, name: str, total: int, max_seqlen: int, max_name: str) -> None:
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0 (got {values[0]})")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if min(lengths) < 0:
        raise ValueError(f"{name} must be non-decreasing (got {values})")
    if values[-1] != total:
        raise ValueError(f"{name}[-1] ({values[-1]}) must equal the number of rows ({total})")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} "
                         f"({max(lengths)})")


def varlen(q, k, cu_q, cu_k, max_q, max_k) -> tuple:
    cu_seqlens(cu_q, "cu_seqlens_q", q)
    cu_seqlens(cu_k, "cu_seqlens_k", q)
    if cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(f"cu_seqlens_k must have the length of cu_seqlens_q ({cu_q.shape[0]}), "
                         f"got {cu_k.shape[0]}")
    max_q, max_k = integer(max_q, "max_seqlen_q"), integer(max_k, "max_seqlen_k")
    for name, value in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (got {value})")
    if not torch.compiler.is_compiling():   # values: one host read (a device sync on CUDA)
        values = torch.cat([cu_q, cu_k]).tolist()
        n = cu_q.shape[0]
        cu_seqlens_values(values[:n], "cu_seqlens_q", q.shape[0], max_q, "max_seqlen_q")
        cu_seqlens_values(values[n:], "cu_seqlens_k", k.shape[0], max_k, "max_seqlen_k")
    return max_q, max_k
