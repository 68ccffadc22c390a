"""Times one forward of real model architectures with their default attention vs ours.

    python benchmarks/bench_models.py               # GPU: larger configs, fp16
    python benchmarks/bench_models.py --small       # tiny configs (a CPU smoke run)

Models are built from configs with random weights (nothing downloaded): a Llama with GQA
(transformers, padded batch through the varlen path), an SD-1.5-shaped UNet2DConditionModel, a
DiT-XL/2 and the SD VAE decoder (diffusers). For each it prints the median forward time with the
default attention (SDPA) and with flash_attention, the speed-up, how many attention calls ran on our
kernels / fell back (and why), and how far our output is from the default one.
Needs: PYTHONPATH=python, FLASH_ATTENTION_LIBRARY=<build>/_C.so (developer build), transformers,
diffusers.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

from flash_attention.integrations import reset_stats, stats

COLUMNS = ["gpu", "model", "dtype", "shape", "default_ms", "flash_attention_ms", "speedup",
           "kernel_calls", "fallback_calls", "max_rel_diff"]


def _llama(small: bool, device, dtype):
    import transformers

    import flash_attention.integrations.transformers as fat

    size = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256) if small else
            dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000))
    batch, seqlen = (2, 64) if small else (8, 4096)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(max_position_embeddings=4096, **size))
    model = model.to(dtype).eval()
    ids = torch.randint(0, size["vocab_size"], (batch, seqlen), device=device)
    mask = torch.ones_like(ids)
    mask[0, : seqlen // 4] = 0   # one left-padded row: the varlen path
    # Padded positions hold no token: their logits differ between attention implementations by design.
    run = lambda: model(ids, attention_mask=mask).logits * mask[..., None]  # noqa: E731
    hooks = (lambda: model.set_attn_implementation(fat.NAME), lambda: model.set_attn_implementation("sdpa"))
    return run, hooks, "transformers", f"b{batch} s{seqlen} h{size['num_attention_heads']}/{size['num_key_value_heads']}"


def _diffusers(model, call, shape):
    import flash_attention.integrations.diffusers as fad

    return call, (lambda: fad.enable(model), lambda: fad.disable(model)), "diffusers", shape


def _unet(small: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    config = (dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                   attention_head_dim=(1, 2), norm_num_groups=8, sample_size=16,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")) if small else
              dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                   attention_head_dim=8, sample_size=96))   # SD-1.5 at 768 px
    with torch.device(device):
        model = UNet2DConditionModel(**config)
    model = model.to(dtype).eval()
    s, c = config["sample_size"], config["cross_attention_dim"]
    x = torch.randn(2, 4, s, s, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, c, device=device, dtype=dtype)
    t = torch.tensor([10, 500], device=device)
    return _diffusers(model, lambda: model(x, t, ctx).sample, f"b2 {s}x{s} latents")


def _dit(small: bool, device, dtype):
    from diffusers import DiTTransformer2DModel

    config = (dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8) if small else
              dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=64))
    with torch.device(device):
        model = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, **config)
    model = model.to(dtype).eval()
    s = config["sample_size"]
    b = 2 if small else 8
    x = torch.randn(b, 4, s, s, device=device, dtype=dtype)
    t, labels = torch.tensor([10, 500] * (b // 2), device=device), torch.tensor([1, 3] * (b // 2), device=device)
    return _diffusers(model, lambda: model(x, timestep=t, class_labels=labels).sample,
                      f"b{b} {(s // 2) ** 2} tokens")


def _vae(small: bool, device, dtype):
    from diffusers import AutoencoderKL

    config = (dict(block_out_channels=(16, 32), norm_num_groups=8, sample_size=16,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
              if small else
              dict(block_out_channels=(128, 256, 512, 512), sample_size=512,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4))
    with torch.device(device):
        model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, **config)
    model = model.to(dtype).eval()
    latent = config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)
    z = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    return _diffusers(model, lambda: model.decode(z).sample, f"decode {latent}x{latent} latents")


MODELS = {"llama": _llama, "unet": _unet, "dit": _dit, "vae": _vae}


def median_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_top(title: str, fn, device: str, rows: int = 12) -> None:
    """Prints the kernels and CPU ops that took the most time over 3 calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {title} (3 calls) ---")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


@torch.no_grad()
def bench_model(name: str, small: bool, device: str, dtype, profile: bool = False) -> dict:
    run, (enable, disable), site, shape = MODELS[name](small, device, dtype)
    expected = run().float()
    enable()
    reset_stats()
    actual = run().float()
    calls = stats().get(site, {})
    disable()
    # Interleaved rounds (default, ours, default, ours, ...) so clock and thermal drift hit both alike.
    default_times, ours_times = [], []
    for _ in range(3 if device == "cuda" else 1):
        default_times.append(median_ms(run, device))
        enable()
        ours_times.append(median_ms(run, device))
        disable()
    default_ms, ours_ms = statistics.median(default_times), statistics.median(ours_times)
    if profile:
        profile_top(f"{name}, default attention", run, device)
        enable()
        profile_top(f"{name}, flash_attention", run, device)
        disable()
    kernel = sum(n for k, n in calls.items() if k.startswith("flash_attention["))
    fallbacks = {k: n for k, n in calls.items() if k.startswith("fallback")}
    diff = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item()
    return {"model": name, "dtype": str(dtype).replace("torch.", ""), "shape": shape,
            "default_ms": default_ms, "flash_attention_ms": ours_ms, "speedup": default_ms / ours_ms,
            "kernel_calls": kernel, "fallback_calls": sum(fallbacks.values()), "fallbacks": fallbacks,
            "max_rel_diff": diff}


def print_table(gpu: str, rows: list[dict]) -> None:
    print(f"\nmodel forward on {gpu}: default attention (SDPA) vs flash_attention")
    head = f"{'model':6} {'dtype':8} {'shape':24} {'default ms':>10} {'ours ms':>9} {'speedup':>8} " \
           f"{'ours/fallback calls':>19} {'max rel diff':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        calls = f"{r['kernel_calls']}/{r['fallback_calls']}"
        print(f"{r['model']:6} {r['dtype']:8} {r['shape']:24} {r['default_ms']:10.2f} "
              f"{r['flash_attention_ms']:9.2f} {r['speedup']:7.2f}x {calls:>19} {r['max_rel_diff']:12.2e}")
        for reason, n in r["fallbacks"].items():
            print(f"       {n} call(s) {reason}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {','.join(MODELS)}")
    p.add_argument("--small", action="store_true", help="tiny configs (default on the CPU)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--csv", type=Path, default=None, help="also write the rows here")
    p.add_argument("--profile", action="store_true", help="print the top kernels of each variant (torch.profiler)")
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {', '.join(unknown)} (choose from {', '.join(MODELS)})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "float32"))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    for name in names:
        try:
            rows.append(bench_model(name, small, device, dtype, args.profile))
        except ImportError as error:
            print(f"skipping {name}: {error}", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(gpu, rows)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({"gpu": gpu, **r} for r in rows)
        print(f"CSV: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
