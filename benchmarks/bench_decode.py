#!/usr/bin/env python3
"""Decode benchmark (seqlen_q = 1): flash_attn_with_kvcache vs torch SDPA backends and FlexAttention.

Shape: H = 32, Hk = 8, D = 128, bf16, batch 1 / 8 / 64, cache length 1k..128k (the whole cache attended).
Decode is bound by memory: the figure of merit is the KV bytes read per second (2 * B * Sk * Hk * D * 2)
as a share of the device-to-device copy bandwidth measured in the same run (bytes read + written).
Each implementation gets the layout it prefers (ours: (B, Sk, Hk, D) cache; SDPA / flex: (B, Hk, Sk, D)),
enough copies of its inputs to rotate through (so that small caches are not served from L2), and a CUDA
graph of several calls (so that launch overhead is not timed); time = median of triton.testing.do_bench
over graph replays / calls. Ours runs with check_indices=False (the per-call index check synchronises).

  PYTHONPATH=python FLASH_ATTENTION_LIBRARY=build/<name>/_C.so python3 benchmarks/bench_decode.py
Rows go to benchmarks/results/<gpu>_decode.csv (--out to change the folder); a summary per point (ours
against the fastest torch implementation) is printed last. `--splits 1 2 4 ...` also times ours with each
explicit num_splits (impl flash_attention-splits<N>), the sweep the split rule in src/cuda/kvcache.cu is
fitted to.
"""
import argparse
import csv
import math
import pathlib
import time

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from flash_attention import flash_attn_with_kvcache

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLUMNS = ["gpu", "impl", "mode", "dtype", "hdim", "seqlen_q", "seqlen_k", "batch", "nheads",
           "nheads_kv", "causal", "ms", "tflops"]
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}
H, HK, D, DTYPE = 32, 8, 128, torch.bfloat16
ROTATE_BYTES = 512 << 20   # inputs rotated per timing: several times the L2
CALLS_PER_GRAPH = 8


def gpu_key():
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100", "l40s", "l4"):
        if key in name:
            return key
    return name.replace(" ", "_")


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def kv_bytes(batch, seqlen):
    return 2 * batch * seqlen * HK * D * torch.finfo(DTYPE).bits // 8


def make_sets(impl, batch, seqlen):
    """Enough input sets in the implementation's layout to rotate through."""
    copies = max(1, min(16, math.ceil(ROTATE_BYTES / kv_bytes(batch, seqlen))))
    sets = []
    for _ in range(copies):
        q = torch.randn(batch, 1, H, D, dtype=DTYPE, device="cuda")
        if impl.startswith("flash_attention"):
            k = torch.randn(batch, seqlen, HK, D, dtype=DTYPE, device="cuda")
            v = torch.randn_like(k)
            seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
            sets.append((q, k, v, seqlens))
        else:
            k = torch.randn(batch, HK, seqlen, D, dtype=DTYPE, device="cuda")
            sets.append((q.transpose(1, 2).contiguous(), k, torch.randn_like(k), None))
    return sets


def call(impl, inputs, flex):
    q, k, v, seqlens = inputs
    if impl.startswith("flash_attention"):
        splits = int(impl.partition("-splits")[2] or 0)
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, num_splits=splits, check_indices=False)
    if impl == "flex":
        return flex(q, k, v, enable_gqa=True)
    with sdpa_kernel(SDPA[impl]):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def time_graph(fn, sets, warmup=25, rep=100):
    """Median ms per call of fn(inputs), rotating through sets inside one CUDA graph."""
    for inputs in sets:
        fn(inputs)
    torch.cuda.synchronize()
    calls = max(CALLS_PER_GRAPH, len(sets))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(sets[0])  # warm the stream's allocator pool
        with torch.cuda.graph(graph, stream=stream):
            for n in range(calls):
                fn(sets[n % len(sets)])
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") / calls


