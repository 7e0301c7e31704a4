"""The training loop: schedule, exact resume, Ctrl-C, non-finite losses, bits per byte."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from bdh import train as train_mod
from bdh.checkpoint import load_checkpoint
from bdh.config import ConfigError
from bdh.tokenizer import BPETokenizer, ByteTokenizer
from bdh.train import TrainConfig, TrainingDiverged, evaluate, lr_at, train
from conftest import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"progress": False, "log": lambda line: None}


def _cfg(tmp_path, text_file, name: str = "run", **changes) -> TrainConfig:
    fields = dict(
        data=str(text_file), out=str(tmp_path / name), preset="tiny", max_steps=8,
        batch_size=4, block_size=16, warmup_steps=2, eval_interval=4, eval_batches=2,
        ckpt_interval=4, lr=3e-3, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


# ---------------------------------------------------------------- settings and schedule


def test_warmup_then_cosine_or_linear_decay_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine half way
    assert lr_at(110, cfg) == pytest.approx(0.1)
    linear = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, decay="linear")
    assert lr_at(25, linear) == pytest.approx(0.75)
    assert lr_at(5, TrainConfig(lr=1.0, warmup_steps=0, decay="constant")) == 1.0
    assert lr_at(10**6, TrainConfig(lr=1.0, max_steps=10)) == pytest.approx(0.1)  # lr / 10


def test_a_time_budget_drives_the_decay_and_stops_the_run(tmp_path, text_file):
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, max_minutes=1.0)
    assert lr_at(10, cfg, elapsed=30.0) == pytest.approx(0.5)  # the clock is ahead: half way
    assert lr_at(90, cfg, elapsed=30.0) == pytest.approx(lr_at(90, cfg))  # the steps are ahead
    result = train(_cfg(tmp_path, text_file, max_steps=10_000, max_minutes=1e-4), **QUIET)
    assert result.status == "done" and result.step < 10_000
    assert load_checkpoint(tmp_path / "run", training=True).training["step"] == result.step


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("lr", -1.0), ("decay", "step"), ("tokenizer", "chars"), ("beta2", 1.0)],
)
def test_bad_training_settings_raise_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


# ---------------------------------------------------------------- exact resume


def _interrupt_at(step: int, monkeypatch) -> None:
    """Send a real SIGINT (Ctrl-C) to this process while step `step` is computed."""
    real_step = train_mod._train_step
    calls = {"n": 0}

    def step_then_interrupt(run, lr):
        calls["n"] += 1
        if run.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(run, lr)

    monkeypatch.setattr(train_mod, "_train_step", step_then_interrupt)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"batches": "stream", "grad_accum": 2},
        {"config_file": "dropout"},  # dropout draws from the torch RNG, which must be restored
    ],
    ids=["random", "stream-accum", "dropout"],
)
def test_a_resumed_run_reproduces_the_uninterrupted_losses_exactly(
    tmp_path, text_file, monkeypatch, changes
):
    if changes.get("config_file") == "dropout":
        (tmp_path / "dropout.json").write_text('{"dropout": 0.2}')
        changes = {"config_file": str(tmp_path / "dropout.json")}
    full = train(_cfg(tmp_path, text_file, "full", **changes), **QUIET)
    assert full.status == "done" and full.step == 8

    with monkeypatch.context() as m:
        _interrupt_at(5, m)  # Ctrl-C during step 5: the loop saves after it and stops
        stopped = train(_cfg(tmp_path, text_file, "split", **changes), **QUIET)
    assert stopped.status == "interrupted" and stopped.step == 5
    assert load_checkpoint(tmp_path / "split", training=True).training["step"] == 5

    resumed = train(TrainConfig(out=str(tmp_path / "split")), resume=True, **QUIET)
    assert resumed.status == "done" and resumed.step == 8
    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "split")
    assert got == expected  # every step, bit for bit
    a = load_checkpoint(tmp_path / "full").model.state_dict()
    b = load_checkpoint(tmp_path / "split").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_can_extend_a_finished_run(tmp_path, text_file):
    train(_cfg(tmp_path, text_file, max_steps=4), **QUIET)
    result = train(
        TrainConfig(out=str(tmp_path / "run")), resume=True, overrides={"max_steps": 6}, **QUIET
    )
    assert result.step == 6 and sorted(_losses(tmp_path / "run")) == list(range(1, 7))


def test_metrics_past_the_checkpoint_are_replaced_on_resume(tmp_path, text_file):
    train(_cfg(tmp_path, text_file, max_steps=4), **QUIET)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:  # a run that died after step 4
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    train(TrainConfig(out=str(tmp_path / "run")), resume=True, overrides={"max_steps": 5}, **QUIET)
    assert _losses(tmp_path / "run")[5] != 123.0


# ---------------------------------------------------------------- failures


def test_a_non_finite_loss_stops_cleanly_and_keeps_the_last_checkpoint(
    tmp_path, text_file, monkeypatch
):
    real_step = train_mod._train_step

    def diverge_at_step_7(run, lr):
        loss, norm = real_step(run, lr)
        return (float("nan"), norm) if run.step + 1 == 7 else (loss, norm)

    monkeypatch.setattr(train_mod, "_train_step", diverge_at_step_7)
    with pytest.raises(TrainingDiverged, match=r"step 7.*not finite.*last checkpoint"):
        train(_cfg(tmp_path, text_file), **QUIET)
    assert load_checkpoint(tmp_path / "run", training=True).training["step"] == 4


def test_data_shorter_than_one_block(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="fewer than one block"):
        train(TrainConfig(data=str(short), out=str(tmp_path / "r"), preset="tiny"), **QUIET)


# ---------------------------------------------------------------- learning


def test_training_takes_the_held_out_loss_far_below_its_start(tmp_path, text_file):
    """A tiny model on a tiny corpus, 60 steps: the validation loss ends far below the loss of
    the first step (the untrained model's, ~ln 256). The slow suite does the same on real text."""
    cfg = _cfg(tmp_path, text_file, max_steps=60, batch_size=8, block_size=32, eval_interval=60)
    result = train(cfg, **QUIET)
    start = _losses(tmp_path / "run")[1]
    assert start == pytest.approx(math.log(256), rel=0.05)  # untrained: the uniform loss
    assert result.val is not None and result.val.loss < 0.7 * start, (start, result.val)


# ---------------------------------------------------------------- evaluation


def test_evaluate_scores_every_target_once_and_reports_bits_per_byte(tmp_path):
    torch.manual_seed(0)
    from bdh import BDH, BDHConfig

    model = BDH(BDHConfig.from_name("tiny")).eval()
    tokens = ByteTokenizer().encode(synthetic_text(1000))
    result = evaluate(model, tokens, ByteTokenizer().bytes_per_token, block_size=64, batch_size=4)
    assert result.tokens == result.bytes == len(tokens) - 1
    assert result.bpb == pytest.approx(result.loss / math.log(2))
    # The same sum computed window by window, by hand.
    ids = torch.from_numpy(tokens.astype(np.int64))
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 64):
            x, y = ids[s : s + 64][None], ids[s + 1 : s + 65][None]
            x = x[:, : y.shape[1]]
            nats += float(torch.nn.functional.cross_entropy(model(x)[0][0], y[0], reduction="sum"))
    assert result.loss == pytest.approx(nats / (len(tokens) - 1), rel=1e-5)


