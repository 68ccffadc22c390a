#!/usr/bin/env python3
"""Decode A/B of a plan switch in one process: ours with each value of one environment variable (read when a
call is captured, so each CUDA graph holds one plan) and SDPA's cuDNN backend, in interleaved rounds
(bench_decode.py's shapes, inputs and CUDA-graph timing).

  PYTHONPATH=python FLASH_ATTENTION_LIBRARY=build/<name>/_C.so python3 benchmarks/bench_decode_ab.py \
      --env FLASH_ATTENTION_DECODE_TAIL --values 0 1 default
Value "default" unsets the variable (the library's own rule). Rows (ms per call, plus `variant` and `run`)
go to --out; the median over the rounds is printed last, each variant against the first and against cuDNN.
"""
import argparse
import csv
import os
import pathlib
import statistics

import torch

import bench_decode as bd


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", required=True, help="the variable to switch, e.g. FLASH_ATTENTION_DECODE_TMA")
    parser.add_argument("--values", nargs="+", required=True, help='its values ("default": unset)')
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=bd.ROOT / "benchmarks" / "results" / "decode_ab.csv")
    args = parser.parse_args()
    variants = {value: ("flash_attention", value) for value in args.values}
    variants["cudnn"] = ("sdpa-cudnn", None)
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
                    for variant, (impl, value) in variants.items():
                        if value == "default":
                            os.environ.pop(args.env, None)
                        elif value is not None:
                            os.environ[args.env] = value
                        ms = bd.time_impl(impl, batch, seqlen, None)
                        if ms is None:
                            continue
                        times.setdefault((batch, seqlen, variant), []).append(ms)
                        row = bd.row(gpu, impl, batch, seqlen, ms)
                        row.update(variant=f"{args.env}={value}" if value is not None else variant, run=run)
                        writer.writerow(row)
                        f.flush()
                        print(f"run {run} B {batch:>3} Sk {seqlen:>6} {variant:>8} {ms * 1e3:9.2f} us", flush=True)
    print(f"wrote {args.out}\n")
    first = args.values[0]
    print(f"{args.env}: us per call (median of {args.rounds}); x/{first}; cuDNN÷x; % of copy bandwidth")
    for batch in args.batch:
        for seqlen in args.seqlen:
            med = {v: statistics.median(times[(batch, seqlen, v)]) for v in variants if (batch, seqlen, v) in times}
            if first not in med or "cudnn" not in med:
                continue
            cells = [f"cuDNN {med['cudnn'] * 1e3:8.2f}"]
            for value in args.values:
                if value in med:
                    x = med[value]
                    share = bd.kv_bytes(batch, seqlen) / (x * 1e-3) / bandwidth * 100
                    cells.append(f"{value}: {x * 1e3:8.2f} {x / med[first]:5.3f} {med['cudnn'] / x:5.3f} {share:5.1f}%")
            print(f"B {batch:>3} Sk {seqlen:>6} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