def time_impl(impl, batch, seqlen, flex):
    """Median ms per call, or None when the implementation refuses the shape or runs out of memory."""
    sets = None
    try:
        sets = make_sets(impl, batch, seqlen)
        return time_graph(lambda inputs: call(impl, inputs, flex), sets)
    except Exception as error:  # a backend that refuses the shape, runs out of memory, or fails to compile
        print(f"  {impl}: skipped ({str(error).splitlines()[0][:100]})")
        return None
    finally:
        sets = None
        torch.cuda.empty_cache()


def row(gpu, impl, batch, seqlen, ms):
    tflops = 4 * batch * H * 1 * seqlen * D / (ms * 1e-3) / 1e12
    return dict(gpu=gpu, impl=impl, mode="decode", dtype="bf16", hdim=D, seqlen_q=1, seqlen_k=seqlen, batch=batch,
                nheads=H, nheads_kv=HK, causal=False, ms=f"{ms:.5f}", tflops=f"{tflops:.3f}")


def summary(results, bandwidth):
    """Ours against the fastest torch implementation, per point."""
    print(f"\n{'batch':>5} {'seqlen':>7} {'ours GB/s':>9} {'% copy':>7} {'best torch':>15} {'GB/s':>6} {'speedup':>7}")
    for (batch, seqlen), times in results.items():
        ours = times.get("flash_attention")
        others = {impl: ms for impl, ms in times.items() if not impl.startswith("flash_attention")}
        if ours is None or not others:
            continue
        best = min(others, key=others.get)
        nbytes = kv_bytes(batch, seqlen)
        print(f"{batch:>5} {seqlen:>7} {nbytes / ours / 1e6:9.0f} {100 * nbytes / (ours * 1e-3) / bandwidth:6.1f}% "
              f"{best:>15} {nbytes / others[best] / 1e6:6.0f} {others[best] / ours:6.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--impls", nargs="+", default=["flash_attention", *SDPA, "flex"])
    parser.add_argument("--flex-budget", type=float, default=90.0, help="seconds of flex compilation allowed")
    parser.add_argument("--math-max-gb", type=float, default=2.0, help="largest KV (GB) given to sdpa-math")
    parser.add_argument("--splits", type=int, nargs="*", default=[], help="also time ours with these num_splits")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.impls += [f"flash_attention-splits{n}" for n in args.splits]

    flex = None
    if "flex" in args.impls:
        import torch._dynamo as dynamo
        from torch.nn.attention.flex_attention import flex_attention
        dynamo.config.cache_size_limit = 64  # one compilation per shape
        flex = torch.compile(flex_attention, dynamic=False)
    bandwidth = copy_bandwidth()
    gpu = gpu_key()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{gpu}_decode_copy_bandwidth.txt", "w") as f:
        f.write(f"{bandwidth / 1e9:.1f} GB/s device-to-device copy (read + write), {torch.cuda.get_device_name()}\n")
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    path = args.out / f"{gpu}_decode.csv"
    results = {}
    with open(path, "w", newline="") as f:  # rows are written as they come (a run cut short keeps them)
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        flex_spent = 0.0
        print(f"{'batch':>5} {'seqlen':>7} {'impl':>24} {'ms':>9} {'GB/s':>7} {'% copy':>7}")
        for batch in args.batch:
            for seqlen in args.seqlen:
                nbytes = kv_bytes(batch, seqlen)
                for impl in args.impls:
                    if impl == "sdpa-math" and nbytes * H / HK > args.math_max_gb * 1e9:
                        continue
                    if impl == "flex" and flex_spent > args.flex_budget:
                        continue
                    start = time.time()
                    ms = time_impl(impl, batch, seqlen, flex)
                    if impl == "flex":
                        flex_spent += time.time() - start
                    if ms is None:
                        continue
                    results.setdefault((batch, seqlen), {})[impl] = ms
                    rate = nbytes / (ms * 1e-3)
                    print(f"{batch:>5} {seqlen:>7} {impl:>24} {ms:9.4f} {rate / 1e9:7.0f} {100 * rate / bandwidth:6.1f}%",
                          flush=True)
                    writer.writerow(row(gpu, impl, batch, seqlen, ms))
                    f.flush()
    print(f"wrote {path}")
    summary(results, bandwidth)


if __name__ == "__main__":
    main()
