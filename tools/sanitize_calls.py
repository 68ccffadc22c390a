#!/usr/bin/env python3
"""A few representative calls for compute-sanitizer (memcheck / racecheck), small enough to run under it:
the sm90 forward at hdim 64 on both of its tiles (N = 128 up to 2k keys; N = 224 for dense calls above 2k
keys and causal ones above 4k), ragged key counts, varlen; and the decode kernel's plans (one split,
partials, clusters, the wide and the narrow CTA; cp.async and TMA tiles; contiguous and paged caches; empty
and short sequences).

  compute-sanitizer --tool memcheck python3 tools/sanitize_calls.py [forward] [decode] [--quick]

--quick: the decode calls on contiguous and 16-row pages only, split counts 0 and 3 (racecheck is slow).
"""
import os
import sys

import torch

import flash_attention as fa

torch.manual_seed(0)
quick = "--quick" in sys.argv
parts = [a for a in sys.argv[1:] if a != "--quick"] or ["forward", "decode"]
dev, bf16 = "cuda", torch.bfloat16

if "forward" in parts:
    for sk, causal in ((1000, False), (3001, False), (3001, True), (5000, True), (4099, False)):
        q = torch.randn(1, min(sk, 700), 2, 64, dtype=bf16, device=dev)
        k, v = (torch.randn(1, sk, 2, 64, dtype=bf16, device=dev) for _ in range(2))
        fa.flash_attn_func(q, k, v, causal=causal)
    lens = [0, 2500, 17, 4500]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(sum(lens), 2, 64, dtype=bf16, device=dev) for _ in range(3))
    fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens))
    torch.cuda.synchronize()
    print("forward calls done", flush=True)

if "decode" in parts:
    H, HK, D = 32, 8, 128
    for narrow in ("0", "1"):
        os.environ["FLASH_ATTENTION_DECODE_NARROW"] = narrow
        for tma in ("0", "1"):
            os.environ["FLASH_ATTENTION_DECODE_TMA"] = tma
            for page in (None, 16) if quick else (None, 16, 256):
                for B, sk in ((1, 3000), (3, 1000), (40, 700)):
                    cap = (sk + 255) // 256 * 256
                    q = torch.randn(B, 1, H, D, dtype=bf16, device=dev)
                    seqlens = torch.full((B,), sk, dtype=torch.int32, device=dev)
                    seqlens[: min(B, 2)] = torch.tensor([0, 37][:B], dtype=torch.int32)
                    if page is None:
                        k = torch.randn(B, cap, HK, D, dtype=bf16, device=dev)
                        table = None
                    else:
                        per = cap // page
                        k = torch.randn(B * per, page, HK, D, dtype=bf16, device=dev)
                        table = torch.randperm(B * per, device=dev).to(torch.int32).view(B, per)
                    v = torch.randn_like(k)
                    for splits in (0, 3) if quick else (0, 1, 3, 16):
                        fa.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, num_splits=splits)
    torch.cuda.synchronize()
    print("decode calls done", flush=True)
