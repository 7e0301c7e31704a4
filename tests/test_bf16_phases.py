"""A model cast to bf16 keeps its rotary phases exact: positions and phases stay float32."""

from __future__ import annotations

import copy

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.ops.rope import cos_sin, frequencies

T = 1100  # long enough that bf16 positions would be off by up to 2 (spacing 4 above 512)


def _model(**overrides) -> BDH:
    torch.manual_seed(0)
    return BDH(BDHConfig.from_name("tiny", **overrides)).eval()


def _errors(logits: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per position: the largest logit error, relative to the largest float32 logit."""
    return (logits.float() - expected).abs().amax(-1)[0] / expected.abs().amax()


def _late_over_early(errors: torch.Tensor) -> float:
    return float(errors[1000:].mean() / errors[:100].mean())


@pytest.mark.usefixtures("one_thread")  # a tiny model: a second thread mostly waits
@torch.no_grad()
def test_a_bf16_copy_is_as_accurate_at_position_1000_as_at_the_start():
    """Forward pass and decoding engine: errors at positions ≥ 1000 at most 2x those below 100."""
    model = _model()
    idx = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0))
    expected, _ = model(idx)
    low = copy.deepcopy(model).to(torch.bfloat16)
    assert low.lm_head.dtype == torch.bfloat16  # the weights are cast, the phases are not

    logits, _ = low(idx)
    assert _late_over_early(_errors(logits, expected)) <= 2.0

    engine = low.decoding_engine()
    state = engine.init_state(1)
    parts = [engine.step(idx[:, :100], state), engine.step(idx[:, 100:1000], state)]
    parts += [engine.step(idx[:, t : t + 1], state) for t in range(1000, 1016)]  # token steps
    assert _late_over_early(_errors(torch.cat(parts, 1), expected[:, :1016])) <= 2.0


def test_casting_the_model_keeps_frequencies_and_damping_float32():
    model = _model(damping=[0.999, 0.99])
    freqs, damping = model.attn.freqs.clone(), model.attn.damping.clone()
    model.to(torch.bfloat16)
    assert model.attn.freqs.dtype == model.attn.damping.dtype == torch.float32
    assert torch.equal(model.attn.freqs, freqs) and torch.equal(model.attn.damping, damping)
    model.double()  # float64 is kept: it is at least float32
    assert model.attn.freqs.dtype == torch.float64
    assert torch.equal(model.attn.freqs, freqs.double())


def test_phases_of_bf16_frequencies_use_float32_positions():
    """Whatever dtype the frequencies come in, t · freq is formed in float32: the only error left
    is the frequencies' own rounding."""
    freqs = frequencies(64).bfloat16()
    cos, sin = cos_sin(freqs, 1000, 8)
    assert cos.dtype == sin.dtype == torch.float32
    exact_cos, exact_sin = cos_sin(freqs.float(), 1000, 8)
    assert torch.equal(cos, exact_cos) and torch.equal(sin, exact_sin)
