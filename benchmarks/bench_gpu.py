#!/usr/bin/env python3
"""GPU forward benchmark: flash_attention's CUDA kernels vs every torch SDPA backend, in one run.

The FlashAttention sweep: batch * seqlen = 16k tokens, hidden 2048 (nheads = 2048 / hdim),
seqlen 512..16k, hdim 64/128/256, causal and not, bf16 and fp16, forward (--modes fwd) and/or
forward + backward through autograd (--modes fwdbwd); plus a decode-like shape (seqlen_q = 1,
seqlen_k = 8k) for the record. Times are medians of triton.testing.do_bench; FLOPs = 4*B*H*Sq*Sk*D,
halved when causal, x3.5 for fwdbwd. Rows go to benchmarks/results/<gpu>_<name>.csv; fwdbwd also
writes the peak memory of each impl at seqlen 16k to <gpu>_<name>_memory.csv.

  PYTHONPATH=python FLASH_ATTENTION_LIBRARY=build/<name>/_C.so python3 benchmarks/bench_gpu.py
  ... --configs all      also every built sm80 config as its own impl (flash_attention-sm80:m128n64w4s2),
                         forward only: the input of tools/autotune.py
  ... --dtypes e4m3      FP8 forward (float8_e4m3fn in, bf16 out, descale factors of ones) on the sm90
                         kernels; --configs all times each FP8 tile; SDPA backends are tried with the
                         same fp8 tensors (rows appear only where torch accepts them). The V transpose
                         the FP8 path runs first is reported from the profiler.
"""
import argparse
import csv
import importlib.util
import math
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flash_attention  # noqa: F401  (loads the op library)

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLUMNS = ["gpu", "impl", "mode", "dtype", "hdim", "seqlen_q", "seqlen_k", "batch", "nheads",
           "nheads_kv", "causal", "ms", "tflops"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "e4m3": torch.float8_e4m3fn}
# sm90 FP8 tiles (kFwdTilesFp8 in src/cuda/sm90/tiles.h), timed one by one with --configs all.
FP8_CONFIGS = {64: ["sm90:m128n192w12s2", "sm90:m128n128w12s2"], 128: ["sm90:m128n192w12s2", "sm90:m128n128w12s2"],
               256: ["sm90:m128n128w12s2"]}
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}
TOKENS, HIDDEN = 16384, 2048


def gpu_key():
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10", "4090", "3090"):
        if key in name:
            return key
    return name.replace(" ", "_")


def _generator():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "tools" / "generate_instantiations.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def specialisation(hdim):
    """The head-dim specialisation serving hdim, assuming every head dim was built (the default)."""
    return next(d for d in sorted(_generator().CONFIGS) if d >= hdim)


def built_configs(hdim):
    """Config strings of the sm80 kernels compiled for hdim's specialisation (from the generator)."""
    gen = _generator()
    return [gen.config_name(c) for c in gen.CONFIGS[specialisation(hdim)]]


def flops(b, h, sq, sk, d, causal, mode="fwd"):
    return 4 * b * h * sq * sk * d / (2 if causal else 1) * (3.5 if mode == "fwdbwd" else 1)


def runner(impl, q, k, v, causal):
    """A zero-argument forward for `impl`; q/k/v are (B, S, H, D)."""
    if impl.startswith("flash_attention") and q.dtype == torch.float8_e4m3fn:
        config = impl.split("-", 1)[1] if "-" in impl else ""
        ones = torch.ones(q.shape[0], k.shape[2], device=q.device)
        fwd = torch.ops.flash_attention.fwd_fp8
        return lambda: fwd(q, k, v, ones, ones, ones, q.shape[-1] ** -0.5, causal, -1, -1, 0.0, config)
    if impl.startswith("flash_attention"):
        config = impl.split("-", 1)[1] if "-" in impl else ""
        scale = q.shape[-1] ** -0.5
        fwd = torch.ops.flash_attention.fwd
        return lambda: fwd(q, k, v, None, None, q.shape[1], k.shape[1], 0.0, scale, causal, -1, -1, 0.0, None,
                           config)
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    backend = SDPA[impl]

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    return run


