"""Backend choice: backend=, use_backend(), $FLASH_ATTENTION_BACKEND, auto's order and its logging,
explicit backends that cannot serve a call, and each fallback's numerics against the reference."""

import logging

import pytest
import torch

import flash_attention as fa
from flash_attention import _ops, backends
from _util import max_err, qkv, ref, varlen_qkv


@pytest.fixture
def ran(monkeypatch):
    """Records the name of every backend that runs a call."""
    names = []
    for name, backend in backends.BACKENDS.items():
        original = type(backend).run

        def spy(self, call, _original=original, _name=name):
            names.append(_name)
            return _original(self, call)

        monkeypatch.setattr(type(backend), "run", spy)
    return names


@pytest.fixture
def no_library(monkeypatch):
    """Pretend the op library could not be loaded."""
    monkeypatch.setattr(_ops, "LOADED", False)
    monkeypatch.setattr(_ops, "LOAD_ERROR", "op library not found (test)")


def test_auto_picks_cpu_for_cpu_tensors(ran):
    fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
    assert ran == ["cpu"]


def test_env_var_selects_backend(monkeypatch, ran):
    monkeypatch.setenv("FLASH_ATTENTION_BACKEND", "math")
    fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
    assert ran == ["math"]


def test_context_manager_selects_backend_and_restores(ran):
    with fa.use_backend("sdpa"):
        fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
        with fa.use_backend("math"):
            fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
        fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
    fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
    assert ran == ["sdpa", "math", "sdpa", "cpu"]


def test_precedence_argument_then_context_then_env(monkeypatch, ran):
    monkeypatch.setenv("FLASH_ATTENTION_BACKEND", "sdpa")
    with fa.use_backend("math"):
        fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16), backend="cpu")
        fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
    fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16))
    assert ran == ["cpu", "math", "sdpa"]


def test_explicit_backend_that_cannot_serve_raises_with_reason():
    q, k, v = qkv(1, 8, 8, 2, 2, 16)
    with pytest.raises(ValueError, match="backend='cuda'.*cpu"):
        fa.flash_attn_func(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="backend='sdpa'.*softcap"):
        fa.flash_attn_func(q, k, v, softcap=3.0, backend="sdpa")
    with fa.use_backend("sdpa"), pytest.raises(ValueError, match="varlen"):
        fa.flash_attn_varlen_func(*varlen_qkv([3, 4], [3, 4], 2, 2, 16))


def test_auto_logs_once_per_reason(caplog):
    caplog.set_level(logging.INFO, logger="flash_attention")
    q, k, v = qkv(1, 8, 8, 2, 2, 16)
    for _ in range(3):
        fa.flash_attn_func(q, k, v)
    records = [r for r in caplog.records if "auto backend" in r.getMessage()]
    assert len(records) == 1
    assert "-> cpu" in records[0].getMessage() and "q is on cpu" in records[0].getMessage()


def test_auto_logs_again_for_a_new_reason(caplog, no_library):
    caplog.set_level(logging.INFO, logger="flash_attention")
    q, k, v = qkv(1, 8, 8, 2, 2, 16)
    fa.flash_attn_func(q, k, v)
    fa.flash_attn_func(q, k, v)
    fa.flash_attn_func(q, k, v, softcap=2.0)
    messages = [r.getMessage() for r in caplog.records if "auto backend" in r.getMessage()]
    assert len(messages) == 2
    assert "-> sdpa" in messages[0] and "-> math" in messages[1] and "softcap" in messages[1]


def test_auto_never_picks_sdpa_for_options_it_cannot_honour(no_library, ran):
    q, k, v = qkv(1, 8, 8, 2, 2, 16)
    fa.flash_attn_func(q, k, v, causal=True)
    fa.flash_attn_func(q, k, v, softcap=1.0)
    fa.flash_attn_func(q, k, v, return_attn_probs=True)
    fa.flash_attn_func(*qkv(1, 9, 4, 2, 2, 16), causal=True)        # rows with no visible key
    fa.flash_attn_varlen_func(*varlen_qkv([3, 4], [3, 4], 2, 2, 16))
    assert ran == ["sdpa", "math", "math", "math", "math"]


