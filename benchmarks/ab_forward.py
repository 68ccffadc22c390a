"""Forward (or forward + backward, --mode fwdbwd) A/B probe for tools/ab_builds.sh: times this process's op
library (FLASH_ATTENTION_LIBRARY) on the FA sweep shapes (bf16, B * S = 16k, hidden 2048; bench_gpu.py's
runners and FLOP count) and prints one line per shape; --cudnn adds SDPA-cuDNN.

    python benchmarks/ab_forward.py TAG [--cudnn] [--mode fwdbwd] [--hdims 64,128,256] [--seqlens 1024,4096] [--config C]
"""
import argparse
import os

import torch
import triton.testing

from bench_gpu import flops, runner, runner_fwdbwd

ints = lambda s: [int(x) for x in s.split(",")]
ap = argparse.ArgumentParser()
ap.add_argument("tag")
ap.add_argument("--cudnn", action="store_true")
ap.add_argument("--hdims", type=ints, default=[64, 128, 256])
ap.add_argument("--seqlens", type=ints, default=[1024, 2048, 4096, 16384])
ap.add_argument("--mode", default="fwd", choices=["fwd", "fwdbwd"])
ap.add_argument("--config", default="", help="explicit kernel config, e.g. sm90:m128n128w12s2")
args = ap.parse_args()
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
ours = "flash_attention" + (f"-{args.config}" if args.config else "")


def tflops(fn, work):
    fn()
    torch.cuda.synchronize()
    return work / triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e9


for d in args.hdims:
    h = 2048 // d
    for s in args.seqlens:
        b = 16384 // s
        for causal in (False, True):
            q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
            work = flops(b, h, s, s, d, causal, args.mode)
            make = runner_fwdbwd if args.mode == "fwdbwd" else runner
            line = f"{args.tag} d={d} s={s} causal={int(causal)} tflops={tflops(make(ours, q, k, v, causal), work):.0f}"
            if args.cudnn:
                line += f" cudnn_tflops={tflops(make('sdpa-cudnn', q, k, v, causal), work):.0f}"
            print(line, flush=True)
