"""Forward timing of the sm90 path against PyTorch SDPA (cuDNN, flash) on the device machine.

    PYTHONPATH=python:tests/cuda FLASH_ATTENTION_LIBRARY=build/dev/_C.so python tests/cuda/sm90_bench.py OUT.csv
    (or FA_SM90_SHIM=build/.../sm90_shim.so instead of the op library: see sm90_run.py)

FLOPs = 4 * B * H * Sq * Sk * D (halved when causal); median of triton.testing.do_bench; ~16k tokens
per batch. Writes the CSV of benchmarks/results and prints a table of ours / cuDNN.
"""

import csv
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sm90_run import fwd

COLUMNS = ["gpu", "impl", "mode", "dtype", "hdim", "seqlen_q", "seqlen_k", "batch", "nheads", "nheads_kv",
           "causal", "ms", "tflops"]
SDPA = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def impls(q, k, v, causal, config):
    s, scale = q.shape[1], q.shape[-1] ** -0.5
    yield "flash_attention-sm90", lambda: fwd(q, k, v, None, None, s, s, 0.0, scale, causal, -1, -1, 0.0,
                                                 None, config)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for name, backend in SDPA.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        try:
            run()
        except RuntimeError:
            continue
        yield name, run


def main(path):
    gpu = torch.cuda.get_device_name()
    rows = []
    points = [(torch.bfloat16, d) for d in (64, 128, 256)] + [(torch.float16, 128)]
    for dtype, d in points:
        for causal in (False, True):
            for s in (1024, 2048, 4096, 8192):
                b, h = max(1, 16384 // s), 2048 // d
                q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device="cuda") for _ in range(3))
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                for name, fn in impls(q, k, v, causal, ""):
                    try:
                        ms = bench(fn)
                    except RuntimeError as error:  # an unbuilt head dim, say
                        print(f"skip {name} d={d}: {error}".splitlines()[0])
                        continue
                    rows.append(dict(gpu=gpu, impl=name, mode="fwd", dtype=str(dtype).split(".")[-1], hdim=d,
                                     seqlen_q=s, seqlen_k=s, batch=b, nheads=h, nheads_kv=h, causal=causal,
                                     ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1)))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = {}
    for r in rows:
        table.setdefault((r["dtype"], r["hdim"], r["causal"], r["seqlen_q"]), {})[r["impl"]] = r["tflops"]
    print(f"{'dtype':9}{'hdim':>5}{'causal':>7}{'S':>6}{'ours':>8}{'cudnn':>8}{'fa2':>8}{'ours/cudnn':>11}")
    for (dt, d, c, s), t in table.items():
        ours, cudnn = t.get("flash_attention-sm90", 0), t.get("sdpa-cudnn", 0)
        ratio = f"{ours / cudnn:.2f}" if cudnn else "-"
        print(f"{dt:9}{d:>5}{str(c):>7}{s:>6}{ours:>8}{cudnn:>8}{t.get('sdpa-flash', 0):>8}{ratio:>11}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sm90_fwd.csv")
