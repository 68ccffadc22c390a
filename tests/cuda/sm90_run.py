"""fwd(...) for the sm90 device scripts: the op library's torch.ops.flash_attention.fwd, or, with
FA_SM90_SHIM=path/to/sm90_shim.so, the sm90 kernels called directly through ctypes (no op library)."""

import ctypes
import os

import torch

_SHIM = os.environ.get("FA_SM90_SHIM")
_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _strides(t, varlen):
    if varlen:  # (total, H, D)
        return [0, t.stride(0), t.stride(1)]
    return [t.stride(0), t.stride(1), t.stride(2)]


if _SHIM:
    _lib = ctypes.CDLL(_SHIM)
    _lib.fa_sm90_fwd.restype = ctypes.c_int
    _P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    _lib.fa_sm90_fwd.argtypes = [_I, _I, _I, _I, _I, _I, _I, _L, _L, _P, _P, _P, _P, _P, _P, _P, _P, _F, _I,
                                 _I, _I, _F, ctypes.c_char_p, _P, ctypes.c_char_p, _I]

    def fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, wl, wr, softcap, alibi, config=""):
        assert dropout_p == 0.0 and alibi is None, "the shim serves what the sm90 path serves"
        varlen = cu_q is not None
        out = torch.empty_like(q)
        heads, d = q.shape[-2], q.shape[-1]
        batch = cu_q.numel() - 1 if varlen else q.shape[0]
        lse = torch.empty((heads, q.shape[0]) if varlen else (batch, heads, q.shape[1]), dtype=torch.float32,
                          device=q.device)
        strides = (ctypes.c_int64 * 12)(*(_strides(q, varlen) + _strides(k, varlen) + _strides(v, varlen) +
                                          _strides(out, varlen)))
        msg = ctypes.create_string_buffer(512)
        code = _lib.fa_sm90_fwd(
            _DTYPES[q.dtype], batch, max_q, max_k, heads, k.shape[-2], d, q.shape[0] if varlen else 0,
            k.shape[0] if varlen else 0, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            strides, cu_q.data_ptr() if varlen else None, cu_k.data_ptr() if varlen else None, scale, int(causal),
            wl, wr, softcap, config.encode(), torch.cuda.current_stream().cuda_stream, msg, 512)
        if code != 0:
            raise (ValueError if code == 1 else RuntimeError)(f"sm90 shim: {msg.value.decode()}")
        return out, lse, None
else:
    import flash_attention  # noqa: F401  (loads the op library)

    def fwd(*args):
        return torch.ops.flash_attention.fwd(*args)
