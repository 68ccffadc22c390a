#!/usr/bin/env python3
"""Decode A/B of the K / V copy path in one process: ours with FLASH_ATTENTION_DECODE_TMA=0 (16-byte cp.async
rows) and =1 (2-D TMA tiles), and SDPA's cuDNN backend, in interleaved rounds (bench_decode.py's shapes,
inputs and CUDA-graph timing). The variable is read when a call is captured, so each graph holds one path.

  PYTHONPATH=python FLASH_ATTENTION_LIBRARY=build/<name>/_C.so python3 benchmarks/bench_decode_tma_ab.py
Rows (us per call in column ms as milliseconds, plus `variant` and `run`) go to --out; the median over the
rounds is printed last.
"""
import argparse
import csv
import os
import pathlib
import statistics

import torch

import bench_decode as bd

VARIANTS = {"cpasync": ("flash_attention", "0"), "tma": ("flash_attention", "1"), "cudnn": ("sdpa-cudnn", None)}
EXTRA = {"default": ("flash_attention", "")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extra", nargs="*", default=[], choices=sorted(EXTRA),
                        help="also time the default plan")
    parser.add_argument("--out", type=pathlib.Path, default=bd.ROOT / "benchmarks" / "results" / "h200_decode_tma_ab.csv")
    args = parser.parse_args()
    variants = dict(VARIANTS, **{name: EXTRA[name] for name in args.extra})
    gpu = bd.gpu_key()
    bandwidth = bd.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    times = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bd.COLUMNS + ["variant", "run"])
        writer.writeheader()
        for run in range(1, args.rounds + 1):
            for batch in args.batch:
                for seqlen in args.seqlen:
                    for variant, (impl, tma) in variants.items():
                        if tma:
                            os.environ["FLASH_ATTENTION_DECODE_TMA"] = tma
                        elif tma is not None:  # "": the default plan
                            os.environ.pop("FLASH_ATTENTION_DECODE_TMA", None)
                        ms = bd.time_impl(impl, batch, seqlen, None)
                        if ms is None:
                            continue
                        times.setdefault((batch, seqlen, variant), []).append(ms)
                        row = bd.row(gpu, impl, batch, seqlen, ms)
                        row.update(variant=variant, run=run)
                        writer.writerow(row)
                        f.flush()
                        print(f"run {run} B {batch:>3} Sk {seqlen:>6} {variant:>8} {ms * 1e3:9.2f} us", flush=True)
    print(f"wrote {args.out}\n")
    print(f"{'B':>3} {'Sk':>7} {'cp.async us':>11} {'TMA us':>9} {'cuDNN us':>9} {'TMA/cpa':>8} "
          f"{'cpa÷cuDNN':>9} {'TMA÷cuDNN':>9} {'TMA %copy':>9}")
    for batch in args.batch:
        for seqlen in args.seqlen:
            med = {v: statistics.median(times[(batch, seqlen, v)]) for v in variants if (batch, seqlen, v) in times}
            if len(med) < 3:
                continue
            c, t, d = med["cpasync"], med["tma"], med["cudnn"]
            share = bd.kv_bytes(batch, seqlen) / (t * 1e-3) / bandwidth * 100
            print(f"{batch:>3} {seqlen:>7} {c * 1e3:11.2f} {t * 1e3:9.2f} {d * 1e3:9.2f} {t / c:8.3f} {d / c:9.3f} "
                  f"{d / t:9.3f} {share:8.1f}%" +
                  "".join(f" {name} {med[name] * 1e3:.2f}" for name in args.extra if name in med))


if __name__ == "__main__":
    main()