def test_math_without_library_cannot_do_dropout(no_library, ran):
    fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16), dropout_p=0.1)      # SDPA's own dropout
    assert ran == ["sdpa"]
    with pytest.raises(ValueError, match="no backend can serve.*math: dropout needs"):
        fa.flash_attn_func(*qkv(1, 8, 8, 2, 2, 16), dropout_p=0.1, softcap=1.0)


def test_unsupported_reasons_lists_every_backend():
    call = backends.Call(*qkv(1, 8, 8, 2, 2, 16), softcap=1.0)
    reasons = backends.unsupported_reasons(call)
    assert list(reasons) == ["cuda", "cpu", "sdpa", "math"]
    assert reasons["cpu"] is None and reasons["math"] is None
    assert "cpu" in reasons["cuda"] and "softcap" in reasons["sdpa"]


def test_cuda_query_reports_cpu_only_build():
    if fa.build_info()["cuda_built"]:
        pytest.skip("this build has CUDA kernels")
    key = (0, torch.float16, 1, 128, 128, 8, 8, 64, False, 0.0, True, -1, -1, 0.0, 0, "")
    assert "without CUDA" in _ops.cuda_unsupported_reason(key)


SDPA_CASES = [
    dict(),
    dict(causal=True),                                   # Sq == Sk: is_causal
    dict(causal=True, shape=(1, 7, 12)),                 # Sq < Sk: bottom-right via a mask
    dict(window_size=(3, 1)),
    dict(alibi=True, causal=True),
    dict(heads_k=1),                                     # GQA via enable_gqa
    dict(softmax_scale=0.2),
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=lambda c: "-".join(sorted(c)) or "plain")
@pytest.mark.parametrize("name", ["sdpa", "math"])
def test_fallback_backends_match_reference(name, case):
    options = dict(case)
    b, sq, sk = options.pop("shape", (2, 10, 10))
    hk = options.pop("heads_k", 4)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(4)
    q, k, v = qkv(b, sq, sk, 4, hk, 16, grad=True)
    out = fa.flash_attn_func(q, k, v, backend=name, **options)
    expected, _ = ref(q, k, v, **options)
    assert max_err(out, expected) < 1e-5
    out.sum().backward()
    expected_grad = torch.autograd.grad(ref(q, k, v, **options)[0].sum(), q)[0]
    assert max_err(q.grad, expected_grad) < 1e-4


def test_math_backend_serves_every_option():
    q, k, v, *varlen = varlen_qkv([5, 0, 9], [6, 2, 9], 4, 2, 16)
    options = dict(causal=True, window_size=(4, 0), softcap=2.0, alibi_slopes=torch.rand(3, 4))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, *varlen, return_attn_probs=True, backend="math", **options)
    expected, expected_lse = ref(q, k, v, *varlen, **options)
    ours, ours_lse, _ = fa.flash_attn_varlen_func(q, k, v, *varlen, return_attn_probs=True, backend="cpu", **options)
    assert max_err(out, expected) < 1e-6 and max_err(lse, expected_lse) < 1e-6
    assert max_err(ours, out) < 2e-5


def test_math_dropout_uses_the_kernels_mask():
    q, k, v = qkv(1, 12, 12, 2, 2, 16)
    out, _, s_dmask = fa.flash_attn_func(q, k, v, dropout_p=0.5, return_attn_probs=True, backend="math")
    from_mask = torch.einsum("bhqk,bkhd->bqhd", s_dmask.clamp(min=0) / 0.5, v)
    assert max_err(out, from_mask) < 1e-5


def test_use_backend_works_under_torch_compile():
    torch._dynamo.reset()
    q, k, v = qkv(1, 8, 8, 2, 2, 16)

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=True)

    with fa.use_backend("math"):
        out = f(q, k, v)
    assert max_err(out, ref(q, k, v, causal=True)[0]) < 1e-5


def test_cuda_query_traces_with_dynamic_shapes():
    torch._dynamo.reset()

    def f(q, k, v):
        call = backends.Call(q=q, k=k, v=v, softmax_scale=0.25, causal=True)
        reason = _ops.cuda_unsupported_reason(backends._cuda_query_key(call))
        return q * 2 if reason else q

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for seqlen in (8, 9):
        q = torch.randn(2, seqlen, 4, 16)
        assert torch.equal(compiled(q, q, q), f(q, q, q))  # the traced query answers as the eager one
