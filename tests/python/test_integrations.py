"""Real models as tests: a 2-layer Llama (GQA) via transformers, a UNet2DConditionModel, a small DiT
and a VAE via diffusers, all built from configs with random weights (nothing downloaded).

With our attention enabled, outputs follow FlashAttention's rule against fp32 (default attention):
max|ours_low - ref_fp32| <= 2 x max|default_low - ref_fp32| (+1e-5), and the routing counters prove
that every attention call ran on our kernels. On the GPU (device run) the same tests run in CUDA."""

import logging

import pytest
import torch

from flash_attention import _ops
from flash_attention.integrations import fallback_calls, kernel_calls, reset_stats, stats

pytestmark = pytest.mark.skipif(not _ops.LOADED, reason=f"op library not loaded: {_ops.LOAD_ERROR}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.bfloat16]
DT = torch.float32 if DEVICE == "cpu" else torch.float16   # what our kernels serve on DEVICE
OURS = f"flash_attention[{DEVICE}]"


@pytest.fixture(autouse=True)
def _fresh_stats():
    reset_stats()
    torch.manual_seed(0)


def _rule(ours, low, ref, extra=1e-5):
    err = (ours.float() - ref.float()).abs().max().item()
    bound = 2 * (low.float() - ref.float()).abs().max().item() + extra
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} (2x torch's low-precision error)"


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf():
    pytest.importorskip("transformers")
    import flash_attention.integrations.transformers as fa_transformers

    return fa_transformers


def _llama(cls_name="LlamaForCausalLM", **overrides):
    import transformers

    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    config = config_cls(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        **overrides)
    return getattr(transformers, cls_name)(config).to(DEVICE).eval()


def _logits(model, implementation, dtype, ids, mask=None):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model.to(dtype)(ids, attention_mask=mask).logits.float()


def _padded_batch():
    ids = torch.randint(0, 256, (3, 40), device=DEVICE)
    mask = torch.ones(3, 40, dtype=torch.long, device=DEVICE)
    mask[1, :13] = 0    # left padding
    mask[2, 31:] = 0    # right padding
    return ids, mask


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_llama_gqa_logits_follow_rule(tf, dtype, padded):
    model = _llama()
    ids, mask = _padded_batch()
    mask = mask if padded else None
    ref = _logits(model, "sdpa", torch.float32, ids, mask)
    low = _logits(model, "sdpa", dtype, ids, mask)
    reset_stats()
    ours = _logits(model, tf.NAME, dtype, ids, mask)
    valid = mask.bool() if padded else torch.ones_like(ids, dtype=torch.bool)
    _rule(ours[valid], low[valid], ref[valid])
    assert stats() == {"transformers": {OURS: 2}}   # 2 layers, each one call (varlen when padded)


def test_llama_generate_decode_steps_follow_rule(tf):
    """generate() with a KV cache and left padding (prefill, then q_len 1 over longer keys)."""
    model = _llama()
    ids, mask = _padded_batch()
    ids, mask = ids[:, :24], mask[:, :24]
    mask[2] = 1   # generate() expects left padding
    model.set_attn_implementation(tf.NAME)
    with torch.no_grad():
        gen = model.to(DT).generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
    assert kernel_calls("transformers") == 2 * 6 and fallback_calls("transformers") == 0
    ours = torch.stack(gen.logits, 1).float()
    full = gen.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones_like(full[:, 24:])], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)

    def replay(dtype):   # one forward over the whole sequence with the default attention
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            logits = model.to(dtype)(full, attention_mask=full_mask, position_ids=positions).logits
        return logits[:, 23:].float()
    _rule(ours, replay(DT), replay(torch.float32))


def test_from_pretrained_with_attn_implementation(tf, tmp_path, caplog):
    import transformers

    _llama().save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="flash_attention"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, attn_implementation="flash_attention", dtype=DT)
        model.to(DEVICE)(torch.randint(0, 256, (1, 9), device=DEVICE))
    assert model.config._attn_implementation == "flash_attention"
    assert kernel_calls("transformers") == 2
    assert "runs on flash_attention" in caplog.text


