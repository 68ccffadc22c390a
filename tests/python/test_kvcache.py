"""flash_attn_with_kvcache / flash_attn_varlen_paged / flash_attn_combine against a torch reference that
reconstructs each sequence's cache (CPU always; CUDA when built and present).

Correctness rule (FlashAttention's): max|ours - ref_fp32| <= 3 * max|torch_lowp - ref_fp32| + 1e-5, and the
cache after the append matches the reference exactly (rotated rows: within one rounding of the dtype).
"""

import math

import pytest
import torch

from flash_attention import _ops

pytestmark = pytest.mark.skipif(not _ops.LOADED, reason=f"op library not loaded: {_ops.LOAD_ERROR}")

if _ops.LOADED:
    from flash_attention import flash_attn_combine, flash_attn_varlen_paged, flash_attn_with_kvcache

DEVICES = ["cpu"]
if torch.cuda.is_available() and _ops.build_info().get("cuda_built"):
    DEVICES.append("cuda")


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------


def rotate(x, cos, sin, pos, interleaved):
    """Rotary on the last dim of x (..., D) at integer positions pos (x.shape[:-2]), fp32, rounded to x.dtype."""
    half = cos.shape[1]
    c, s = cos.float()[pos].unsqueeze(-2), sin.float()[pos].unsqueeze(-2)
    out = x.float().clone()
    i0 = torch.arange(half, device=x.device) * 2 if interleaved else torch.arange(half, device=x.device)
    i1 = i0 + 1 if interleaved else i0 + half
    x0, x1 = out[..., i0], out[..., i1]
    out[..., i0], out[..., i1] = x0 * c - x1 * s, x0 * s + x1 * c
    return out.to(x.dtype)


