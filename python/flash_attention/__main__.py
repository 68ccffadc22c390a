"""python -m flash_attention          environment report, then a checked and timed attention call
python -m flash_attention bench    the benchmark suite (flash_attention.bench)

Works without a GPU (the check then runs on the CPU). Exit status 1 when the check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import __version__, _ops, backends, interface, reference


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m flash_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="default: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=None)
    parser.add_argument("--nheads", type=int, default=None)
    parser.add_argument("--headdim", type=int, default=None)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median is printed)")
    return parser.parse_args(argv)


def _settings(args):
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    batch = args.batch or (4 if cuda else 1)
    seqlen = args.seqlen or (4096 if cuda else 512)
    nheads = args.nheads or (16 if cuda else 8)
    headdim = args.headdim or (128 if cuda else 64)
    repeats = args.repeats or (20 if cuda else 3)
    return device, dtype, (batch, seqlen, nheads, headdim), repeats


def report_environment(call: backends.Call) -> None:
    info = _ops.build_info()
    print(f"flash_attention {__version__}")
    print(f"  op library : {_ops._library_path() if _ops.LOADED else _ops.LOAD_ERROR}")
    print(f"  build      : cuda_built={info['cuda_built']} archs={info['archs']} "
          f"head_dims={info['head_dims']} dtypes={info['dtypes']}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"{torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            print(f"  GPU {index}: {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        print("  GPU: none")
    shape = tuple(call.q.shape)
    print(f"backends for a {shape} {str(call.q.dtype).replace('torch.', '')} call on {call.q.device}:")
    for name, reason in backends.unsupported_reasons(call).items():
        print(f"  {name:5s} {'available' if reason is None else 'no: ' + reason}")
    print(f"  auto -> {backends.choose(call)}")


def _time_ms(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def check_and_time(q, k, v, causal, repeats) -> bool:
    """FlashAttention's rule on the first batch element (keeps the fp32 reference small):
    max|ours - fp32 ref| <= 2 * max|torch in q.dtype - fp32 ref| + 1e-5."""
    scale = q.shape[-1] ** -0.5
    sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale)
    ours = interface.flash_attn_func(q, k, v, causal=causal)[:1].float()
    baseline_out = sdpa()[:1].transpose(1, 2).float()
    ref, _ = reference.attention(q[:1].float(), k[:1].float(), v[:1].float(), softmax_scale=scale, causal=causal)
    baseline = (baseline_out - ref).abs().max().item()
    error = (ours - ref).abs().max().item()
    ok = error <= 2 * baseline + 1e-5
    print(f"check: max|ours - fp32 ref| = {error:.3g}, max|torch sdpa - fp32 ref| = {baseline:.3g} "
          f"-> {'PASS' if ok else 'FAIL'}")

    batch, seqlen, nheads, headdim = q.shape
    flops = 4 * batch * nheads * seqlen * seqlen * headdim / (2 if causal else 1)
    for name, fn in (("flash_attention", lambda: interface.flash_attn_func(q, k, v, causal=causal)),
                     ("torch sdpa", sdpa)):
        ms = _time_ms(fn, q.device, repeats)
        print(f"  {name:16s} {ms:9.3f} ms  {flops / ms / 1e9:8.3g} TFLOP/s")
    return ok


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from . import bench  # written separately; imported only when asked for

        return bench.main(argv[1:])
    args = _parse(argv)
    device, dtype, shape, repeats = _settings(args)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    call = backends.Call(q=q, k=k, v=v, softmax_scale=shape[-1] ** -0.5, causal=args.causal)
    report_environment(call)
    print(f"attention {shape} {str(dtype).replace('torch.', '')} causal={args.causal} on {device}:")
    return 0 if check_and_time(q, k, v, args.causal, repeats) else 1


if __name__ == "__main__":
    sys.exit(main())
