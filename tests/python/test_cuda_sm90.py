"""The Hopper (sm90a: wgmma + TMA) forward path, forced with forward(config="sm90:..."): every built
tile against the fp32 math reference with FlashAttention's rule (2x the error of torch in low
precision), LSE included; outputs fully written; calls the path declines (alibi, dropout, fp32,
unaligned strides) raise with a reason under an explicit sm90 config and still run under auto.
Skipped unless the GPU is sm90 and the op library was built with 90a."""

import pytest
import torch

import flash_attention as fa
from _util import assert_fa_close, max_err, poison_, qkv, ref, skip_unless_dtype_built, varlen_qkv

pytestmark = pytest.mark.gpu
OPS = torch.ops.flash_attention

# Mirrors src/cuda/sm90/tiles.h: kernel head dim -> (dense tile, causal/local tile).
SM90_TILES = {
    64: ("sm90:m128n224w12s2", "sm90:m128n128w12s2"),
    96: ("sm90:m128n128w12s2",),
    128: ("sm90:m128n128w12s2",),
    192: ("sm90:m128n112w12s2",),
    256: ("sm90:m128n80w12s2",),
}


@pytest.fixture(autouse=True)
def needs_sm90():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm90 (Hopper) GPU")
    info = fa.build_info()
    if not info["cuda_built"] or 90 not in info["archs"]:
        pytest.skip("the op library was built without the sm90 path (FLASH_ATTENTION_CUDA_ARCHS without 90a)")


def kernel_head_dim(d):
    built = fa.build_info()["head_dims"]
    fits = [k for k in SM90_TILES if k >= d and k in built]
    if not fits:
        pytest.skip(f"no sm90 kernel built for head dim {d}")
    return min(fits)


