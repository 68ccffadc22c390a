#!/usr/bin/env python3
"""Sweeps the built sm80 forward configs on this GPU and rewrites the default table.

    PYTHONPATH=python FLASH_ATTENTION_LIBRARY=build/<name>/_C.so python3 tools/autotune.py \
        [--hdims 64,128,256] [--seqlens 1024,4096,16384] [--from-csv sweep.csv] [--table PATH] [--results PATH]

For every (head-dim specialisation, dtype, masked) it times each built config on the FlashAttention
sweep shapes (benchmarks/bench_gpu.py: batch * seqlen = 16k tokens, hidden 2048) and keeps the one with
the best geometric-mean TFLOP/s. The measured rows of this GPU's arch in src/cuda/sm80/tile_table.h are replaced
(rows of other archs stay). With --results, the sweep is also written as a benchmark CSV in which the
"flash_attention" rows are the chosen configs' measurements (what the rebuilt default runs).
--from-csv re-analyses an earlier `bench_gpu.py --configs all` CSV instead of timing.
"""
import argparse
import csv
import math
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE = ROOT / "src" / "cuda" / "sm80" / "tile_table.h"
BEGIN, END = "// BEGIN DEFAULT TILES (tools/autotune.py)", "// END DEFAULT TILES"
ROW = re.compile(r'\{(\d+), (\d+), DType::(\w+), (true|false), "([^"]+)"\}')
DTYPE_ENUM = {"fp16": "kFloat16", "bf16": "kBFloat16"}


def sweep(args):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu
    ns = argparse.Namespace(dtypes=args.dtypes, hdims=args.hdims, seqlens=args.seqlens, causal=[False, True], modes=["fwd"],
                            impls=args.impls, configs="all", decode=False)
    return bench_gpu.run(ns)[1]


def choose(rows):
    """{(hdim, dtype, masked): (config, geomean tflops)} from flash_attention-<config> rows."""
    scores = {}
    for r in rows:
        if not r["impl"].startswith("flash_attention-") or r["mode"] != "fwd":
            continue
        key = (int(r["hdim"]), r["dtype"], str(r["causal"]).lower() == "true")
        scores.setdefault(key, {}).setdefault(r["impl"].split("-", 1)[1], []).append(float(r["tflops"]))
    best = {}
    for key, by_cfg in scores.items():
        n = max(len(v) for v in by_cfg.values())
        geo = {c: math.exp(sum(map(math.log, v)) / len(v)) for c, v in by_cfg.items() if len(v) == n}
        cfg = max(geo, key=geo.get)
        best[key] = (cfg, geo[cfg])
    return best


def specialisation(hdim):
    return next(d for d in (32, 64, 96, 128, 192, 256) if d >= hdim)


def rewrite_table(path, arch, best, gpu):
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    body, tail = rest.split(END, 1)
    rows = {(int(a), int(h), d, m == "true"): c for a, h, d, m, c in ROW.findall(body)}
    # Measured keys replace their rows; rows of this arch that were not measured (another dtype or head
    # dim in an earlier sweep) stay.
    for (hdim, dtype, masked), (cfg, _) in best.items():
        rows[(arch, specialisation(hdim), DTYPE_ENUM[dtype], masked)] = cfg
    lines = [BEGIN, f"// sm{arch} rows measured on {gpu} by tools/autotune.py; other rows are unmeasured guesses.",
             "inline constexpr DefaultTile kDefaultTiles[] = {"]
    for (a, h, d, m), c in sorted(rows.items()):
        lines.append(f'    {{{a}, {h}, DType::{d}, {"true" if m else "false"}, "{c}"}},')
    lines += ["};", ""]
    path.write_text(head + "\n".join(lines) + END + tail)
    print(f"wrote {path}")


def results_rows(rows, best):
    """SDPA rows as measured, plus one 'flash_attention' row per point: the chosen config's."""
    out = []
    for r in rows:
        if not r["impl"].startswith("flash_attention-"):
            out.append(r)
            continue
        key = (int(r["hdim"]), r["dtype"], str(r["causal"]).lower() == "true")
        if key in best and r["impl"] == f"flash_attention-{best[key][0]}":
            out.append(dict(r, impl="flash_attention"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16", type=lambda s: s.split(","))
    ap.add_argument("--hdims", default="64,128,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seqlens", default="1024,4096,16384", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--impls", default="", type=lambda s: [x for x in s.split(",") if x],
                    help="SDPA impls to time alongside (for --results)")
    ap.add_argument("--from-csv", help="analyse this bench_gpu.py --configs all CSV instead of timing")
    ap.add_argument("--arch", type=int, help="arch of the rows to write (default: this GPU's)")
    ap.add_argument("--table", default=str(TABLE))
    ap.add_argument("--results", help="write the benchmark CSV (flash_attention = chosen configs) here")
    args = ap.parse_args()

    if args.from_csv:
        with open(args.from_csv) as f:
            rows = list(csv.DictReader(f))
    else:
        rows = sweep(args)
    if args.arch is None:
        import torch
        major, minor = torch.cuda.get_device_capability()
        args.arch = major * 10 + minor
    gpu = rows[0]["gpu"] if rows else "?"
    best = choose(rows)
    for (hdim, dtype, masked), (cfg, tf) in sorted(best.items()):
        print(f"sm{args.arch} hdim {hdim:3} {dtype} {'masked' if masked else 'full  '}: {cfg:22} {tf:6.1f} TFLOP/s")
    rewrite_table(pathlib.Path(args.table), args.arch, best, gpu)
    if args.results:
        out = results_rows(rows, best)
        with open(args.results, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out[0].keys()))
            w.writeheader()
            w.writerows(out)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
