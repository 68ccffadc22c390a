"""Shared pytest set-up: GPU tests (@pytest.mark.gpu) are skipped without CUDA; every test starts
with no backend forced and the once-only log memory cleared."""

import pytest
import torch

from flash_attention import backends


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_backend_state(monkeypatch):
    monkeypatch.delenv(backends.ENV, raising=False)
    monkeypatch.setattr(backends, "_forced", None)
    monkeypatch.setattr(backends, "_logged", set())
    torch.manual_seed(0)
