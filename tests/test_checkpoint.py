"""Checkpoints: round trips, no pickle, atomic replacement, and clear errors for damaged files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh import checkpoint as ckpt_mod
from bdh.baseline.gpt import GPT, GPTConfig
from bdh.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bdh.tokenizer import BPETokenizer, ByteTokenizer
from conftest import REPO, synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bdh(seed: int = 0) -> BDH:
    torch.manual_seed(seed)
    return BDH(BDHConfig.from_name("tiny"))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_of_weights_config_and_meta(tmp_path):
    model = _tiny_bdh()
    save_checkpoint(tmp_path / "ck", model, "bdh", ByteTokenizer(), meta={"step": 7})
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.kind == "bdh" and loaded.meta == {"step": 7}
    assert loaded.config == model.config
    _assert_same_weights(model, loaded.model)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model"] == "bdh"


def test_the_gpt_baseline_plugs_in_through_the_registry(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    save_checkpoint(tmp_path / "ck", model, "gpt", ByteTokenizer())
    loaded = load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded.model, GPT) and loaded.kind == "gpt"
    _assert_same_weights(model, loaded.model)


def test_a_bpe_tokenizer_is_saved_beside_the_weights(tmp_path):
    tok = BPETokenizer.train([synthetic_text(5000)], vocab_size=280)
    model = BDH(BDHConfig.from_name("tiny", vocab_size=280))
    save_checkpoint(tmp_path / "ck", model, "bdh", tok)
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.tokenizer.kind == "bpe" and loaded.tokenizer.fingerprint == tok.fingerprint


def test_training_state_round_trips_without_pickle(tmp_path):
    model = _tiny_bdh()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))[1].backward()
    opt.step()
    import random

    state = {"step": 3, "optimizer": opt.state_dict(), "python": random.getstate()}
    state["torch"] = torch.get_rng_state()
    save_checkpoint(tmp_path / "ck", model, "bdh", ByteTokenizer(), training=state)
    loaded = load_checkpoint(tmp_path / "ck", training=True).training
    assert loaded["step"] == 3 and torch.equal(loaded["torch"], state["torch"])
    assert loaded["python"][1] == list(state["python"][1])
    saved_opt, loaded_opt = opt.state_dict(), loaded["optimizer"]
    assert set(loaded_opt["state"]) == set(saved_opt["state"])  # integer keys survive JSON
    for i, s in saved_opt["state"].items():
        for name, value in s.items():
            assert torch.equal(loaded_opt["state"][i][name], value)
    opt.load_state_dict(loaded_opt)  # accepted by torch as is
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"trainer_state.json", "trainer_state.safetensors"} <= files
    assert not any(name.endswith((".pt", ".pkl", ".bin")) for name in files)


def test_saving_again_replaces_and_leaves_nothing_behind(tmp_path):
    save_checkpoint(tmp_path / "ck", _tiny_bdh(0), "bdh", ByteTokenizer())
    second = _tiny_bdh(1)
    save_checkpoint(tmp_path / "ck", second, "bdh", ByteTokenizer())
    _assert_same_weights(second, load_checkpoint(tmp_path / "ck").model)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_a_run_directory_resolves_to_its_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "run" / "checkpoint", _tiny_bdh(), "bdh", ByteTokenizer())
    assert load_checkpoint(tmp_path / "run").path == tmp_path / "run" / "checkpoint"


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, _tiny_bdh(), "bdh", ByteTokenizer())
    return path


def test_truncated_weights_are_reported(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(saved)


def test_corrupt_weights_are_reported_without_a_checksum(saved):
    config = json.loads((saved / "config.json").read_text())
    del config["weights_sha256"]  # as a hand-made checkpoint would be
    (saved / "config.json").write_text(json.dumps(config))
    (saved / "model.safetensors").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(saved)


def test_a_config_that_does_not_match_the_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["config"]["n_embd"] = 64
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not match model\.safetensors.*shape"):
        load_checkpoint(saved)


def test_an_unknown_model_kind_or_bad_json(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model": "rnn"}))
    with pytest.raises(ValueError, match="unknown model 'rnn'"):
        load_checkpoint(saved)
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(saved)


def test_a_crash_between_the_two_renames_keeps_the_previous_checkpoint(saved, monkeypatch):
    previous = load_checkpoint(saved).model

    def crash(stage: str) -> None:
        if stage == "swap":
            raise SystemExit("simulated crash")

    monkeypatch.setattr(ckpt_mod, "_on_write", crash)
    with pytest.raises(SystemExit):
        save_checkpoint(saved, _tiny_bdh(1), "bdh", ByteTokenizer())
    assert not saved.exists()
    _assert_same_weights(previous, load_checkpoint(saved).model)  # found in .ck.old
    monkeypatch.setattr(ckpt_mod, "_on_write", lambda stage: None)
    save_checkpoint(saved, _tiny_bdh(2), "bdh", ByteTokenizer())  # the next save recovers
    _assert_same_weights(_tiny_bdh(2), load_checkpoint(saved).model)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ck"]


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from bdh import BDH, BDHConfig
    from bdh import checkpoint
    from bdh.tokenizer import ByteTokenizer

    path, stage = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    checkpoint.save_checkpoint(path, BDH(BDHConfig.from_name("tiny")), "bdh", ByteTokenizer())

    def hang(name):
        if name == stage:
            print("writing", flush=True)
            time.sleep(60)

    checkpoint._on_write = hang
    torch.manual_seed(1)
    model = BDH(BDHConfig.from_name("tiny"))
    checkpoint.save_checkpoint(path, model, "bdh", ByteTokenizer(), training={"step": 1})
    """
)


@pytest.mark.parametrize("stage", ["model.safetensors", "trainer_state.safetensors", "swap"])
def test_sigkill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, stage):
    path = tmp_path / "ck"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), stage],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _assert_same_weights(_tiny_bdh(0), load_checkpoint(path).model)
    save_checkpoint(path, _tiny_bdh(1), "bdh", ByteTokenizer())  # and the next save works
    _assert_same_weights(_tiny_bdh(1), load_checkpoint(path).model)
