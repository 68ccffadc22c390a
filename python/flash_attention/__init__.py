"""flash_attention: exact attention (FlashAttention) for PyTorch, with FlashAttention-2's API.

    from flash_attention import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)          # q, k, v: (batch, seqlen, nheads, headdim)

Backends (auto, cuda, cpu, sdpa, math): see flash_attention.backends and `python -m flash_attention`.
"""

from . import _ops
from ._ops import build_info
from .backends import use_backend
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    forward,
    forward_timed,
)
from .kvcache import flash_attn_combine, flash_attn_varlen_paged, flash_attn_with_kvcache  # KV cache
from .padding import pad_input, unpad_input

__version__ = "0.1.0"  # keep in step with pyproject.toml and CMakeLists.txt

__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
    "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
    "forward", "forward_timed", "pad_input", "unpad_input", "use_backend", "build_info",
    "flash_attn_with_kvcache", "flash_attn_varlen_paged", "flash_attn_combine",
]
