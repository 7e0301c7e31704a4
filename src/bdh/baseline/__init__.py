"""The Transformer baseline (GPT-2 style) and the parameter-matched BDH/GPT ladder."""

from bdh.baseline.gpt import GPT, GPTConfig, GPTState
from bdh.baseline.presets import LADDER, QUICK_LADDER, flops_per_token, matched_pair, param_gap

__all__ = [
    "GPT",
    "LADDER",
    "QUICK_LADDER",
    "GPTConfig",
    "GPTState",
    "flops_per_token",
    "matched_pair",
    "param_gap",
]
