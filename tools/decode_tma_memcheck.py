#!/usr/bin/env python3
"""A few decode calls for compute-sanitizer (memcheck / racecheck) with the TMA tiles forced on
(FLASH_ATTENTION_DECODE_TMA=1): contiguous and paged caches, sequence ends inside a block, an empty
sequence, one split / partials / a cluster / the wide CTA."""
import os

import torch

from flash_attention import flash_attn_with_kvcache

os.environ.setdefault("FLASH_ATTENTION_DECODE_TMA", "1")
torch.manual_seed(0)
H, HK, D = 32, 8, 128
for page in (None, 16, 256):
    for B, sk in ((1, 3000), (3, 1000)):
        cap = (sk + 255) // 256 * 256
        q = torch.randn(B, 1, H, D, dtype=torch.bfloat16, device="cuda")
        seqlens = torch.tensor([sk, 0, 37][:B], dtype=torch.int32, device="cuda")
        if page is None:
            k = torch.randn(B, cap, HK, D, dtype=torch.bfloat16, device="cuda")
            table = None
        else:
            per = cap // page
            k = torch.randn(B * per, page, HK, D, dtype=torch.bfloat16, device="cuda")
            table = torch.randperm(B * per, device="cuda").to(torch.int32).view(B, per)
        v = torch.randn_like(k)
        for splits in (0, 1, 3, 16):
            out = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, num_splits=splits)
torch.cuda.synchronize()
print("memcheck driver done")
