"""Integrations that route other libraries' attention through flash_attention's kernels.

    flash_attention.integrations.diffusers      enable(pipe_or_model) / disable(...)
    flash_attention.integrations.transformers   attn_implementation="flash_attention"

Import the submodule you need (each requires its library). Every integration logs, once per distinct
outcome, on the "flash_attention" logger whether our kernels ran or why a call fell back, and counts
the calls: stats() returns {site: {outcome: calls}}.
"""

from flash_attention.integrations._route import fallback_calls, kernel_calls, reset_stats, stats

__all__ = ["stats", "reset_stats", "kernel_calls", "fallback_calls"]
