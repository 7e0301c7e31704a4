"""Reading past the training length: the stream loss, damping schedules and the learned decay."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bdh import BDH, BDHConfig, ConfigError
from bdh.baseline.gpt import GPT, GPTConfig
from bdh.baseline.presets import LADDER, QUICK_LADDER, preset_config
from bdh.checkpoint import load_checkpoint, save_checkpoint
from bdh.cli import main
from bdh.config import PRESETS, alibi_damping
from bdh.experiments.length import LengthConfig, plot, table_markdown
from bdh.streams import evaluate_streams, position_edges, token_losses
from bdh.tokenizer import ByteTokenizer
from bdh.train import evaluate
from conftest import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")
ONES = np.ones(256, dtype=np.int64)  # bytes per token: every token is one byte


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.frombuffer(synthetic_text(n, seed).encode(), dtype=np.uint8).astype(np.int64)


def _step_losses(model, row: torch.Tensor) -> torch.Tensor:
    """Per-token nats of one stream read by `model.step`, one token at a time (the spec)."""
    state = model.init_state(1)
    out = []
    with torch.no_grad():
        for t in range(row.numel() - 1):
            logits, state = model.step(row[None, t : t + 1], state)
            out.append(F.cross_entropy(logits[0].float(), row[t + 1 : t + 2]))
    return torch.stack(out)


# ---------------------------------------------------------------- the stream loss


@pytest.mark.parametrize("damping", [None, "alibi"])
def test_stream_loss_equals_the_per_token_loss_of_model_step(damping):
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=damping)).eval()
    tokens = _tokens(301, seed=3)  # 300 predictions: 2 streams of 128, a tail of 44
    result = evaluate_streams(model, tokens, ONES, block=16, length=128, batch_size=2, piece=48)
    rows = [torch.from_numpy(tokens[s : s + 129]) for s in (0, 128)]
    rows.append(torch.from_numpy(tokens[256:]))
    spec = [_step_losses(model, row) for row in rows]  # (128,), (128,), (44,)
    # The pieces of 48 tokens do not divide 128: the state is carried across every cut.
    torch.testing.assert_close(token_losses(model, rows[0][None], piece=48)[0], spec[0])
    nats = torch.cat(spec).double()
    assert result.tokens == result.bytes == 300 and result.streams == 3
    assert result.loss == pytest.approx(float(nats.mean()), rel=1e-5)
    assert [(b.start, b.stop) for b in result.buckets] == [(0, 16), (16, 32), (32, 64), (64, 128)]
    for b in result.buckets:  # each bucket: the same positions of every stream that reaches them
        at = torch.cat([s[b.start : b.stop] for s in spec]).double()
        assert b.tokens == at.numel()
        assert b.bpb == pytest.approx(float(at.mean()) / math.log(2), rel=1e-5)


def test_the_gpt_reads_streams_through_its_cache_like_its_full_forward():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_name("tiny", position="alibi")).eval()
    row = torch.from_numpy(_tokens(97, seed=1))[None]
    with torch.no_grad():
        logits, _ = gpt(row[:, :-1])
    full = F.cross_entropy(logits[0], row[0, 1:], reduction="none")
    torch.testing.assert_close(token_losses(gpt, row, piece=20)[0], full, rtol=1e-5, atol=1e-5)


def test_position_buckets_double_from_the_block():
    assert position_edges(64, 4096) == [0, 64, 128, 256, 512, 1024, 2048, 4096]
    assert position_edges(64, 300) == [0, 64, 128, 256, 300]
    assert position_edges(64, 40) == [0, 40]


# ---------------------------------------------------------------- damping reads 16x further


def _train_tiny(damping, tokens: np.ndarray, steps: int = 150) -> BDH:
    """A tiny model trained on windows of 16 tokens only (a few CPU seconds)."""
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", damping=damping))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(tokens) - 17, 16)
        rows = torch.from_numpy(np.stack([tokens[s : s + 17] for s in starts]))
        _, loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_damped_model_reads_a_stream_16x_its_training_length_with_bounded_loss():
    text = _tokens(60_000)
    train, held_out = text[:50_000], text[50_000:52_049]  # 8 streams of 256 = 16 x 16
    losses = {}
    for damping in ("alibi", None):
        model = _train_tiny(damping, train)
        windows = evaluate(model, held_out, ONES, 16).bpb
        stream = evaluate_streams(model, held_out, ONES, 16, length=256, batch_size=8)
        losses[damping] = (windows, [b.bpb for b in stream.buckets])
    windows, buckets = losses["alibi"]
    assert len(buckets) == 5 and max(buckets) < windows + 0.3  # up to position 256
    # The control: the same model and training without damping loses its way in the stream.
    windows, buckets = losses[None]
    assert buckets[-1] > windows + 1.0


# ---------------------------------------------------------------- the schedule and learned decay


def test_alibi_schedule_is_alibis_slopes_as_decays():
    assert alibi_damping(4) == pytest.approx([math.exp(-(2.0**-k)) for k in (2, 4, 6, 8)])
    config = BDHConfig.from_name("small")
    assert config.damping == "alibi" and config.damping_per_head() == alibi_damping(4)
    assert BDHConfig.from_name("small", n_head=8).damping_per_head() == alibi_damping(8)
    for name in PRESETS:  # every preset damps; the published code is damping=None
        assert BDHConfig.from_name(name).damping == "alibi"
    for size in [*LADDER, *QUICK_LADDER]:
        assert preset_config(BDHConfig, size).damping == "alibi"
    with pytest.raises(ConfigError, match="damping must be a float, a list of floats, 'alibi'"):
        BDHConfig(damping="linear")
    with pytest.raises(ConfigError, match="learn_damping needs an initial damping"):
        BDHConfig(learn_damping=True)


def test_configs_saved_before_learn_damping_load_with_fixed_damping(tmp_path):
    saved = BDHConfig.from_name("small").to_dict()
    del saved["learn_damping"]
    saved["damping"] = None
    config = BDHConfig.from_dict(saved)
    assert not config.learn_damping and config.damping_per_head() is None


def _learned(attention: str, delta: list[float]) -> BDH:
    config = BDHConfig.from_name(
        "tiny", damping="alibi", learn_damping=True, attention=attention, chunk_size=7
    )
    torch.manual_seed(0)
    model = BDH(config).double()
    with torch.no_grad():
        model.attn.damping_delta.copy_(torch.tensor(delta))
    return model


def test_learned_decay_starts_at_the_schedule_and_every_form_has_its_gradient():
    idx = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    fixed = BDH(BDHConfig.from_name("tiny", damping="alibi")).double()
    fixed.load_state_dict(_learned("auto", [0.0, 0.0]).state_dict(), strict=False)
    start = _learned("auto", [0.0, 0.0])
    torch.testing.assert_close(start(idx)[0], fixed(idx)[0], rtol=0, atol=0)
    grads = {}
    for form in ("naive", "parallel", "chunked", "auto"):
        model = _learned(form, [0.3, -0.2])
        state = model.init_state(2)
        model(idx[:, :11], state=state)  # a carried state, then the rest: both paths learn λ
        state.layers = [s.detach() for s in state.layers]
        _, loss = model(idx[:, 11:], idx[:, 11:], state=state)
        loss.backward()
        grads[form] = model.attn.damping_delta.grad
    assert grads["naive"].abs().min() > 0
    for form in ("parallel", "chunked", "auto"):  # the spec (a token loop) against the fast forms
        torch.testing.assert_close(grads[form], grads["naive"], rtol=1e-8, atol=1e-12)


def test_a_learned_decay_is_saved_and_loaded_with_the_weights(tmp_path):
    model = _learned("auto", [0.5, -0.5]).float()
    save_checkpoint(tmp_path / "ckpt", model, "bdh", ByteTokenizer())
    loaded = load_checkpoint(tmp_path / "ckpt").model
    torch.testing.assert_close(loaded.attn.damping, model.attn.damping, rtol=0, atol=0)
    assert not torch.allclose(loaded.attn.damping, loaded.attn.fixed_damping)


# ---------------------------------------------------------------- bdh eval and the experiment


def test_eval_reports_the_stream_loss_by_position(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(synthetic_text(6_000))
    out = tmp_path / "run"
    train = ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--threads", "1"]
    assert main([*train, "--max-steps", "2", "--batch-size", "2", "--block-size", "16"]) == 0
    capsys.readouterr()
    args = ["eval", "--ckpt", str(out), "--stream-length", "256", "--no-progress"]
    assert main([*args, "--by-position", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    stream = result["stream"]
    assert stream["length"] == 256 and stream["tokens"] == result["tokens"]
    assert [b["start"] for b in stream["buckets"]] == [0, 16, 32, 64, 128]
    assert main([*args, "--by-position"]) == 0
    text = capsys.readouterr().out
    assert "read as streams of 256 tokens" in text and "| 128–256 |" in text
    assert main([*args[:3], "--stream-length", "-1"]) == 1
    assert "--stream-length must be >= 0" in capsys.readouterr().err
    # A GPT with a learned position table reads streams only as long as its table.
    gpt = ["--model", "gpt", "--out", str(tmp_path / "gpt"), "--config", str(tmp_path / "g.json")]
    (tmp_path / "g.json").write_text('{"block_size": 64}')
    assert main([*train, *gpt, "--max-steps", "1", "--batch-size", "2", "--block-size", "16"]) == 0
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(tmp_path / "gpt"), "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["stream"]["length"] == 64


def test_length_experiment_table_and_plot(tmp_path):
    with pytest.raises(ConfigError, match="at least 16 × block_size"):
        LengthConfig(block_size=64, stream_length=512)
    bucket = {"start": 0, "stop": 16, "loss": 1.0, "bpb": 1.44, "tokens": 8}
    run = {"params": 10, "windows": {"bpb": 1.5}, "stream": {"bpb": 1.4, "buckets": [bucket]}}
    payload = {"config": {**LengthConfig.quick().__dict__}, "runs": {"alibi": run, "gpt": run}}
    table = table_markdown(payload)
    assert "| alibi | 10 | 1.500 | 1.400 | 1.440 |" in table and "0–16" in table
    assert plot(payload, tmp_path / "length.png").stat().st_size > 0


@pytest.mark.slow
def test_length_experiment_runs_end_to_end_in_quick_mode(tmp_path, capsys):
    """`bdh experiment length --quick`: every variant trained, read as streams, written out."""
    runs = tmp_path / "runs"
    assert main(["experiment", "length", "--quick", "--runs", str(runs)]) == 0
    payload = json.loads((runs / "length-quick.json").read_text())
    assert list(payload["runs"]) == ["none", "alibi", "learned", "carry", "gpt"]
    for r in payload["runs"].values():
        assert r["stream"]["length"] == 256 and r["stream"]["tokens"] == 512
        assert [b["start"] for b in r["stream"]["buckets"]] == [0, 16, 32, 64, 128]
    assert payload["runs"]["learned"]["params"] == payload["runs"]["alibi"]["params"] + 2
    assert (runs / "length-quick.png").stat().st_size > 0
