"""`bdh train|sample|eval`: every option documented, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bdh.checkpoint import load_checkpoint
from bdh.cli import build_parser, main
from conftest import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--batch-size", "4", "--block-size", "16", "--eval-batches", "2"]
TINY += ["--threads", "1"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for the processes the tests start


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *TINY, "--no-progress", *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model trained for a few steps on ASCII text (vocab_size 128, see the prompt test)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "corpus.txt"
    data.write_text(synthetic_text(20_000))
    (root / "ascii.json").write_text('{"vocab_size": 128}')
    args = _train_args(data, root / "run", "--max-steps", "6", "--config", str(root / "ascii.json"))
    threads = torch.get_num_threads()
    assert main(args) == 0
    torch.set_num_threads(threads)  # --threads 1 must not leak into the other test modules
    return root / "run"


def _fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI, expect a non-zero exit and exactly one line on stderr naming the problem."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("verb", ["train", "sample", "eval"])
def test_help_explains_every_option(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    sub = next(
        a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == verb
    )[1]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in out
        if action.option_strings and action.dest != "help":
            assert action.help, f"{verb} {action.option_strings} has no help"


# ---------------------------------------------------------------- the happy path


def test_train_eval_and_sample(run_dir, capsys):
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["tokens"] == result["bytes"] > 0
    assert 0 < result["bpb"] < 8

    assert main(["eval", "--ckpt", str(run_dir), "--no-progress"]) == 0
    assert "bits/byte" in capsys.readouterr().out

    args = ["sample", "--ckpt", str(run_dir), "--prompt", "The king", "--max-new-tokens", "20"]
    assert main([*args, "--top-k", "5", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The king") and len(out) > len("The king")
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("The king")


def test_sampling_is_reproducible_with_a_seed(run_dir, capsys):
    """Same seed, same text; another seed, another text (so the seed is what decides)."""
    args = ["sample", "--ckpt", str(run_dir), "--max-new-tokens", "30"]
    samples = []
    for seed in ("3", "3", "4"):
        capsys.readouterr()
        assert main([*args, "--seed", seed]) == 0
        samples.append(capsys.readouterr().out)
        assert len(samples[-1].strip()) > 0, "sample printed nothing"
    assert samples[0] == samples[1]
    assert samples[0] != samples[2]


def test_eval_of_a_given_file_uses_all_of_it(run_dir, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(synthetic_text(500, seed=9))
    assert main(["eval", "--ckpt", str(run_dir), "--data", str(other), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "all" and result["tokens"] == 499
    assert main(["eval", "--ckpt", str(run_dir), "--data", str(other), "--max-tokens", "100"]) == 0
    assert "over 100 tokens" in capsys.readouterr().out
    _fails(capsys, ["eval", "--ckpt", str(run_dir), "--max-tokens", "0"], "max_tokens must be")


# ---------------------------------------------------------------- user mistakes


def test_missing_data_path(tmp_path, capsys):
    _fails(capsys, _train_args(tmp_path / "nope.txt", tmp_path / "r"), "not found", "nope.txt")


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    _fails(capsys, _train_args(tmp_path / "empty.txt", tmp_path / "r"), "empty")


def test_data_shorter_than_one_block(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("x" * 100)
    _fails(capsys, _train_args(tmp_path / "short.txt", tmp_path / "r"), "fewer than one block")


def test_unknown_preset(text_file, tmp_path, capsys):
    args = [*_train_args(text_file, tmp_path / "r"), "--preset", "huge"]
    _fails(capsys, args, "unknown preset 'huge'")


def test_bad_training_value(text_file, tmp_path, capsys):
    _fails(capsys, _train_args(text_file, tmp_path / "r", "--lr", "-1"), "lr must be > 0")


def test_a_token_id_beyond_the_vocabulary_in_the_data(text_file, tmp_path, capsys):
    (tmp_path / "v64.json").write_text('{"vocab_size": 64}')  # letters are bytes >= 64
    args = _train_args(text_file, tmp_path / "r", "--config", str(tmp_path / "v64.json"))
    _fails(capsys, args, ">= vocab_size 64")


def test_a_token_id_beyond_the_vocabulary_passed_to_the_model(run_dir, capsys):
    # The checkpoint has vocab_size 128; 'é' is two bytes >= 128.
    args = ["sample", "--ckpt", str(run_dir), "--prompt", "café", "--max-new-tokens", "5"]
    _fails(capsys, args, "token id", "outside the vocabulary [0, 128)")


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--temperature", "0", "temperature must be > 0"),
        ("--temperature", "-1", "temperature must be > 0"),
        ("--top-k", "0", "top_k must be"),
        ("--top-p", "0", "top_p must be in (0, 1]"),
        ("--top-p", "1.5", "top_p must be in (0, 1]"),
    ],
)
def test_bad_sampling_settings(run_dir, capsys, option, value, expected):
    _fails(capsys, ["sample", "--ckpt", str(run_dir), option, value], expected)


def test_missing_checkpoint(tmp_path, capsys):
    _fails(capsys, ["sample", "--ckpt", str(tmp_path / "none")], "checkpoint not found")
    _fails(capsys, ["eval", "--ckpt", str(tmp_path)], "not a checkpoint")


@pytest.fixture
def ckpt_copy(run_dir, tmp_path) -> Path:
    import shutil

    copy = tmp_path / "ck"
    shutil.copytree(load_checkpoint(run_dir).path, copy)
    return copy


def test_truncated_weights(ckpt_copy, capsys):
    weights = ckpt_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails(
        capsys, ["sample", "--ckpt", str(ckpt_copy)], "model.safetensors", "corrupt or truncated"
    )


def test_corrupt_weights(ckpt_copy, capsys):
    (ckpt_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    _fails(capsys, ["eval", "--ckpt", str(ckpt_copy)], "corrupt or truncated")


def test_config_that_does_not_match_the_weights(ckpt_copy, capsys):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["config"]["mlp_internal_dim_multiplier"] = 16
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["sample", "--ckpt", str(ckpt_copy)], "does not match model.safetensors")


def test_resume_without_a_checkpoint(tmp_path, capsys):
    _fails(capsys, ["train", "--resume", "--out", str(tmp_path / "r")], "checkpoint not found")


def test_resume_of_a_checkpoint_without_training_settings(tmp_path, capsys):
    from bdh import BDH, BDHConfig
    from bdh.checkpoint import RUN_SUBDIR, save_checkpoint
    from bdh.tokenizer import ByteTokenizer

    run = tmp_path / "r"
    model = BDH(BDHConfig.from_name("tiny"))
    save_checkpoint(run / RUN_SUBDIR, model, "bdh", ByteTokenizer(), training={"step": 0})
    _fails(capsys, ["train", "--resume", "--out", str(run)], "no training settings")


# ---------------------------------------------------------------- the real process


def _bdh(*args: str) -> list[str]:
    return [sys.executable, "-m", "bdh.cli", *args]


def test_the_process_exits_non_zero_without_a_traceback(tmp_path):
    done = subprocess.run(
        _bdh("eval", "--ckpt", str(tmp_path / "x")), capture_output=True, text=True, env=ONE_THREAD
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr


def test_ctrl_c_saves_a_checkpoint_first(tmp_path, text_file):
    out = tmp_path / "run"
    args = _train_args(text_file, out, "--max-steps", "100000", "--ckpt-interval", "100000")
    proc = subprocess.Popen(
        _bdh(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD
    )
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count("\n") > 2
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stdout + stderr
    step = load_checkpoint(out, training=True).training["step"]
    assert step >= 3
    assert os.path.isfile(out / "checkpoint" / "model.safetensors")
