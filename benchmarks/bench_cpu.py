#!/usr/bin/env python3
"""CPU benchmark: flash_attention's CPU backend vs torch SDPA on CPU tensors, in one run.

Forward and forward+backward, bf16 and fp32, head dims 64/128, S = 512..4096 (B=1, H=8 by default),
both on the same number of threads. The two implementations are timed alternately, repetition by
repetition, so that load from other processes affects both alike; the median (or, with --stat min, the
fastest repetition) is reported.
FLOPs = 4*B*H*Sq*Sk*D (halved when causal); fwd+bwd counts 3.5x the forward.

  PYTHONPATH=python FLASH_ATTENTION_LIBRARY=build/<name>/_C.so python3 benchmarks/bench_cpu.py
"""
import argparse
import csv
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import flash_attention

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
COLUMNS = ["gpu", "impl", "mode", "dtype", "hdim", "seqlen_q", "seqlen_k", "batch", "nheads",
           "nheads_kv", "causal", "ms", "tflops"]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def make_runners(mode, dtype, batch, heads, seqlen, hdim, causal):
    """Returns {impl: zero-argument callable} doing one forward (or forward+backward)."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, seqlen, heads, hdim)
    q, k, v, dout = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    grad = mode == "fwdbwd"
    ours = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    # SDPA in its native (B, H, S, D) layout, contiguous.
    ref = [t.transpose(1, 2).contiguous().requires_grad_(grad) for t in (q, k, v)]
    dout_ref = dout.transpose(1, 2).contiguous()

    def run_ours():
        out = flash_attention.flash_attn_func(*ours, causal=causal, backend="cpu")
        if grad:
            out.backward(dout)

    def run_sdpa():
        out = F.scaled_dot_product_attention(*ref, is_causal=causal)
        if grad:
            out.backward(dout_ref)

    with torch.no_grad():
        a = flash_attention.flash_attn_func(*(t.detach() for t in ours), causal=causal, backend="cpu")
        b = F.scaled_dot_product_attention(*(t.detach() for t in ref), is_causal=causal).transpose(1, 2)
        err = (a.float() - b.float()).abs().max().item()
    return {"flash_attention-cpu": run_ours, "sdpa-cpu": run_sdpa}, err


def time_alternating(runners, min_reps, max_reps, budget_s, stat):
    """ms per runner (median or min of its repetitions), repetitions interleaved; one untimed warm-up each."""
    for fn in runners.values():
        fn()
    times = {name: [] for name in runners}
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or (time.perf_counter() - start < budget_s and reps < max_reps):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        reps += 1
    reduce = min if stat == "min" else statistics.median
    return {name: reduce(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--hdims", default="64,128")
    ap.add_argument("--seqlens", default="512,1024,2048,4096")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--causal", default="0", help="comma list of 0/1")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of repetitions per config")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="min: the fastest repetition, for machines with other load")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu.csv"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    gpu = cpu_name()
    rows = []
    print(f"{gpu}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'mode':7} {'dtype':5} {'D':>4} {'S':>5} {'c':>1} {'ours ms':>9} {'sdpa ms':>9} {'speedup':>7} {'max|diff|':>9}")
    for mode in args.modes.split(","):
        for dname in args.dtypes.split(","):
            for hdim in map(int, args.hdims.split(",")):
                for causal in (c == "1" for c in args.causal.split(",")):
                    for seqlen in map(int, args.seqlens.split(",")):
                        runners, err = make_runners(mode, DTYPES[dname], args.batch, args.heads, seqlen,
                                                    hdim, causal)
                        ms = time_alternating(runners, args.min_reps, args.max_reps, args.budget, args.stat)
                        flops = 4 * args.batch * args.heads * seqlen * seqlen * hdim / (2 if causal else 1)
                        flops *= 3.5 if mode == "fwdbwd" else 1.0
                        for impl, t in ms.items():
                            rows.append(dict(gpu=gpu, impl=impl, mode=mode, dtype=dname, hdim=hdim,
                                             seqlen_q=seqlen, seqlen_k=seqlen, batch=args.batch,
                                             nheads=args.heads, nheads_kv=args.heads, causal=int(causal),
                                             ms=f"{t:.3f}", tflops=f"{flops / t / 1e9:.4f}"))
                        ours, ref = ms["flash_attention-cpu"], ms["sdpa-cpu"]
                        print(f"{mode:7} {dname:5} {hdim:4} {seqlen:5} {int(causal)} {ours:9.2f} {ref:9.2f} "
                              f"{ref / ours:7.2f} {err:9.2e}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
