"""python -m flash_attention bench: compare attention implementations over chosen shapes.

Implementations: flash_attention (ours: the cuda backend on a GPU, the cpu backend on the CPU),
sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math (torch SDPA pinned to one backend) and flex
(torch.compile'd FlexAttention; on CUDA by default). Modes: fwd, fwdbwd (forward + backward) and
decode (one query row per sequence over a KV cache of seqlen keys).

Prints a table (TFLOP/s; GB/s of KV cache read for decode) with the ratio of ours to the best other
implementation, writes a CSV (benchmarks/results columns) and, with --plot, a PNG.
FLOPs = 4 * batch * nheads * seqlen_q * seqlen_k * hdim (halved when causal); fwdbwd = 3.5 x fwd.
Times are medians: triton.testing.do_bench on CUDA, torch.utils.benchmark on the CPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

CSV_COLUMNS = ["gpu", "impl", "mode", "dtype", "hdim", "seqlen_q", "seqlen_k", "batch", "nheads",
               "nheads_kv", "causal", "ms", "tflops"]
IMPLS = ("flash_attention", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex")
MODES = ("fwd", "fwdbwd", "decode")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
OURS = "flash_attention"


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str
    dtype: str
    hdim: int
    seqlen_q: int
    seqlen_k: int
    batch: int
    nheads: int
    nheads_kv: int
    causal: bool

    @property
    def flops(self) -> float:
        f = 4.0 * self.batch * self.nheads * self.seqlen_q * self.seqlen_k * self.hdim
        if self.causal and self.mode != "decode":
            f /= 2
        return f * (3.5 if self.mode == "fwdbwd" else 1.0)

    @property
    def kv_bytes(self) -> float:
        return 2.0 * self.batch * self.seqlen_k * self.nheads_kv * self.hdim * DTYPES[self.dtype].itemsize


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(x <= 0 for x in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(allowed):
    def parse(text: str) -> list[str]:
        values = [x for x in text.split(",") if x]
        bad = [x for x in values if x not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r} not in {', '.join(allowed)}")
        return values
    return parse


def _causal(text: str) -> list[bool]:
    table = {"true": [True], "false": [False], "both": [False, True]}
    if text.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true, false or both, got {text!r}")
    return table[text.lower()]


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flash_attention bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--mode", type=_choices(MODES), default=["fwd", "fwdbwd"], help="fwd,fwdbwd,decode")
    p.add_argument("--dtype", type=_choices(tuple(DTYPES)), default=None,
                   help="fp16,bf16,fp32 (default: fp16,bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--hdim", type=_int_list, default=[64, 128])
    p.add_argument("--seqlen", type=_int_list, default=None,
                   help="seqlen_q = seqlen_k (decode: seqlen_k); default 512..16384 (CUDA), 128,512 (CPU)")
    p.add_argument("--seqlen-k", type=_int_list, default=None, help="seqlen_k when it differs from --seqlen")
    p.add_argument("--causal", type=_causal, default=[False, True], help="true, false or both")
    p.add_argument("--batch", type=int, default=None, help="default: --tokens / seqlen (decode: 16)")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen when --batch is not given")
    p.add_argument("--nheads", type=int, default=None, help="default: 2048 / hdim")
    p.add_argument("--nheads-kv", type=int, default=None, help="default: nheads (GQA when fewer)")
    p.add_argument("--impl", type=_choices(IMPLS), default=None, help="default: every available one")
    p.add_argument("--csv", type=Path, default=Path("flash_attention_bench.csv"))
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("batch", "tokens", "nheads", "nheads_kv"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.seqlen_k and args.seqlen and len(args.seqlen_k) != len(args.seqlen):
        p.error("--seqlen-k needs as many values as --seqlen")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (pip install matplotlib)")
    cuda_ok = torch.cuda.is_available()
    if args.device == "cuda" and not cuda_ok:
        p.error("--device cuda: no CUDA device is available")
    args.device = "cuda" if args.device == "auto" and cuda_ok else ("cpu" if args.device == "auto" else args.device)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or (["fp16", "bf16"] if cuda else ["fp32"])
    args.seqlen = args.seqlen or ([512, 1024, 2048, 4096, 8192, 16384] if cuda else [128, 512])
    return args


def cases(args) -> list[Case]:
    out = []
    seqlens_k = args.seqlen_k or args.seqlen
    for mode in args.mode:
        for dtype in args.dtype:
            for hdim in args.hdim:
                heads = args.nheads or max(1, 2048 // hdim)
                heads_kv = args.nheads_kv or heads
                if heads % heads_kv:
                    raise SystemExit(f"error: --nheads-kv {heads_kv} must divide nheads {heads}")
                for sq, sk in zip(args.seqlen, seqlens_k):
                    batch = args.batch or (16 if mode == "decode" else max(1, args.tokens // sq))
                    for causal in (args.causal if mode != "decode" else [False]):  # 1 row: same
                        out.append(Case(mode, dtype, hdim, 1 if mode == "decode" else sq,
                                        sk, batch, heads, heads_kv, causal))
    return out


# ---------------------------------------------------------------------------------------------
# Implementations: each builds (fn, leaves) for a case: fn() runs the forward, leaves are the
# tensors a backward differentiates. Building or running raises when it cannot serve the case.
# ---------------------------------------------------------------------------------------------


def _inputs(case: Case, device: str, grad: bool):
    dt = DTYPES[case.dtype]
    make = lambda s, h: torch.randn(case.batch, s, h, case.hdim, device=device, dtype=dt, requires_grad=grad)  # noqa: E731
    return make(case.seqlen_q, case.nheads), make(case.seqlen_k, case.nheads_kv), make(case.seqlen_k, case.nheads_kv)


def _heads_first(q, k, v):
    """(B, H, S, D) contiguous copies, leaves of their own (torch's layout)."""
    return tuple(t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))