def test_enable_disable(tf):
    model = _llama()
    previous = tf.enable(model)
    assert model.config._attn_implementation == tf.NAME
    tf.disable(model, previous)
    assert model.config._attn_implementation == previous


def test_sliding_window_mistral(tf):
    model = _llama("MistralForCausalLM", sliding_window=7)
    ids = torch.randint(0, 256, (2, 30), device=DEVICE)
    ref = _logits(model, "sdpa", torch.float32, ids)
    low = _logits(model, "sdpa", DT, ids)
    reset_stats()
    _rule(_logits(model, tf.NAME, DT, ids), low, ref)
    assert kernel_calls("transformers") == 2 and fallback_calls("transformers") == 0


def test_packed_sequences_via_position_ids(tf):
    model = _llama()
    a, b = torch.randint(0, 256, (1, 11), device=DEVICE), torch.randint(0, 256, (1, 17), device=DEVICE)
    positions = torch.cat([torch.arange(11), torch.arange(17)]).to(DEVICE)[None]

    def separate(dtype):
        return torch.cat([_logits(model, "sdpa", dtype, a), _logits(model, "sdpa", dtype, b)], 1)
    ref, low = separate(torch.float32), separate(DT)
    model.set_attn_implementation(tf.NAME)
    reset_stats()
    with torch.no_grad():
        packed = model.to(DT)(torch.cat([a, b], 1), position_ids=positions).logits
    _rule(packed, low, ref)
    assert kernel_calls("transformers") == 2


def test_custom_4d_mask_falls_back_with_reason(tf, caplog):
    model = _llama()
    ids = torch.randint(0, 256, (1, 12), device=DEVICE)
    mask4d = torch.ones(1, 1, 12, 12, dtype=torch.bool, device=DEVICE).tril()
    mask4d[..., 5:, :3] = False
    with torch.no_grad():
        expected = _logits(model, "sdpa", torch.float32, ids, mask4d)
        with caplog.at_level(logging.INFO, logger="flash_attention"):
            actual = _logits(model, tf.NAME, torch.float32, ids, mask4d)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert kernel_calls("transformers") == 0 and fallback_calls("transformers") == 2
    assert "4-D attention mask" in caplog.text


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fad():
    pytest.importorskip("diffusers")
    import flash_attention.integrations.diffusers as fa_diffusers

    return fa_diffusers


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
        attention_head_dim=(1, 2), norm_num_groups=8).to(DEVICE).eval()


def _dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, norm_num_groups=8).to(DEVICE).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(16, 32), sample_size=16).to(DEVICE).eval()


def _unet_call(model, dtype):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 48, generator=g)
    t = torch.tensor([10, 500], device=DEVICE)
    return model.to(dtype)(x.to(DEVICE, dtype), t, ctx.to(DEVICE, dtype)).sample


def _dit_call(model, dtype):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    t, labels = torch.tensor([10, 500], device=DEVICE), torch.tensor([1, 3], device=DEVICE)
    return model.to(dtype)(x, timestep=t, class_labels=labels).sample


def _vae_call(model, dtype):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    return model.to(dtype)(x).sample


MODELS = {"unet": (_unet, _unet_call, 8), "dit": (_dit, _dit_call, 2), "vae": (_vae, _vae_call, 2)}