def run(q, k, v, config, *varlen, causal=False, window=(-1, -1), softcap=0.0, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if varlen:
        cu_q, cu_k, max_q, max_k = varlen
    else:
        cu_q, cu_k, max_q, max_k = None, None, q.shape[1], k.shape[1]
    out, lse, _ = OPS.fwd(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, scale, causal, window[0], window[1],
                          softcap, None, config)
    return out, lse


def check(q, k, v, config, *varlen, **options):
    poison_(torch.empty(q.shape, dtype=q.dtype, device=q.device))  # a NaN block for the next output
    out, lse = run(q, k, v, config, *varlen, **options)
    ref_options = dict(causal=options.get("causal", False), window_size=options.get("window", (-1, -1)),
                       softcap=options.get("softcap", 0.0), softmax_scale=options.get("scale"))
    expected, expected_lse = ref(q, k, v, *varlen, **ref_options)
    lowp, _ = ref(q, k, v, *varlen, upcast=False, **ref_options)
    assert_fa_close(out, expected, lowp)
    assert max_err(lse, expected_lse) < 2e-3


# (batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, options)
CASES = [
    (2, 128, 128, 8, 8, 128, dict()),
    (2, 1000, 1000, 4, 4, 128, dict()),                               # ragged tails
    (2, 513, 1037, 8, 2, 128, dict(causal=True)),                      # GQA, seqlen_k > seqlen_q
    (1, 1037, 513, 4, 1, 64, dict(causal=True)),                       # rows with no visible key
    (2, 700, 700, 4, 4, 128, dict(window=(100, 0))),
    (2, 300, 400, 4, 4, 64, dict(window=(64, 32))),
    (2, 257, 257, 4, 2, 64, dict(softcap=30.0)),
    (3, 1, 333, 8, 1, 128, dict(causal=True)),                         # decode-like
    (2, 200, 300, 4, 4, 80, dict()),                                   # head dim padded to 96/128
    (1, 300, 300, 2, 2, 96, dict(causal=True)),
    (1, 300, 300, 2, 2, 192, dict()),
    (1, 300, 300, 2, 2, 256, dict(causal=True)),
    # head dim 64 (with a 192-row tile the last query block of 1000 rows has 40, of 1037 / 257 / 300 rows
    # 77 / 65 / 108: one or two consumer warpgroups without rows)
    (2, 1000, 1000, 4, 4, 64, dict()),
    (2, 1000, 1000, 4, 2, 64, dict(causal=True)),
    (2, 513, 1037, 8, 2, 64, dict(causal=True)),
    (2, 2048, 2048, 16, 4, 64, dict(causal=True)),                    # many tiles per CTA
    (2, 2048, 2048, 16, 16, 64, dict()),
    (2, 200, 300, 4, 4, 48, dict()),                                   # head dim padded to 64
    (1, 333, 333, 4, 4, 56, dict(causal=True)),
    (2, 500, 700, 4, 4, 64, dict(window=(200, 0))),
    (3, 1, 333, 8, 1, 64, dict(causal=True)),                          # decode-like
]


def case_id(c):
    return "-".join(map(str, c[:6])) + "".join(f"-{k}{v}" for k, v in sorted(c[6].items()))


@pytest.mark.parametrize("tile", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sm90_matches_reference(case, dtype, tile):
    b, sq, sk, h, hk, d, options = case
    tiles = SM90_TILES[kernel_head_dim(d)]
    if tile >= len(tiles):
        pytest.skip("head dim has one tile")
    skip_unless_dtype_built(dtype)
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=dtype, device="cuda")
    check(q, k, v, tiles[tile], **options)


# FLASH_ATTENTION_SM90_FWD=31: every causal / local / varlen call takes its tiles from the counter.
@pytest.mark.parametrize("case", [c for c in CASES if c[6].get("causal") or "window" in c[6]], ids=case_id)
def test_sm90_dynamic_schedule_matches_reference(case, monkeypatch):
    monkeypatch.setenv("FLASH_ATTENTION_SM90_FWD", "31")
    b, sq, sk, h, hk, d, options = case
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=torch.bfloat16, device="cuda")
    check(q, k, v, SM90_TILES[kernel_head_dim(d)][-1], **options)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_sm90_dynamic_schedule_many_tiles_and_varlen(d, monkeypatch):
    monkeypatch.setenv("FLASH_ATTENTION_SM90_FWD", "31")
    tiles = SM90_TILES[kernel_head_dim(d)]
    q, k, v = qkv(2, 2048, 2048, 16, 4, d, dtype=torch.bfloat16, device="cuda")  # many tiles per CTA
    check(q, k, v, tiles[-1], causal=True)
    q, k, v, *varlen = varlen_qkv([100, 0, 37, 256, 1300], [80, 12, 0, 300, 1129], 8, 2, d,
                                  dtype=torch.bfloat16, device="cuda")
    check(q, k, v, tiles[0], *varlen, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_sm90_varlen_matches_reference(causal):
    config = SM90_TILES[kernel_head_dim(128)][-1 if causal else 0]
    q, k, v, *varlen = varlen_qkv([100, 0, 37, 256, 300], [80, 12, 0, 300, 129], 8, 2, 128,
                                  dtype=torch.bfloat16, device="cuda")
    check(q, k, v, config, *varlen, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_sm90_varlen_hdim64_every_tile(causal):
    q, k, v, *varlen = varlen_qkv([100, 0, 37, 256, 300, 1000], [80, 12, 0, 300, 129, 1000], 8, 2, 64,
                                  dtype=torch.bfloat16, device="cuda")
    for config in SM90_TILES[kernel_head_dim(64)]:
        check(q, k, v, config, *varlen, causal=causal)


def test_sm90_strided_inputs():
    config = SM90_TILES[kernel_head_dim(128)][0]
    skip_unless_dtype_built(torch.float16)
    qkv_packed = torch.randn(2, 333, 3, 4, 128, dtype=torch.float16, device="cuda")
    q, k, v = qkv_packed.unbind(2)                                     # row stride 3 * 4 * 128
    check(q, k, v, config)


def test_sm90_auto_matches_explicit():
    config = SM90_TILES[kernel_head_dim(128)][-1]                     # skips when no kernel serves 128
    q, k, v = qkv(2, 512, 512, 4, 4, 128, dtype=torch.bfloat16, device="cuda")
    auto, _ = run(q, k, v, "", causal=True)
    explicit, _ = run(q, k, v, config, causal=True)
    assert torch.equal(auto, explicit)


# hdim 64, tiles.h: dense calls above 2k keys and causal ones above 4k take N = 224, the others N = 128.
@pytest.mark.parametrize("sk,causal,tile", [(2048, False, 1), (2100, False, 0), (4096, True, 1), (4200, True, 0)])
def test_sm90_auto_tile_by_key_count(sk, causal, tile):
    if kernel_head_dim(64) != 64:
        pytest.skip("no hdim-64 sm90 kernel built")
    q, k, v = qkv(1, 256, sk, 2, 2, 64, dtype=torch.bfloat16, device="cuda")
    auto, _ = run(q, k, v, "", causal=causal)
    explicit, _ = run(q, k, v, SM90_TILES[64][tile], causal=causal)
    assert torch.equal(auto, explicit)


@pytest.mark.parametrize("d", [64, 128, 256])  # O staged in its own buffer (N = 128 tiles) or in V (N = 80)
def test_sm90_register_epilogue_matches_tma_store(d, monkeypatch):
    """FLASH_ATTENTION_SM90_FWD=22 (the default without kFwdTmaStoreO) stores O from registers instead of
    through TMA: the same bytes as the default."""
    if kernel_head_dim(d) != d:
        pytest.skip(f"no sm90 kernel built for head dim {d}")
    q, k, v = qkv(2, 300, 300, 4, 4, d, dtype=torch.bfloat16, device="cuda")
    for config in SM90_TILES[d]:
        monkeypatch.delenv("FLASH_ATTENTION_SM90_FWD", raising=False)
        tma, tma_lse = run(q, k, v, config)
        monkeypatch.setenv("FLASH_ATTENTION_SM90_FWD", "22")
        registers, registers_lse = run(q, k, v, config)
        assert torch.equal(tma, registers) and torch.equal(tma_lse, registers_lse), config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
# lazy rescale + skipped O rescales (the default) / skips alone / lazy alone / the max moves at every growth
@pytest.mark.parametrize("features", ["19", "17", "3", "1"])
def test_sm90_lazy_rescale_with_growing_scores(d, dtype, features, monkeypatch):
    """Key norms that grow along the sequence (and a few large keys) move the row maxima by a few units at
    a time, in both walk directions: under kFwdLazyRescale P reaches up to 2^8 between moves; under
    kFwdSkipRescale (hdim 256 kernels) warps whose rows did not move skip the O rescale. Every setting keeps
    FlashAttention's rule, causal and not."""
    d_kernel = kernel_head_dim(d)
    skip_unless_dtype_built(dtype)
    monkeypatch.setenv("FLASH_ATTENTION_SM90_FWD", features)
    q, k, v = qkv(2, 777, 777, 4, 2, d, dtype=dtype, device="cuda")
    ramp = torch.linspace(0.2, 3.0, k.shape[1], device="cuda", dtype=torch.float32)
    k = (k.float() * ramp[None, :, None, None]).to(dtype)
    k[:, ::97] *= 4
    for causal in (False, True):
        check(q, k, v, SM90_TILES[d_kernel][-1 if causal else 0], causal=causal)


@pytest.mark.parametrize("what", ["alibi", "dropout", "unaligned"])
def test_sm90_declines_with_reason(what):
    config = SM90_TILES[kernel_head_dim(64)][0]
    q, k, v = qkv(1, 64, 64, 2, 2, 64, dtype=torch.float16, device="cuda")
    args = [q, k, v, None, None, 64, 64, 0.0, 0.125, False, -1, -1, 0.0, None]
    if what == "alibi":
        args[13] = torch.rand(2, device="cuda")
    elif what == "dropout":
        args[7] = 0.1
    else:
        base = torch.randn(1, 64, 2, 68, dtype=torch.float16, device="cuda")
        args[0] = base[..., 2:66]                                      # 4-byte aligned only
    with pytest.raises((ValueError, RuntimeError), match="sm90"):
        OPS.fwd(*args, config)
    try:
        OPS.fwd(*args, "")                                             # auto: the sm80 path serves it
    except NotImplementedError as error:
        pytest.xfail(f"sm80 path cannot serve it either: {error}")


def test_sm90_config_not_built_raises():
    q, k, v = qkv(1, 64, 64, 2, 2, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="config"):
        fa.forward(q, k, v, config="sm90:m64n16w8s5")
