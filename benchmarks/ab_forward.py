"""Forward A/B probe for tools/ab_builds.sh: times this process's op library (FLASH_ATTENTION_LIBRARY) on the
FA sweep shapes (bf16, B * S = 16k, hidden 2048) and prints one line per shape; --cudnn adds SDPA-cuDNN.

    python benchmarks/ab_forward.py TAG [--cudnn] [--hdims 64,128,256] [--seqlens 1024,4096,16384] [--config C]
"""
import argparse
import os

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attention  # noqa: F401  (registers torch.ops.flash_attention)

ints = lambda s: [int(x) for x in s.split(",")]
ap = argparse.ArgumentParser()
ap.add_argument("tag")
ap.add_argument("--cudnn", action="store_true")
ap.add_argument("--hdims", type=ints, default=[64, 128, 256])
ap.add_argument("--seqlens", type=ints, default=[1024, 2048, 4096, 16384])
ap.add_argument("--config", default="", help="explicit kernel config, e.g. sm90:m128n128w12s2")
args = ap.parse_args()
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
fwd = torch.ops.flash_attention.fwd
for d in args.hdims:
    h = 2048 // d
    for s in args.seqlens:
        b = 16384 // s
        for causal in (False, True):
            q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            f = lambda: fwd(q, k, v, None, None, s, s, 0.0, d ** -0.5, causal, -1, -1, 0.0, None, args.config)
            f()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(f, warmup=10, rep=50, return_mode="median")
            line = f"{args.tag} d={d} s={s} causal={int(causal)} ms={ms:.4f} tflops={flops / ms / 1e9:.0f}"
            if args.cudnn:
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))

                def g():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                g()
                torch.cuda.synchronize()
                msc = triton.testing.do_bench(g, warmup=10, rep=50, return_mode="median")
                line += f" cudnn_tflops={flops / msc / 1e9:.0f}"
            print(line, flush=True)