@pytest.mark.parametrize("dtype", LOW_DTYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_diffusers_model_follows_rule(fad, name, dtype):
    build, call, n_attention = MODELS[name]
    model = build()
    with torch.no_grad():
        ref = call(model, torch.float32)
        low = call(model, dtype)
        assert fad.enable(model) == n_attention
        reset_stats()
        ours = call(model, dtype)
    _rule(ours, low, ref)
    assert stats() == {"diffusers": {OURS: n_attention}}


def test_diffusers_disable_restores_processors(fad):
    model = _unet()
    before = {name: type(p) for name, p in model.attn_processors.items()}
    with torch.no_grad():
        expected = _unet_call(model, torch.float32)
        fad.enable(model)
        assert all(isinstance(p, fad.FlashAttnProcessor) for p in model.attn_processors.values())
        torch.testing.assert_close(_unet_call(model, torch.float32), expected, atol=1e-4, rtol=1e-4)
        assert fad.disable(model) == 8
        assert {name: type(p) for name, p in model.attn_processors.items()} == before
        torch.testing.assert_close(_unet_call(model, torch.float32), expected)


def test_diffusers_enable_on_a_pipeline(fad):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=_dit(), vae=_vae(), scheduler=DDIMScheduler()).to(DEVICE, DT)
    assert fad.enable(pipe) == 4
    assert fad.enable(pipe) == 4   # idempotent
    with torch.no_grad():
        pipe(class_labels=[1], num_inference_steps=2, output_type="pt")
    assert kernel_calls("diffusers") > 0 and fallback_calls("diffusers") == 0
    assert fad.disable(pipe) == 4


def test_diffusers_mask_falls_back_with_reason(fad, caplog):
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=64, heads=2, dim_head=32).to(DEVICE).eval()
    x = torch.randn(2, 10, 64, device=DEVICE)
    mask = torch.zeros(2, 1, 10, device=DEVICE)
    mask[0, :, 7:] = -10000.0
    with torch.no_grad():
        expected = attn(x, attention_mask=mask)
        fad.enable(attn)
        with caplog.at_level(logging.INFO, logger="flash_attention"):
            actual = attn(x, attention_mask=mask)
    torch.testing.assert_close(actual, expected)
    assert fallback_calls("diffusers") == 1 and "attention_mask" in caplog.text


def test_diffusers_enable_rejects_other_objects(fad):
    with pytest.raises(TypeError, match="pipeline or a torch.nn.Module"):
        fad.enable(42)


# ---------------------------------------------------------------------------------------------
# python -m flash_attention bench
# ---------------------------------------------------------------------------------------------


def test_bench_cli_writes_table_csv_and_plot(tmp_path, capsys):
    import csv

    from flash_attention import bench

    pytest.importorskip("matplotlib")
    out_csv, out_png = tmp_path / "r.csv", tmp_path / "r.png"
    assert bench.main(["--device", DEVICE, "--dtype", "bf16" if DEVICE == "cuda" else "fp32",
                       "--seqlen", "64", "--hdim", "32", "--mode", "fwd,fwdbwd,decode", "--batch", "2",
                       "--nheads", "4", "--nheads-kv", "2", "--causal", "both",
                       "--impl", "flash_attention,sdpa-math", "--csv", str(out_csv),
                       "--plot", str(out_png), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ours/best" in printed and "TFLOP/s" in printed
    rows = list(csv.DictReader(open(out_csv)))
    assert list(rows[0]) == bench.CSV_COLUMNS
    assert len(rows) == 2 * (2 + 2 + 1)   # impls x (fwd causal/not, fwdbwd causal/not, decode)
    assert all(float(r["ms"]) > 0 for r in rows if r["impl"] == "flash_attention")
    assert out_png.stat().st_size > 10_000


@pytest.mark.parametrize("argv,match", [
    (["--mode", "train"], "--mode"), (["--dtype", "fp8"], "--dtype"), (["--hdim", "0"], "--hdim"),
    (["--seqlen", "x"], "--seqlen"), (["--causal", "maybe"], "--causal"), (["--batch", "-1"], "--batch"),
    (["--impl", "xformers"], "--impl"),
])
def test_bench_cli_rejects_bad_arguments(argv, match, capsys):
    from flash_attention import bench

    with pytest.raises(SystemExit):
        bench.main(argv)
    assert match in capsys.readouterr().err