def physical_rows(cache, b, pos, block_table, batch_idx):
    """(index tuple into cache) for positions pos of sequence b."""
    if block_table is not None:
        page = cache.shape[1]
        return block_table[b, pos // page].long(), pos % page
    row = int(batch_idx[b]) if batch_idx is not None else b
    return torch.full_like(pos, row), pos


def reference(q, k_cache, v_cache, k=None, v=None, cos=None, sin=None, cache_seqlens=None, batch_idx=None,
              leftpad=None, block_table=None, causal=False, window=(-1, -1), softcap=0.0, interleaved=True,
              alibi=None, scale=None, compute_dtype=torch.float32):
    """(out, lse, k_cache_after, v_cache_after); attention computed in compute_dtype."""
    B, Sq, H, D = q.shape
    Hk = k_cache.shape[2]
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    scale = D ** -0.5 if scale is None else scale
    seqlens = cache_seqlens.long() if cache_seqlens is not None else torch.full((B,), capacity, dtype=torch.long)
    seqlens = seqlens.cpu()
    new = 0 if k is None else k.shape[1]
    kc, vc = k_cache.clone(), v_cache.clone()
    for b in range(B):
        if new == 0:
            continue
        pos = seqlens[b] + torch.arange(new)
        kn = rotate(k[b], cos, sin, pos.to(k.device), interleaved) if cos is not None else k[b]
        rows = physical_rows(kc, b, pos.to(k.device), block_table, batch_idx)
        kc[rows], vc[rows] = kn, v[b]
    wl, wr = window
    wl = -1 if wl >= capacity else wl
    wr = 0 if causal else wr
    per_row = wl >= 0 or 0 <= wr < capacity
    out = torch.zeros(B, Sq, H, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, Sq), math.inf, dtype=torch.float32, device=q.device)
    for b in range(B):
        lp = int(leftpad[b]) if leftpad is not None else 0
        end = int(seqlens[b]) + new
        pos = torch.arange(lp, end, device=q.device)
        rows = physical_rows(kc, b, pos, block_table, batch_idx)
        K, V = kc[rows], vc[rows]  # (Sk, Hk, D)
        Sk = end - lp
        qb = q[b]
        if cos is not None:
            qpos = int(seqlens[b]) + (torch.arange(Sq) if per_row else torch.zeros(Sq, dtype=torch.long))
            qb = rotate(qb, cos, sin, qpos.to(q.device), interleaved)
        if Sk == 0:
            continue
        G = H // Hk
        K = K.repeat_interleave(G, dim=1).to(compute_dtype)
        V = V.repeat_interleave(G, dim=1).to(compute_dtype)
        s = torch.einsum("qhd,khd->hqk", qb.to(compute_dtype), K) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(Sq, device=q.device).view(-1, 1)
        j = torch.arange(Sk, device=q.device).view(1, -1)
        diag = i + Sk - Sq
        if alibi is not None:
            slopes = alibi[b] if alibi.dim() == 2 else alibi
            s = s - slopes.view(H, 1, 1).to(compute_dtype) * (diag - j).abs().to(compute_dtype)
        visible = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
        if wr >= 0:
            visible &= j <= diag + wr
        if wl >= 0:
            visible &= j >= diag - wl
        s = s.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(s.float(), dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[b] = torch.einsum("hqk,khd->qhd", p, V).float()
        lse[b] = torch.where(torch.isinf(row_lse), torch.full_like(row_lse, math.inf), row_lse)
    return out.to(q.dtype), lse, kc, vc


def assert_fa_close(ours, ref, lowp, what, mult=3.0):
    err = (ours.float() - ref.float()).abs().max().item()
    budget = mult * (lowp.float() - ref.float()).abs().max().item() + 1e-5
    assert err <= budget, f"{what}: max error {err:.3e} > budget {budget:.3e}"


def assert_cache_equal(ours, ref, rotated, what):
    if not rotated:
        assert torch.equal(ours, ref), f"{what} differs from the reference"
        return
    rtol = 2.0 ** -7 if ours.dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(ours, ref, atol=0, rtol=rtol, msg=f"{what} differs beyond one rounding")


# ------------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------------


def make_problem(device, dtype=torch.bfloat16, B=2, Sq=1, H=8, Hk=2, D=64, Sk=100, page=None, new=0,
                 rotary_fraction=0.0, leftpad=False, batch_idx=False, seed=0):
    """Random inputs made on `device`; the last sequence fills Sk, the others are shorter."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    def randperm(n):
        return torch.randperm(n, generator=g, device=device).to(torch.int32)

    capacity = Sk + new
    if page:
        capacity = (capacity + page - 1) // page * page
    seqlens = torch.randint(0, Sk + 1, (B,), generator=g, device=device, dtype=torch.int32)
    seqlens[-1] = Sk
    pr = dict(q=randn(B, Sq, H, D), cache_seqlens=seqlens)
    if page:
        per_seq = capacity // page
        num_blocks = B * per_seq + 3
        table = randperm(num_blocks)[: B * per_seq].view(B, per_seq)
        used = (seqlens.long() + new + page - 1) // page  # pages past the end are never read: mark them invalid
        table[torch.arange(per_seq, device=device).view(1, -1) >= used.view(-1, 1)] = -1
        pr["block_table"] = table
        pr["k_cache"], pr["v_cache"] = randn(num_blocks, page, Hk, D), randn(num_blocks, page, Hk, D)
    else:
        rows = B + 2 if batch_idx else B
        pr["k_cache"], pr["v_cache"] = randn(rows, capacity, Hk, D), randn(rows, capacity, Hk, D)
        if batch_idx:
            pr["cache_batch_idx"] = randperm(rows)[:B].contiguous()
    if new:
        pr["k"], pr["v"] = randn(B, new, Hk, D), randn(B, new, Hk, D)
    rotary_dim = int(D * rotary_fraction) // 16 * 16
    if rotary_dim:
        angle = torch.rand(capacity + Sq, rotary_dim // 2, generator=g, device=device) * 2 * math.pi
        pr["rotary_cos"], pr["rotary_sin"] = angle.cos().to(dtype), angle.sin().to(dtype)
    if leftpad:
        pr["cache_leftpad"] = (torch.rand(B, generator=g, device=device) * (seqlens + 1)).floor().to(torch.int32)
    return pr


def run_and_check(pr, causal=False, window=(-1, -1), softcap=0.0, interleaved=True, alibi=None, num_splits=0):
    kwargs = dict(causal=causal, window_size=window, softcap=softcap, rotary_interleaved=interleaved,
                  alibi_slopes=alibi, num_splits=num_splits)
    ref_args = dict(k=pr.get("k"), v=pr.get("v"), cos=pr.get("rotary_cos"), sin=pr.get("rotary_sin"),
                    cache_seqlens=pr["cache_seqlens"], batch_idx=pr.get("cache_batch_idx"),
                    leftpad=pr.get("cache_leftpad"), block_table=pr.get("block_table"), causal=causal,
                    window=window, softcap=softcap, interleaved=interleaved, alibi=alibi)
    ref, ref_lse, kc_ref, vc_ref = reference(pr["q"], pr["k_cache"], pr["v_cache"], **ref_args)
    lowp, _, _, _ = reference(pr["q"], pr["k_cache"], pr["v_cache"], **ref_args, compute_dtype=pr["q"].dtype)
    args = {key: pr[key] for key in pr}
    out, lse = flash_attn_with_kvcache(**args, return_softmax_lse=True, **kwargs)
    assert out.shape == pr["q"].shape and out.dtype == pr["q"].dtype
    assert_fa_close(out, ref, lowp, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite), "lse: fully masked rows must be +inf"
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-3, rtol=1e-3)
    rotated = "rotary_cos" in pr
    assert_cache_equal(pr["k_cache"], kc_ref, rotated, "k_cache")
    assert_cache_equal(pr["v_cache"], vc_ref, False, "v_cache")
    return out, lse


# One sweep: every (Sq, Sk, page) with the remaining options varied across cases.
SWEEP = [(sq, sk, page) for sq in (1, 3, 128) for sk in (1, 77, 700) for page in (None, 16, 256)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", range(len(SWEEP)))
def test_sweep(device, n):
    sq, sk, page = SWEEP[n]
    rotary = (0.0, 0.5, 1.0)[n % 3]
    leftpad = n % 4 in (1, 2)
    new = (0, sq)[n % 2] if sq < 128 else (0, 5)[n % 2]
    gqa = (1, 4, 8)[(n // 3) % 3]
    splits = (0, 1, 5)[(n // 2) % 3]
    pr = make_problem(device, Sq=sq, Sk=sk, page=page, new=new, rotary_fraction=rotary, leftpad=leftpad,
                      H=8, Hk=8 // gqa, seed=n)
    run_and_check(pr, causal=n % 5 != 0, interleaved=n % 2 == 0, num_splits=splits)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_idx_window_softcap_alibi(device):
    pr = make_problem(device, B=3, Sq=4, new=2, batch_idx=True, leftpad=True, rotary_fraction=0.5)
    alibi = torch.rand(3, 8, device=device) * 0.3
    run_and_check(pr, window=(9, 1), softcap=4.0, alibi=alibi, interleaved=False)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_paged_mqa_page48(device):
    pr = make_problem(device, dtype=torch.float16, H=4, Hk=1, D=128, Sk=200, page=48, new=1, rotary_fraction=1.0)
    run_and_check(pr, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_int_seqlens_and_defaults(device):
    pr = make_problem(device, Sq=2)
    q, kc, vc = pr["q"], pr["k_cache"], pr["v_cache"]
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=40, causal=True)
    seqlens = torch.full((2,), 40, dtype=torch.int32, device=device)
    ref, _, _, _ = reference(q, kc, vc, cache_seqlens=seqlens, causal=True)
    lowp, _, _, _ = reference(q, kc, vc, cache_seqlens=seqlens, causal=True, compute_dtype=q.dtype)
    assert_fa_close(out, ref, lowp, "out")
    full = flash_attn_with_kvcache(q, kc, vc)  # no cache_seqlens: the whole cache
    ref, _, _, _ = reference(q, kc, vc)
    lowp, _, _, _ = reference(q, kc, vc, compute_dtype=q.dtype)
    assert_fa_close(full, ref, lowp, "out (whole cache)")


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_paged_prefill(device):
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k, page, H, Hk, D = [3, 0, 17], [40, 5, 17], 16, 4, 2, 64
    per_seq = 3
    kc = torch.randn(10, page, Hk, D, generator=g).bfloat16().to(device)
    vc = torch.randn(10, page, Hk, D, generator=g).bfloat16().to(device)
    table = torch.randperm(10, generator=g)[:9].view(3, per_seq).to(torch.int32).to(device)
    cu_q = torch.tensor([0, 3, 3, 20], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 40, 45, 62], dtype=torch.int32, device=device)
    q = torch.randn(20, H, D, generator=g).bfloat16().to(device)
    out, lse = flash_attn_varlen_paged(q, kc, vc, cu_q, cu_k, 17, 40, table, causal=True, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (H, 20)
    # FlashAttention-2's spelling of the same call: flash_attn_varlen_func with block_table
    import flash_attention as fa
    out2, lse2, _ = fa.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 17, 40, causal=True, block_table=table,
                                              return_attn_probs=True)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    for b in range(3):
        if lens_q[b] == 0:
            continue
        qb = q[cu_q[b]:cu_q[b + 1]].unsqueeze(0)
        seqlens = torch.tensor([lens_k[b]], dtype=torch.int32, device=device)
        args = dict(cache_seqlens=seqlens, block_table=table[b:b + 1], causal=True)
        ref, ref_lse, _, _ = reference(qb, kc, vc, **args)
        lowp, _, _, _ = reference(qb, kc, vc, **args, compute_dtype=q.dtype)
        assert_fa_close(out[cu_q[b]:cu_q[b + 1]].unsqueeze(0), ref, lowp, f"out of sequence {b}")
        torch.testing.assert_close(lse[:, cu_q[b]:cu_q[b + 1]], ref_lse[0], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_matches_full_attention(device):
    pr = make_problem(device, B=2, Sq=3, Sk=96, H=4, Hk=4)
    q, kc, vc = pr["q"], pr["k_cache"], pr["v_cache"]
    full, full_lse = flash_attn_with_kvcache(q, kc, vc, return_softmax_lse=True)
    parts = [flash_attn_with_kvcache(q, kc[:, i:i + 32], vc[:, i:i + 32], return_softmax_lse=True)
             for i in (0, 32, 64)]
    out_partial = torch.stack([o.float() for o, _ in parts])
    lse_partial = torch.stack([lse.transpose(1, 2) for _, lse in parts])  # (splits, B, Sq, H)
    out, lse = flash_attn_combine(out_partial, lse_partial, out_dtype=q.dtype)
    assert out.dtype == q.dtype and lse.shape == (2, 3, 4)
    torch.testing.assert_close(out.float(), full.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(lse, full_lse.transpose(1, 2), atol=1e-4, rtol=0)
    into = torch.empty(2, 3, 4, 64, device=device)
    result, _ = flash_attn_combine(out_partial, lse_partial, out=into)
    assert result is into


@pytest.mark.parametrize("device", DEVICES)
def test_combine_empty_parts(device):
    out_partial = torch.randn(3, 1, 2, 2, 8, device=device)
    lse_partial = torch.full((3, 1, 2, 2), -math.inf, device=device)
    lse_partial[1, 0, 0, 0] = 0.25
    out, lse = flash_attn_combine(out_partial, lse_partial)
    torch.testing.assert_close(out[0, 0, 0], out_partial[1, 0, 0, 0])
    assert lse[0, 0, 0].item() == pytest.approx(0.25)
    assert torch.all(out[0, 1] == 0) and torch.all(out[0, 0, 1] == 0)
    assert torch.isinf(lse[0, 1]).all() and (lse[0, 1] > 0).all()


def test_opcheck():
    pr = make_problem("cpu", Sq=2, new=2, page=16, rotary_fraction=0.5)
    args = (pr["q"], pr["k_cache"], pr["v_cache"], pr["k"], pr["v"], pr["rotary_cos"], pr["rotary_sin"],
            pr["cache_seqlens"], None, None, pr["block_table"], None, 0, 0.125, True, -1, -1, 0.0, True, None, 0,
            True)
    torch.library.opcheck(torch.ops.flash_attention.fwd_kvcache.default, args)
    torch.library.opcheck(torch.ops.flash_attention.fwd_combine.default,
                          (torch.randn(2, 1, 3, 2, 8), torch.randn(2, 1, 3, 2), torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# CUDA only: long caches, the decode shape, graphs, unchecked indices
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA build and device")

# (B, Sq, Sk, page, new, rotary fraction, leftpad, num_splits), H = 32, Hk = 8, D = 128
LONG = [(2, 1, 131072, None, 1, 1.0, False, 0), (2, 1, 131072, 256, 0, 0.0, True, 0),
        (1, 1, 32768, 16, 1, 0.5, False, 100), (4, 3, 8192, 256, 3, 0.0, True, 1),
        (1, 128, 8192, None, 128, 1.0, False, 0), (8, 1, 1000, 16, 1, 0.0, False, 3),
        (3, 1, 20000, 48, 1, 0.5, True, 0), (64, 1, 1024, None, 1, 0.0, False, 0)]


@needs_cuda
@pytest.mark.parametrize("case", LONG, ids=[f"B{c[0]}-Sq{c[1]}-Sk{c[2]}-page{c[3]}-splits{c[7]}" for c in LONG])
def test_cuda_long_caches(case):
    B, Sq, Sk, page, new, rotary, leftpad, splits = case
    pr = make_problem("cuda", B=B, Sq=Sq, H=32, Hk=8, D=128, Sk=Sk, page=page, new=new, rotary_fraction=rotary,
                      leftpad=leftpad, seed=Sk + Sq)
    run_and_check(pr, causal=Sq > 1, num_splits=splits)


@needs_cuda
def test_cuda_split_merge_is_deterministic():
    """The in-kernel split merge: any split count matches the reference; a repeated call is bit-identical."""
    pr = make_problem("cuda", B=3, Sq=1, H=32, Hk=8, D=128, Sk=5000, page=16, seed=11)
    pr["cache_seqlens"][0] = 0  # an empty sequence: out = 0, lse = +inf through the merge
    for splits in (0, 1, 2, 7, 128, 256):  # 256: more than the kernel's 128, clamped
        run_and_check(pr, num_splits=splits)
        first = flash_attn_with_kvcache(**pr, num_splits=splits, return_softmax_lse=True)
        again = flash_attn_with_kvcache(**pr, num_splits=splits, return_softmax_lse=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), f"num_splits={splits}"


@needs_cuda
@pytest.mark.parametrize("wide", ["auto", "1", "0"])
def test_cuda_wide_ctas(monkeypatch, wide):
    """FLASH_ATTENTION_DECODE_WIDE (sm90: 8-warp CTAs, host plan only; elsewhere ignored). B = 1 with 9k keys
    takes the wide CTA with 8 splits in one cluster by default; explicit counts give one split, a cluster
    (<= 8) and the global merge (> 8); repeated calls are bit-identical; several row tiles, windows, ALiBi and
    an empty sequence; every built head dim of the wide kernel."""
    if wide == "auto":
        monkeypatch.delenv("FLASH_ATTENTION_DECODE_WIDE", raising=False)
    else:
        monkeypatch.setenv("FLASH_ATTENTION_DECODE_WIDE", wide)
    for page in (None, 16):
        pr = make_problem("cuda", B=1, Sq=1, H=32, Hk=8, D=128, Sk=9000, page=page, new=1, rotary_fraction=0.5,
                          leftpad=True, seed=5)
        for splits in (0, 1, 5, 8, 16):
            run_and_check(pr, num_splits=splits)
            first = flash_attn_with_kvcache(**pr, num_splits=splits, return_softmax_lse=True)
            again = flash_attn_with_kvcache(**pr, num_splits=splits, return_softmax_lse=True)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), f"num_splits={splits}"
    pr = make_problem("cuda", B=2, Sq=5, H=16, Hk=4, D=128, Sk=3000, page=48, leftpad=True, seed=6)
    pr["cache_seqlens"][0] = 0
    pr["cache_leftpad"][0] = 0
    slopes = torch.rand(2, 16, device="cuda") * 0.1
    for splits in (0, 3, 12):
        run_and_check(pr, window=(100, 0), alibi=slopes, num_splits=splits)
        run_and_check(pr, causal=True, num_splits=splits)
    for D in (32, 64, 96):
        if D in _ops.build_info().get("head_dims", []):
            pr = make_problem("cuda", B=1, Sq=1, H=8, Hk=2, D=D, Sk=2000, page=16, new=1, seed=D)
            run_and_check(pr, num_splits=0)
            run_and_check(pr, num_splits=6)


@needs_cuda
@pytest.mark.parametrize("cluster", ["auto", "1", "0"])
def test_cuda_cluster_merge_choice(monkeypatch, cluster):
    """FLASH_ATTENTION_DECODE_CLUSTER (sm90, host plan only; elsewhere ignored). B = 4 with 8k keys: 4 splits
    of 4-warp CTAs merge through partials by default (a cluster with "1"), B = 4 with 1k keys and B = 8 in
    clusters; explicit counts of 3 and 8 splits; repeated calls are bit-identical."""
    if cluster == "auto":
        monkeypatch.delenv("FLASH_ATTENTION_DECODE_CLUSTER", raising=False)
    else:
        monkeypatch.setenv("FLASH_ATTENTION_DECODE_CLUSTER", cluster)
    for B, Sk, page in ((4, 8000, None), (4, 8000, 16), (4, 1000, None), (8, 3000, 16)):
        pr = make_problem("cuda", B=B, Sq=1, H=32, Hk=8, D=128, Sk=Sk, page=page, new=1, leftpad=True, seed=B + Sk)
        for splits in (0, 3, 8):
            run_and_check(pr, num_splits=splits)
            first = flash_attn_with_kvcache(**pr, num_splits=splits, return_softmax_lse=True)
            again = flash_attn_with_kvcache(**pr, num_splits=splits, return_softmax_lse=True)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), f"num_splits={splits}"


def poison_tail(pr, new=0):
    """+inf in every cache row past each sequence's end (rows a kernel may read but must not use: a V row
    left in the sum gives 0 * inf = NaN)."""
    seqlens = pr["cache_seqlens"].long().cpu()
    for key in ("k_cache", "v_cache"):
        cache = pr[key]
        for b in range(seqlens.numel()):
            end = int(seqlens[b]) + new
            if "block_table" in pr:
                table, page = pr["block_table"], cache.shape[1]
                pos = torch.arange(end, table.shape[1] * page, device=cache.device)
                pages = table[b, pos // page].long()
                ok = pages >= 0
                cache[pages[ok], (pos % page)[ok]] = float("inf")
            else:
                row = int(pr["cache_batch_idx"][b]) if "cache_batch_idx" in pr else b
                cache[row, end:] = float("inf")


# (B, Sq, H, Hk, D, Sk, page, leftpad, batch_idx, dtype)
TMA_CASES = [(3, 1, 32, 8, 128, 5000, None, False, False, torch.bfloat16),
             (3, 1, 32, 8, 128, 700, 16, False, False, torch.bfloat16),
             (4, 1, 32, 8, 128, 9000, 256, False, False, torch.bfloat16),
             (3, 4, 16, 4, 128, 333, 48, False, False, torch.float16),
             (3, 1, 8, 2, 128, 17, None, True, True, torch.bfloat16),
             (2, 1, 32, 8, 128, 3000, 16, True, False, torch.bfloat16),
             (3, 1, 8, 2, 64, 1000, 16, False, False, torch.bfloat16),
             (2, 1, 8, 2, 256, 1000, None, False, False, torch.float16)]


@needs_cuda
@pytest.mark.parametrize("case", TMA_CASES, ids=[f"B{c[0]}-Sq{c[1]}-D{c[4]}-Sk{c[5]}-page{c[6]}-lp{int(c[7])}"
                                                 for c in TMA_CASES])
def test_cuda_decode_tma(monkeypatch, case):
    """FLASH_ATTENTION_DECODE_TMA (sm90: K / V blocks by 2-D TMA tiles; elsewhere, and for paged caches with
    left padding, cp.async rows): with +inf in every cache row past the sequence ends, both paths match the
    reference and each other bit for bit, for the default split count, one split, partials and clusters,
    an empty sequence and a sequence end inside a block."""
    B, Sq, H, Hk, D, Sk, page, leftpad, batch_idx, dtype = case
    if D not in _ops.build_info().get("head_dims", []):
        pytest.skip(f"head dim {D} not built")
    pr = make_problem("cuda", dtype=dtype, B=B, Sq=Sq, H=H, Hk=Hk, D=D, Sk=Sk, page=page, new=1,
                      leftpad=leftpad, batch_idx=batch_idx, seed=Sk + D)
    pr["cache_seqlens"][0] = 0
    if B > 2:  # a short sequence (no longer than make_problem's: its table marks the pages past the end -1)
        pr["cache_seqlens"][1] = pr["cache_seqlens"][1].clamp(max=29)
    if leftpad:
        pr["cache_leftpad"] = torch.minimum(pr["cache_leftpad"], pr["cache_seqlens"])
    poison_tail(pr, new=1)
    for splits in (0, 1, 3, 12):
        outs = []
        for tma in ("0", "1"):
            monkeypatch.setenv("FLASH_ATTENTION_DECODE_TMA", tma)
            outs.append(run_and_check(pr, causal=Sq > 1, num_splits=splits))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), f"num_splits={splits}"


# (B, Sq, H, Hk, D, Sk, page, leftpad, dtype): many tiles (B * Hk * row tiles > SMs / 2), so that the plan
# is the many-CTA one; paged with left padding (cp.async rows), several row tiles, hdim 64
NARROW_CASES = [(64, 1, 32, 8, 128, 1000, None, False, torch.bfloat16),
                (40, 1, 32, 8, 128, 3000, 16, False, torch.bfloat16),
                (33, 5, 16, 4, 128, 777, 48, True, torch.float16),
                (80, 1, 8, 2, 64, 2000, None, True, torch.bfloat16),
                (70, 1, 32, 8, 128, 40, 16, False, torch.bfloat16)]


@needs_cuda
@pytest.mark.parametrize("case", NARROW_CASES, ids=[f"B{c[0]}-Sq{c[1]}-D{c[4]}-Sk{c[5]}-page{c[6]}-lp{int(c[7])}"
                                                    for c in NARROW_CASES])
def test_cuda_decode_narrow(monkeypatch, case):
    """FLASH_ATTENTION_DECODE_NARROW (sm90: 3-warp CTAs, four per SM, in the many-CTA plan; host plan only,
    elsewhere ignored): with +inf past the sequence ends, empty and short sequences, TMA tiles on and off,
    the narrow and the 4-warp CTA match the reference, and repeated calls are bit-identical."""
    B, Sq, H, Hk, D, Sk, page, leftpad, dtype = case
    if D not in _ops.build_info().get("head_dims", []):
        pytest.skip(f"head dim {D} not built")
    pr = make_problem("cuda", dtype=dtype, B=B, Sq=Sq, H=H, Hk=Hk, D=D, Sk=Sk, page=page, new=1,
                      leftpad=leftpad, seed=Sk + B)
    pr["cache_seqlens"][0] = 0
    pr["cache_seqlens"][1] = pr["cache_seqlens"][1].clamp(max=29)
    if leftpad:
        pr["cache_leftpad"] = torch.minimum(pr["cache_leftpad"], pr["cache_seqlens"])
    poison_tail(pr, new=1)
    for narrow in ("1", "0"):
        monkeypatch.setenv("FLASH_ATTENTION_DECODE_NARROW", narrow)
        for tma in ("0", "1"):
            monkeypatch.setenv("FLASH_ATTENTION_DECODE_TMA", tma)
            first = run_and_check(pr, causal=Sq > 1)
            again = flash_attn_with_kvcache(**pr, causal=Sq > 1, return_softmax_lse=True)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), f"narrow={narrow} tma={tma}"


@needs_cuda
def test_cuda_unaligned_q():
    """q whose rows are not 16-byte aligned (odd strides, an odd base offset): the decode kernel reads q in
    16-byte chunks, so such q go through an aligned copy first."""
    for page in (None, 16):
        pr = make_problem("cuda", B=2, Sq=3, H=8, Hk=2, D=64, Sk=500, page=page, new=1, seed=7)
        q = pr["q"]
        padded = torch.zeros(*q.shape[:-1], 65, dtype=q.dtype, device="cuda")
        padded[..., :64] = q
        pr["q"] = padded[..., :64]  # row and head strides of 65 elements
        run_and_check(pr, causal=True)
        flat = torch.zeros(q.numel() + 1, dtype=q.dtype, device="cuda")
        flat[1:] = q.flatten()
        pr["q"] = flat[1:].view(q.shape)  # base 2 bytes past an aligned address
        run_and_check(pr, num_splits=2)


# (B, Sq, H, Hk, Sk, page, window, alibi): GQA groups of 4 / 4 / 1 / 2 query heads, one and several row tiles
GROUPS = [(2, 1, 32, 8, 3000, None, (-1, -1), False), (3, 5, 16, 4, 777, 48, (100, 0), True),
          (2, 5, 8, 8, 300, 16, (-1, 0), False), (1, 9, 4, 2, 2000, None, (-1, -1), True)]


@needs_cuda
@pytest.mark.parametrize("case", GROUPS, ids=[f"B{c[0]}-Sq{c[1]}-H{c[2]}-Hk{c[3]}" for c in GROUPS])
def test_cuda_groups_and_splits(case):
    B, Sq, H, Hk, Sk, page, window, alibi = case
    pr = make_problem("cuda", B=B, Sq=Sq, H=H, Hk=Hk, D=128, Sk=Sk, page=page, new=1, rotary_fraction=0.5,
                      leftpad=True, seed=Sk)
    slopes = torch.rand(B, H, device="cuda") * 0.1 if alibi else None
    for splits in (0, 1, 5):
        run_and_check(pr, window=window, alibi=slopes, num_splits=splits)


@needs_cuda
@pytest.mark.parametrize("D", [40, 72, 120])
def test_cuda_head_dims_between_kernels(D):
    """A head dim below its kernel's: the K / V chunks past it are zero-filled (the lanes that copy them)."""
    for page in (None, 16):
        pr = make_problem("cuda", B=2, Sq=1, H=8, Hk=2, D=D, Sk=300, page=page, new=1, leftpad=True, seed=D)
        run_and_check(pr, num_splits=3)