def _ours(case: Case, q, k, v):
    import flash_attention as fa

    backend = "cuda" if q.is_cuda else "cpu"
    if case.mode == "decode" and hasattr(fa, "flash_attn_with_kvcache"):
        return lambda: fa.flash_attn_with_kvcache(q, k, v, causal=case.causal, check_indices=False), (q, k, v)
    return lambda: fa.flash_attn_func(q, k, v, causal=case.causal, backend=backend), (q, k, v)


def _sdpa(kernel):
    def build(case: Case, q, k, v):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, kernel)
        qt, kt, vt = _heads_first(q, k, v)
        causal = case.causal and case.seqlen_q > 1
        if causal and case.seqlen_q != case.seqlen_k:
            raise RuntimeError("SDPA's causal mask is top-left aligned; seqlen_q != seqlen_k differs")
        gqa = case.nheads != case.nheads_kv

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
        return fn, (qt, kt, vt)
    return build


def _flex(case: Case, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    qt, kt, vt = _heads_first(q, k, v)
    offset = case.seqlen_k - case.seqlen_q
    mask = None
    if case.causal and case.seqlen_q > 1:
        mask = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, case.seqlen_q,
                                 case.seqlen_k, device=q.device.type)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = case.nheads != case.nheads_kv
    return lambda: compiled(qt, kt, vt, block_mask=mask, enable_gqa=gqa), (qt, kt, vt)


BUILDERS = {
    OURS: _ours, "sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"), "sdpa-math": _sdpa("MATH"), "flex": _flex,
}


def default_impls(device: str) -> list[str]:
    if device == "cuda":
        return list(IMPLS)
    return [OURS, "sdpa-flash", "sdpa-math"]   # torch's CPU SDPA backends; flex is opt-in on CPU


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _with_backward(fn: Callable, tensors) -> Callable:
    out = fn()
    dout = torch.randn_like(out)

    def step():
        torch.autograd.grad(fn(), tensors, dout)
    return step