def runner_fwdbwd(impl, q, k, v, causal):
    """A zero-argument forward + backward (torch.autograd.grad, so no .grad accumulation)."""
    if impl.startswith("flash_attention"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        forward = lambda: flash_attention.flash_attn_func(*leaves, causal=causal, backend="cuda")
    else:
        leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
        backend = SDPA[impl]

        def forward():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*leaves, is_causal=causal)
    dout = torch.randn_like(forward())
    return lambda: torch.autograd.grad(forward(), leaves, dout)


def peak_memory_gib(fn):
    """Peak memory of one call beyond what is allocated before it. flash_attention's backward takes its
    scratch (dsum + fp32 dQ accumulators) with cudaMallocAsync, outside torch's allocator: it is added."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def backward_scratch_gib(q):
    b, s, h, d = q.shape
    dpad = specialisation(d)
    return 4 * b * h * s * (1 + dpad) / 2**30


def measure(fn):
    import triton.testing
    try:
        fn()
        torch.cuda.synchronize()
    except (RuntimeError, TypeError, ValueError) as e:  # an SDPA backend that does not take this shape / dtype
        return None, f"{type(e).__name__}: " + (str(e).splitlines() or [""])[0]
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"), None


def kernel_share(fn, name_part, calls=5):
    """(microseconds per call of the kernels whose name contains name_part, of all kernels), profiled."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    part = sum(e.time_range.elapsed_us() for e in kernels if name_part in e.name)
    return part / calls, sum(e.time_range.elapsed_us() for e in kernels) / calls


def make_inputs(p):
    b, h, d, dtype = p["batch"], p["nheads"], p["hdim"], DTYPES[p["dtype"]]
    sample = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype    # randn has no fp8
    q = torch.randn(b, p["seqlen_q"], h, d, dtype=sample, device="cuda").to(dtype)
    k, v = (torch.randn(b, p["seqlen_k"], h, d, dtype=sample, device="cuda").to(dtype) for _ in range(2))
    return q, k, v