def test_bits_per_byte_counts_the_bytes_of_bpe_tokens():
    from bdh import BDH, BDHConfig

    text = synthetic_text(5000)
    tok = BPETokenizer.train([text], vocab_size=300)
    model = BDH(BDHConfig.from_name("tiny", vocab_size=300)).eval()
    tokens = tok.encode(text)
    result = evaluate(model, tokens, tok.bytes_per_token, block_size=32)
    assert result.bytes == len(text.encode()) - int(tok.bytes_per_token[tokens[0]])
    assert result.bpb == pytest.approx(result.loss * result.tokens / math.log(2) / result.bytes)
    assert result.bytes > result.tokens


def test_training_with_bpe_saves_the_tokenizer(tmp_path, text_file):
    cfg = _cfg(tmp_path, text_file, max_steps=2, tokenizer="bpe", bpe_vocab_size=300)
    train(cfg, **QUIET)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.tokenizer.kind == "bpe" and ckpt.config.vocab_size == 300
    assert (tmp_path / "run" / "checkpoint" / "tokenizer.json").is_file()


def test_the_gpt_baseline_trains_with_the_same_loop(tmp_path, text_file):
    result = train(_cfg(tmp_path, text_file, model="gpt", max_steps=2), **QUIET)
    assert result.status == "done" and load_checkpoint(tmp_path / "run").kind == "gpt"
