"""`python -m flash_attention` (environment report + checked, timed call) and its bench dispatch."""

import os
import subprocess
import sys
import types

import flash_attention.__main__ as cli


def test_module_runs_and_passes_its_check():
    result = subprocess.run([sys.executable, "-m", "flash_attention", "--seqlen", "128", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("flash_attention", "torch", "cuda_built", "backends for", "auto ->", "PASS", "TFLOP/s"):
        assert text in result.stdout, text


def test_module_reports_every_backend(capsys):
    assert cli.main(["--device", "cpu", "--seqlen", "64", "--nheads", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("cuda", "cpu", "sdpa", "math"):
        assert f"  {name}" in out


def test_bench_subcommand_dispatches_to_bench_main(monkeypatch):
    seen = []
    fake = types.ModuleType("flash_attention.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "flash_attention.bench", fake)
    import flash_attention

    monkeypatch.setattr(flash_attention, "bench", fake, raising=False)
    assert cli.main(["bench", "--mode", "fwd"]) == 0
    assert seen == [["--mode", "fwd"]]
