#!/usr/bin/env python3
"""Plots a benchmark CSV (benchmarks/bench_gpu.py) as TFLOP/s over sequence length.

    python3 benchmarks/plot.py benchmarks/results/h100_fwd.csv [-o out.png]

One panel per (dtype, head dim, causal) of the rows of one mode (--mode fwd | fwdbwd, default: the
CSV's first), one line per implementation; sm80 config rows (flash_attention-sm80:...) are left out.
"""
import argparse
import collections
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path, mode=None):
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if ":" not in r["impl"]]
    mode = mode or (rows[0]["mode"] if rows else "fwd")
    return [r for r in rows if r["mode"] == mode], mode


def plot(rows, out, title):
    panels = sorted({(r["dtype"], int(r["hdim"]), r["causal"]) for r in rows})
    cols = len({(h, c) for _, h, c in panels})
    dtypes = sorted({d for d, _, _ in panels})
    fig, axes = plt.subplots(len(dtypes), cols, figsize=(3.2 * cols, 3.0 * len(dtypes)), squeeze=False,
                             sharey=True)
    col_of = {hc: i for i, hc in enumerate(sorted({(h, c) for _, h, c in panels}))}
    for dtype, hdim, causal in panels:
        ax = axes[dtypes.index(dtype)][col_of[(hdim, causal)]]
        lines = collections.defaultdict(list)
        for r in rows:
            if (r["dtype"], int(r["hdim"]), r["causal"]) == (dtype, hdim, causal):
                lines[r["impl"]].append((int(r["seqlen_k"]), float(r["tflops"])))
        for impl, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=impl,
                    linewidth=2.2 if impl.startswith("flash_attention") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dtype} d={hdim} {'causal' if causal == 'True' else 'full'}", fontsize=9)
        ax.set_xlabel("seqlen", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("-o", "--out")
    ap.add_argument("--mode", choices=("fwd", "fwdbwd"), default=None)
    args = ap.parse_args()
    path = pathlib.Path(args.csv)
    rows, mode = load(path, args.mode)
    gpu = rows[0]["gpu"] if rows else "?"
    what = "forward" if mode == "fwd" else "forward + backward"
    plot(rows, args.out or path.with_suffix(".png"), f"Attention {what} on {gpu} (B*S = 16k, hidden 2048)")


if __name__ == "__main__":
    main()