@needs_cuda
@pytest.mark.parametrize("D", [32, 64, 96, 128, 192, 256])
def test_cuda_every_kernel_head_dim(D):
    """Each built decode kernel at its own head dim (rows copied in power-of-two segments of chunks; 96 and 192
    take two), with left padding off a multiple of 16 (blocks that span two pages) and sequence ends inside a
    block."""
    if D not in _ops.build_info().get("head_dims", []):
        pytest.skip(f"head dim {D} not built")
    for page in (None, 16, 48):
        pr = make_problem("cuda", B=3, Sq=1, H=8, Hk=2, D=D, Sk=333, page=page, new=1, seed=D)
        pad = torch.tensor([5, 0, 17], dtype=torch.int32, device="cuda")
        pr["cache_leftpad"] = torch.minimum(pad, pr["cache_seqlens"])
        run_and_check(pr, num_splits=2)


@needs_cuda
def test_cuda_graph_capture_matches_eager():
    pr = make_problem("cuda", B=2, Sq=1, Sk=3000, page=16, new=1, rotary_fraction=0.5)
    k0, v0 = pr["k_cache"].clone(), pr["v_cache"].clone()

    def restore():
        pr["k_cache"].copy_(k0)
        pr["v_cache"].copy_(v0)

    eager = flash_attn_with_kvcache(**pr, causal=True)
    k_after = pr["k_cache"].clone()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        restore()
        flash_attn_with_kvcache(**pr, causal=True)
        restore()
        with torch.cuda.graph(graph, stream=stream):
            out = flash_attn_with_kvcache(**pr, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    restore()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert torch.equal(pr["k_cache"], k_after)


@needs_cuda
def test_cuda_unchecked_bad_indices_stay_in_bounds():
    pr = make_problem("cuda", page=16, new=1, Sk=40)
    table, seqlens = pr["block_table"].clone(), pr["cache_seqlens"].clone()
    table[1, 0], table[0, 0], seqlens[0] = 10 ** 6, -5, 10 ** 6
    out = flash_attn_with_kvcache(**{**pr, "block_table": table, "cache_seqlens": seqlens}, check_indices=False)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    run_and_check(make_problem("cuda", page=16, new=1, Sk=40, seed=1))  # the context is still healthy


@needs_cuda
def test_cuda_float32_is_not_supported():
    pr = make_problem("cuda", dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="float16 and bfloat16"):
        flash_attn_with_kvcache(**pr)


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------------


def bad_call(pr, error, match, **overrides):
    args = {**pr, **overrides}
    args = {key: value for key, value in args.items() if value is not None}
    with pytest.raises(error, match=match):
        flash_attn_with_kvcache(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_block_table(device):
    pr = make_problem(device, page=16, new=1, Sk=40)
    table = pr["block_table"]
    bad_call(pr, TypeError, "block_table must be int32", block_table=table.long())
    bad_call(pr, ValueError, "block_table must have shape", block_table=table[:1])
    bad_call(pr, ValueError, "block_table must have shape", block_table=table[0])
    broken = table.clone()
    broken[1, 0] = 1000
    bad_call(pr, ValueError, r"block_table\[1, 0\] = 1000", block_table=broken)
    broken[1, 0] = -1
    bad_call(pr, ValueError, r"block_table\[1, 0\] = -1", block_table=broken)
    bad_call(pr, ValueError, "page_size", k_cache=pr["k_cache"][:, :8], v_cache=pr["v_cache"][:, :8])
    bad_call(pr, ValueError, "cache_batch_idx cannot be combined with block_table",
             cache_batch_idx=torch.zeros(2, dtype=torch.int32, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_seqlens_and_indices(device):
    pr = make_problem(device, new=1, Sk=40, batch_idx=True)
    seqlens = pr["cache_seqlens"]
    bad_call(pr, ValueError, r"cache_seqlens\[1\] = 41 is out of range", cache_seqlens=seqlens + 1)
    bad_call(pr, ValueError, r"cache_seqlens\[0\] = -1", cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32, device=device))
    bad_call(pr, TypeError, "cache_seqlens must be int32", cache_seqlens=seqlens.long())
    bad_call(pr, ValueError, r"cache_seqlens must have shape \(batch,\)", cache_seqlens=seqlens[:1])
    bad_call(pr, TypeError, "cache_seqlens must be an int", cache_seqlens=3.5)
    bad_call(pr, ValueError, r"cache_leftpad\[\d\] = \d+ is out of range", cache_leftpad=seqlens + 1)
    bad_call(pr, ValueError, r"cache_batch_idx\[0\] = 4", cache_batch_idx=torch.tensor([4, 0], dtype=torch.int32, device=device))
    bad_call(pr, ValueError, "cache_seqlens is required", cache_seqlens=None)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_shapes_and_dtypes(device):
    pr = make_problem(device, new=1, Sk=40, rotary_fraction=0.5)
    bad_call(pr, ValueError, "k and v must be given together", v=None)
    bad_call(pr, ValueError, "rotary_cos and rotary_sin must be given together", rotary_sin=None)
    bad_call(pr, TypeError, "rotary_cos must have the dtype of q", rotary_cos=pr["rotary_cos"].float())
    bad_call(pr, ValueError, "rotary_cos has 40 rows", rotary_cos=pr["rotary_cos"][:40], rotary_sin=pr["rotary_sin"][:40])
    wide = torch.zeros(41, 40, dtype=pr["q"].dtype, device=device)
    bad_call(pr, ValueError, "rotary_dim", rotary_cos=wide, rotary_sin=wide)
    bad_call(pr, TypeError, "k_cache must have the dtype of q", k_cache=pr["k_cache"].half())
    bad_call(pr, ValueError, "v_cache must have the shape of k_cache", v_cache=pr["v_cache"][:, :-1])
    bad_call(pr, ValueError, "k_cache must have a unit-stride last dimension",
             k_cache=pr["k_cache"].transpose(2, 3).contiguous().transpose(2, 3))
    bad_call(pr, ValueError, "q must be 4-D", q=pr["q"][0])
    bad_call(pr, ValueError, "k_cache must have the head_dim of q", q=pr["q"][..., :32])
    bad_call(pr, ValueError, "num_heads", q=pr["q"][:, :, :3])
    bad_call(pr, ValueError, r"k must have shape \(batch, seqlen_new", k=pr["k"][:, :, :1], v=pr["v"][:, :, :1])
    bad_call(pr, ValueError, "seqlen_new", k=pr["k"].expand(-1, 500, -1, -1), v=pr["v"].expand(-1, 500, -1, -1))
    bad_call(pr, ValueError, "num_splits", num_splits=-1)
    bad_call(pr, ValueError, "window_size must be a pair", window_size=3)
    bad_call(pr, TypeError, "alibi_slopes must be float32", alibi_slopes=torch.ones(8, device=device).half())


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA build and device")
def test_cuda_mixed_devices():
    pr = make_problem("cuda", new=1, Sk=40)
    bad_call(pr, ValueError, "cache_seqlens is on cpu", cache_seqlens=pr["cache_seqlens"].cpu())
    bad_call(pr, ValueError, "k_cache is on cpu", k_cache=pr["k_cache"].cpu())


def test_bad_combine():
    with pytest.raises(TypeError, match="out_partial must be float32"):
        flash_attn_combine(torch.randn(2, 1, 3, 2, 8).half(), torch.randn(2, 1, 3, 2))
    with pytest.raises(ValueError, match="lse_partial must have shape"):
        flash_attn_combine(torch.randn(2, 1, 3, 2, 8), torch.randn(2, 1, 2, 3))
    with pytest.raises(ValueError, match="out_partial must be 5-D"):
        flash_attn_combine(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="num_splits"):
        flash_attn_combine(torch.randn(0, 1, 3, 2, 8), torch.randn(0, 1, 3, 2))