def points(args):
    for dtype in args.dtypes:
        for hdim in args.hdims:
            for causal in args.causal:
                for s in args.seqlens:
                    for mode in args.modes:
                        yield dict(mode=mode, dtype=dtype, hdim=hdim, seqlen_q=s, seqlen_k=s,
                                   batch=max(TOKENS // s, 1), nheads=HIDDEN // hdim, causal=causal)
    if args.decode:
        for dtype in args.dtypes:
            for hdim in args.hdims:
                yield dict(mode="decode", dtype=dtype, hdim=hdim, seqlen_q=1, seqlen_k=8192, batch=8,
                           nheads=HIDDEN // hdim, causal=False)


def run(args, on_row=None):
    """Times every point: (gpu, rows, memory). on_row(row) is called as each row is measured."""
    gpu = gpu_key()
    rows, memory = [], []
    for p in points(args):
        b, h, d = p["batch"], p["nheads"], p["hdim"]
        fp8 = p["dtype"] == "e4m3"
        if fp8 and p["mode"] != "fwd":
            print(f"  skip {p}: FP8 is forward only", file=sys.stderr)
            continue
        q, k, v = make_inputs(p)
        ours = ["flash_attention"]  # auto dispatch: the sm90 path on Hopper when it serves the call
        if args.configs == "all" and p["mode"] == "fwd":
            ours += [f"flash_attention-{c}" for c in (FP8_CONFIGS.get(d, []) if fp8 else built_configs(d))]
        for impl in ours + args.impls:
            fn = (runner_fwdbwd if p["mode"] == "fwdbwd" else runner)(impl, q, k, v, p["causal"])
            ms, why = measure(fn)
            if ms is None:
                print(f"  skip {impl} {p}: {why}", file=sys.stderr)
                continue
            tf = flops(b, h, p["seqlen_q"], p["seqlen_k"], d, p["causal"], p["mode"]) / ms / 1e9
            rows.append(dict(gpu=gpu, impl=impl, nheads_kv=h, ms=f"{ms:.4f}", tflops=f"{tf:.1f}", **p))
            if fp8 and impl == "flash_attention":
                part, total = kernel_share(fn, "transpose_v_fp8")
                print(f"fp8 V transpose: {part:.1f} us of {total:.1f} us of kernels per call ({100 * part / total:.1f}%) "
                      f"hdim {d} seqlen {p['seqlen_k']} causal {p['causal']}")
            if on_row is not None:
                on_row(rows[-1])
            if p["mode"] == "fwdbwd" and p["seqlen_k"] == 16384:
                gib = peak_memory_gib(fn)
                if impl.startswith("flash_attention"):
                    gib += backward_scratch_gib(q)
                memory.append(dict(gpu=gpu, impl=impl, dtype=p["dtype"], hdim=d, seqlen=16384, batch=b, nheads=h,
                                   causal=p["causal"], peak_gib=f"{gib:.3f}"))
            del fn
        del q, k, v
    return gpu, rows, memory


def summary(rows):
    """One line per point: ours (best of the flash_attention* impls), SDPA flash / cuDNN, ratios."""
    by_point = {}
    for r in rows:
        key = (r["mode"], r["dtype"], r["hdim"], r["seqlen_q"], r["seqlen_k"], r["causal"])
        by_point.setdefault(key, {})[r["impl"]] = float(r["tflops"])
    print(f"{'mode':6} {'dt':4} {'hd':>3} {'seqlen':>6} {'causal':6} {'ours':>6} {'fa2':>6} {'cudnn':>6} "
          f"{'/fa2':>5} {'/cudnn':>6}")
    for (mode, dt, hd, sq, sk, causal), t in by_point.items():
        ours = max((v for i, v in t.items() if i.startswith("flash_attention")), default=math.nan)
        fa2, cud = t.get("sdpa-flash", math.nan), t.get("sdpa-cudnn", math.nan)
        print(f"{mode:6} {dt:4} {hd:3} {sk:6} {str(causal):6} {ours:6.1f} {fa2:6.1f} {cud:6.1f} "
              f"{ours / fa2:5.2f} {ours / cud:6.2f}")


class CsvSink:
    """Writes rows as they are measured, so a run cut short keeps what it timed."""

    def __init__(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        self.writer.writeheader()

    def __call__(self, row):
        self.writer.writerow(row)
        self.file.flush()


def write_csv(path, rows, columns=COLUMNS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16", type=lambda s: s.split(","))
    ap.add_argument("--hdims", default="64,128,256", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384", type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--causal", default="false,true", type=lambda s: [x == "true" for x in s.split(",")])
    ap.add_argument("--impls", default="sdpa-flash,sdpa-cudnn,sdpa-efficient",
                    type=lambda s: [x for x in s.split(",") if x])
    ap.add_argument("--modes", default="fwd", type=lambda s: s.split(","), help="fwd and/or fwdbwd")
    ap.add_argument("--configs", default="default", choices=["default", "all"])
    ap.add_argument("--decode", action="store_true", help="also time seqlen_q = 1, seqlen_k = 8k")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="fwd", help="CSV name: <gpu>_<name>.csv")
    args = ap.parse_args()
    torch.manual_seed(0)
    sink = CsvSink(pathlib.Path(args.out) / f"{gpu_key()}_{args.name}.csv")
    gpu, rows, memory = run(args, sink)
    print(f"wrote {sink.path}")
    if memory:
        write_csv(pathlib.Path(args.out) / f"{gpu}_{args.name}_memory.csv", memory, list(memory[0]))
        for m in memory:
            print(f"peak memory fwd+bwd S=16k {m['impl']:16} {m['dtype']} hd{m['hdim']} causal={m['causal']}: "
                  f"{m['peak_gib']} GiB")
    summary(rows)


if __name__ == "__main__":
    main()
