"""Quick check of the sm90 backward on a few shapes (FLASH_ATTENTION_BWD_PATH=sm90, so nothing falls back):
prints per gradient the error against the fp32 reference next to FlashAttention's bound (3x torch's own
bf16 error), exits 1 if any case misses it. Run first in a device session (a hang or a wrong result
shows in seconds), and under compute-sanitizer with --small.

  PYTHONPATH=python:tests/python FLASH_ATTENTION_LIBRARY=build/<dir>/_C.so python3 tests/cuda/sm90_bwd_smoke.py [--small]
"""
import os
import sys

import torch

os.environ["FLASH_ATTENTION_BWD_PATH"] = "sm90"
import flash_attention as fa  # noqa: E402
from flash_attention import reference  # noqa: E402

# (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, causal)
CASES = [
    (1, 64, 128, 1, 1, 128, False),
    (2, 113, 203, 3, 3, 128, False),
    (2, 1023, 1024, 4, 2, 128, True),
    (2, 333, 517, 6, 1, 64, True),
    (1, 1, 1023, 2, 2, 64, True),
]
SMALL = [(1, 100, 200, 2, 1, 64, True), (1, 130, 70, 2, 2, 128, False)]


def grads(q, k, v, dout, causal, upcast=None):
    leaves = [t.detach().clone().to(upcast or t.dtype).requires_grad_() for t in (q, k, v)]
    if upcast is None:
        out = fa.flash_attn_func(*leaves, causal=causal, backend="cuda")
    else:
        out, _ = reference.attention(*leaves, causal=causal, softmax_scale=q.shape[-1] ** -0.5,
                                     upcast=upcast == torch.float32)
    return torch.autograd.grad(out, leaves, dout.to(out.dtype))


def main():
    torch.manual_seed(0)
    ok = True
    for b, sq, sk, h, hk, d, causal in SMALL if "--small" in sys.argv else CASES:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn_like(q)
        ours = grads(q, k, v, dout, causal)
        ref32 = grads(q, k, v, dout, causal, upcast=torch.float32)
        ref16 = grads(q, k, v, dout, causal, upcast=torch.bfloat16)
        line = []
        for name, g, r32, r16 in zip(("dq", "dk", "dv"), ours, ref32, ref16):
            err = (g.float() - r32).abs().max().item()
            bound = 3 * (r16.float() - r32).abs().max().item() + 1e-5
            ok &= err <= bound
            line.append(f"{name} {err:.2e}/{bound:.2e}{'' if err <= bound else ' FAIL'}")
        print(f"b{b} sq{sq} sk{sk} h{h}/{hk} d{d} causal={causal}: " + "  ".join(line), flush=True)
    torch.cuda.synchronize()
    print("smoke-ok" if ok else "smoke-FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