def median_ms(fn: Callable, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import torch.utils.benchmark as tb

    fn()
    return tb.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e3


def measure(impl: str, case: Case, device: str) -> tuple[float | None, str]:
    """(median ms, "") or (None, why it could not run)."""
    grad = case.mode == "fwdbwd"
    try:
        q, k, v = _inputs(case, device, grad)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn, leaves = BUILDERS[impl](case, q, k, v)
            if grad:
                fn = _with_backward(fn, leaves)
            fn()
            return median_ms(fn, device), ""
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of memory"
    except Exception as error:  # an implementation that cannot serve the case: reported, not fatal
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:120]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def row(gpu: str, impl: str, case: Case, ms: float | None) -> dict:
    tflops = case.flops / (ms * 1e-3) / 1e12 if ms else float("nan")
    return {"gpu": gpu, "impl": impl, **{f.name: getattr(case, f.name) for f in dataclasses.fields(Case)},
            "ms": ms if ms is not None else float("nan"), "tflops": tflops}


def metric(r: dict, case: Case) -> float:
    """TFLOP/s, or GB/s of KV cache read for decode."""
    if math.isnan(r["ms"]):
        return float("nan")
    return case.kv_bytes / (r["ms"] * 1e-3) / 1e9 if case.mode == "decode" else r["tflops"]


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def table(results: list[tuple[Case, dict[str, dict]]], impls: list[str]) -> str:
    head = ["mode", "dtype", "hdim", "seqlen", "causal", "batch", "heads"] + impls
    if OURS in impls and len(impls) > 1:
        head.append("ours/best")
    lines = []
    for case, by_impl in results:
        values = {i: metric(by_impl[i], case) for i in impls}
        seqlen = f"{case.seqlen_q}x{case.seqlen_k}" if case.seqlen_q != case.seqlen_k else str(case.seqlen_q)
        heads = f"{case.nheads}/{case.nheads_kv}" if case.nheads != case.nheads_kv else str(case.nheads)
        cells = [case.mode, case.dtype, str(case.hdim), seqlen, "y" if case.causal else "n",
                 str(case.batch), heads] + [_fmt(values[i]) for i in impls]
        if len(head) > len(cells):
            others = [x for i, x in values.items() if i != OURS and not math.isnan(x)]
            ours = values.get(OURS, float("nan"))
            cells.append(f"{ours / max(others):.2f}x" if others and not math.isnan(ours) else "-")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    unit = "values: TFLOP/s (decode: GB/s of KV cache read); '-' = could not run"
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines] + [unit])


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: (int(r[c]) if c == "causal" else r[c]) for c in CSV_COLUMNS})


def plot(path: Path, results: list[tuple[Case, dict[str, dict]]], impls: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list] = {}
    for case, by_impl in results:
        key = (case.mode, case.dtype, case.hdim, case.causal, case.nheads, case.nheads_kv)
        groups.setdefault(key, []).append((case, by_impl))
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (key, members) in zip(axes.flat, groups.items()):
        mode, dtype, hdim, causal, heads, heads_kv = key
        for impl in impls:
            xs = [c.seqlen_k for c, _ in members]
            ys = [metric(b[impl], c) for c, b in members]
            ax.plot(xs, ys, marker="o", label=impl, linewidth=2.5 if impl == OURS else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} {dtype} hdim={hdim} {'causal' if causal else 'full'} h={heads}/{heads_kv}", fontsize=9)
        ax.set_xlabel("seqlen_k")
        ax.set_ylabel("GB/s" if mode == "decode" else "TFLOP/s")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"attention on {device_name('cuda' if torch.cuda.is_available() else 'cpu')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress(items, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(items, desc="bench", unit="run", file=sys.stderr)
        except ImportError:
            pass
    return items


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    impls = args.impl or default_impls(args.device)
    gpu = device_name(args.device)
    todo = cases(args)
    results = [(case, {}) for case in todo]
    failures: dict[str, str] = {}
    for (case, by_impl), impl in _progress([(r, i) for r in results for i in impls], not args.no_progress):
        ms, why = measure(impl, case, args.device)
        by_impl[impl] = row(gpu, impl, case, ms)
        if why:
            failures.setdefault(f"{impl}: {why}", case)
    print(f"\nflash_attention bench on {gpu}")
    print(table(results, impls))
    for what in failures:
        print(f"  could not run {what}")
    rows = [r for _, by_impl in results for r in by_impl.values()]
    write_csv(args.csv, rows)
    print(f"CSV: {args.csv}")
    if args.plot:
        plot(args.plot, results, impls)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
