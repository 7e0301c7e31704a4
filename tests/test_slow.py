"""Slow checks at real sizes: `bash scripts/test.sh -m slow` (a few minutes on 2 CPU cores).

The default suite proves every identity on tiny shapes; these repeat the ones whose failure would
only show at scale (the 25M reference preset, thousands of decoded tokens) and check that the
`small` preset actually learns text.
"""

from __future__ import annotations

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.reference import reference_forward

pytestmark = pytest.mark.slow


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_reference_preset_equals_the_literal_spec():
    """25,296,896 parameters, N = 8192 neurons per head: the chunked crossover (T > 256) too."""
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("reference")).eval()
    assert model.num_params() == 25_296_896
    idx = ids(1, 300)
    logits, _ = model(idx)
    expected = reference_forward(model.state_dict(), idx, model.config.n_layer)
    assert rel_err(logits, expected) <= 1e-5


@torch.no_grad()
def test_decoding_thousands_of_tokens_stays_on_the_full_forward():
    """Step by step through 3,000 positions (rotary phases far beyond training lengths): the state
    form still equals the chunked forward pass, with the engine's sparse and dense paths alike."""
    from bdh.decode import DecodeOptions

    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("small")).eval()
    idx = ids(1, 3000, seed=1)
    full = model(idx)[0]
    scale = float(full.abs().max())
    for attention in ("dense", "sparse"):
        engine = model.decoding_engine(DecodeOptions(kv="off", attention=attention))
        state = engine.init_state(1)
        first = engine.prefill(idx[:, :2000], state)
        steps = [engine.step(idx[:, t : t + 1], state) for t in range(2000, 3000)]
        torch.testing.assert_close(first, full[:, 1999], rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(
            torch.cat(steps, dim=1), full[:, 2000:], rtol=1e-4, atol=1e-4 * scale
        )


def test_the_small_preset_learns_tiny_shakespeare(shared_data, tmp_path):
    """Two minutes of training on real text take validation far below chance (8 bits/byte)."""
    from bdh.train import TrainConfig, train

    cfg = TrainConfig(
        data=str(shared_data / "tinyshakespeare.txt"),
        out=str(tmp_path / "run"),
        preset="small",
        max_steps=300,
        max_minutes=2.0,
        batch_size=16,
        block_size=64,
        lr=3e-3,
        warmup_steps=20,
        eval_interval=100,
        ckpt_interval=300,
    )
    result = train(cfg, progress=False, log=lambda line: None)
    assert result.status == "done" and result.val is not None
    assert result.val.bpb < 3.3, result.val
