"""Untrusted checkpoints, a full disk, SIGTERM, the run lock and readers racing a writer.

Each test compares what happens with the promise: no code runs on load, no good checkpoint is
lost, a second training into a busy folder is refused, and a reader sees one whole checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh import checkpoint as ckpt_mod
from bdh.baseline.gpt import GPT, GPTConfig
from bdh.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bdh.cli import DEFAULTS, main
from bdh.tokenizer import ByteTokenizer
from bdh.train import run_lock
from conftest import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--batch-size", "4", "--block-size", "16", "--eval-batches", "2"]
TINY += ["--threads", "1", "--no-progress"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), *TINY, *extra]


def _one_line_error(capsys, code: int, *expected: str) -> str:
    captured = capsys.readouterr()
    assert code == 1, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _tiny(seed: int = 0) -> BDH:
    torch.manual_seed(seed)
    return BDH(BDHConfig.from_name("tiny"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "ck"
    save_checkpoint(path, _tiny(), "bdh", ByteTokenizer(), meta={"step": 0})
    return path


# ---------------------------------------------------------------- nothing is unpickled


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles(saved, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class Unpickler(pickle.Unpickler):
        def load(self):
            forbidden()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", Unpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    data = tmp_path / "text.txt"
    data.write_text(synthetic_text(4000))
    assert main(_train(data, tmp_path / "run", "--max-steps", "2")) == 0
    load_checkpoint(tmp_path / "run", training=True)
    assert main(["sample", "--ckpt", str(tmp_path / "run"), "--max-new-tokens", "3"]) == 0
    # A pickle in place of the weights is rejected as corrupt, and its code never runs.
    marker = tmp_path / "pwned"
    monkeypatch.undo()
    (saved / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    code = main(["sample", "--ckpt", str(saved), "--max-new-tokens", "1"])
    _one_line_error(capsys, code, "model.safetensors")
    assert not marker.exists()


# ---------------------------------------------------------------- sizes and paths from a stranger


def _edit_config(path: Path, **fields) -> None:
    data = json.loads((path / "config.json").read_text())
    data["config"].update(fields)
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["bdh", "gpt"])
def test_the_memory_estimate_is_the_models_own_parameter_count(kind):
    config = BDHConfig.from_name("tiny") if kind == "bdh" else GPTConfig.from_name("tiny")
    model = BDH(config) if kind == "bdh" else GPT(config)
    assert config.num_params == sum(p.numel() for p in model.parameters())


def test_a_config_too_large_for_the_machine_is_refused_before_allocating(saved, monkeypatch):
    # n = 2^40 neurons: 3·n·D floats would be petabytes.
    _edit_config(saved, n_embd=4096, mlp_internal_dim_multiplier=2**28, n_head=1)
    built = []
    monkeypatch.setitem(
        ckpt_mod.MODEL_KINDS,
        "bdh",
        ckpt_mod.ModelKind("bdh", BDHConfig, lambda c: built.append(c) or BDH(c)),
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="more than this machine's"):
        load_checkpoint(saved)
    assert built == []  # refused before the model was built
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100 * 1024  # KiB


def test_the_memory_limit_is_exact(saved, monkeypatch):
    need = 2 * 4 * BDHConfig.from_name("tiny").num_params  # the file's tensors + the model
    monkeypatch.setattr(ckpt_mod, "machine_memory", lambda: need - 1)
    with pytest.raises(CheckpointError, match="needs about"):
        load_checkpoint(saved)
    monkeypatch.setattr(ckpt_mod, "machine_memory", lambda: need)
    assert _same_weights(load_checkpoint(saved).model, _tiny())


def test_a_huge_config_is_refused_by_the_cli(saved, tmp_path, capsys):
    _edit_config(saved, n_embd=2**20, mlp_internal_dim_multiplier=2**20, n_head=1)
    code = main(["sample", "--ckpt", str(saved), "--max-new-tokens", "1"])
    _one_line_error(capsys, code, "GiB", "refusing to allocate")
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"n_embd": 2**16, "mlp_internal_dim_multiplier": 2**16}))
    data = tmp_path / "text.txt"
    data.write_text(synthetic_text(4000))
    code = main(_train(data, tmp_path / "run", "--config", str(huge), "--max-steps", "1"))
    _one_line_error(capsys, code, "refusing to allocate")


def test_weights_larger_than_their_config_are_refused_before_reading(saved, monkeypatch):
    bigger = BDH(BDHConfig.from_name("tiny", mlp_internal_dim_multiplier=64))
    save_checkpoint(saved.parent / "big", bigger, "bdh", ByteTokenizer())
    (saved / "model.safetensors").write_bytes((saved.parent / "big/model.safetensors").read_bytes())
    config = json.loads((saved / "config.json").read_text())
    del config["weights_sha256"]  # as a stranger would
    (saved / "config.json").write_text(json.dumps(config))
    reads = []
    monkeypatch.setattr(ckpt_mod, "load_file", lambda *a, **k: reads.append(a))
    with pytest.raises(CheckpointError, match=r"has shape .* in the weights"):
        load_checkpoint(saved)
    assert reads == []  # judged from the header alone


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_files_that_lead_out_of_the_checkpoint_are_refused(saved, tmp_path, name):
    outside = tmp_path / "outside"
    outside.write_bytes((saved / name).read_bytes())  # even a valid file, if it lives elsewhere
    (saved / name).unlink()
    (saved / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match="not a regular file inside the checkpoint"):
        load_checkpoint(saved)


def test_a_pipe_or_device_in_a_checkpoint_does_not_hang_the_reader(saved):
    (saved / "model.safetensors").unlink()
    os.mkfifo(saved / "model.safetensors")  # reading it would block forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(saved)
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_on_load(tmp_path, bad):
    model = _tiny()
    with torch.no_grad():
        model.encoder.view(-1)[7] = bad  # e.g. a flipped exponent bit in a stranger's file
    save_checkpoint(tmp_path / "ck", model, "bdh", ByteTokenizer())
    with pytest.raises(CheckpointError, match=r"non-finite values .* in encoder"):
        load_checkpoint(tmp_path / "ck")


def test_an_oversized_config_json_is_refused_without_parsing(saved, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "MAX_JSON_BYTES", 100)
    with pytest.raises(CheckpointError, match="larger than"):
        load_checkpoint(saved)


def test_a_run_directory_named_inside_a_checkpoint_is_never_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # `--resume` without --out resumes the default run directory
    run, elsewhere = Path(DEFAULTS.out), tmp_path / "elsewhere"
    Path("text.txt").write_text(synthetic_text(4000))
    assert main(_train(Path("text.txt"), run, "--max-steps", "2")) == 0
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    config["meta"]["train"]["out"] = str(elsewhere)  # a hostile or stale path
    (run / "checkpoint" / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", "--max-steps", "3"]) == 0
    assert not elsewhere.exists()
    assert load_checkpoint(run, training=True).training["step"] == 3


def _first_dict_with(obj, key: str):
    if isinstance(obj, dict):
        if key in obj:
            return obj
        obj = list(obj.values())
    for item in obj if isinstance(obj, list) else []:
        found = _first_dict_with(item, key)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("damage", ["not a tensor", "another parameter's shape", "a setting"])
def test_a_damaged_optimizer_state_is_refused_before_the_first_step(tmp_path, capsys, damage):
    # Found by the long fuzz profile: a flipped byte in trainer_state.json once failed inside
    # AdamW's step with a traceback.
    data, run = tmp_path / "text.txt", tmp_path / "run"
    data.write_text(synthetic_text(4000))
    assert main(_train(data, run, "--max-steps", "2")) == 0
    file = run / "checkpoint" / "trainer_state.json"
    state = json.loads(file.read_text())
    moments = _first_dict_with(state["optimizer"], "exp_avg")
    if damage == "not a tensor":
        moments["exp_avg"] = {"__tensoR__": moments["exp_avg"]["__tensor__"]}
    elif damage == "another parameter's shape":
        moments["exp_avg"] = moments["step"]  # a scalar in place of a (256, 32) moment
    else:
        state["optimizer"]["param_groups"][0]["eps"] = "1e-8"
    file.write_text(json.dumps(state))
    code = main(["train", "--resume", "--out", str(run), "--max-steps", "3"])
    _one_line_error(capsys, code, "training state", "malformed")


# ---------------------------------------------------------------- a full disk


def _enospc(path: object = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fail_at(monkeypatch, where: str) -> None:
    """Inject ENOSPC at one point of writing a checkpoint; a partial file is left like a real
    full disk leaves it."""
    if where == "weights":
        real = ckpt_mod.save_file

        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 100)
            raise _enospc(filename)

        monkeypatch.setattr(ckpt_mod, "save_file", save_file)
        assert real is not save_file
    elif where == "config":
        real_write = ckpt_mod._write_text

        def write_text(path, text):
            if path.name == "config.json":
                path.write_text(text[: len(text) // 2])
                raise _enospc(path)
            real_write(path, text)

        monkeypatch.setattr(ckpt_mod, "_write_text", write_text)
    elif where == "fsync":
        monkeypatch.setattr(ckpt_mod.os, "fsync", lambda fd: (_ for _ in ()).throw(_enospc()))
    elif where == "swap":  # after the previous checkpoint was moved aside
        monkeypatch.setattr(
            ckpt_mod, "_on_write", lambda s: (_ for _ in ()).throw(_enospc()) if s == "swap" else 0
        )


@pytest.mark.parametrize("where", ["weights", "config", "fsync", "swap"])
def test_a_full_disk_keeps_the_previous_checkpoint(saved, monkeypatch, where):
    _fail_at(monkeypatch, where)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint"):
        save_checkpoint(saved, _tiny(1), "bdh", ByteTokenizer(), training={"step": 1})
    monkeypatch.undo()
    assert _same_weights(load_checkpoint(saved).model, _tiny(0))
    assert not (saved.parent / ".ck.tmp").exists()  # the partial write is freed
    save_checkpoint(saved, _tiny(1), "bdh", ByteTokenizer())  # and the next save works
    assert _same_weights(load_checkpoint(saved).model, _tiny(1))


def test_a_full_disk_during_training_says_so_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, capsys
):
    data, run = tmp_path / "text.txt", tmp_path / "run"
    data.write_text(synthetic_text(4000))
    calls = {"n": 0}
    real = ckpt_mod.save_file

    def save_file(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # the weights of the second checkpoint
            raise _enospc(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    code = main(_train(data, run, "--max-steps", "6", "--ckpt-interval", "2"))
    _one_line_error(capsys, code, "No space left on device", "previous checkpoint is kept")
    assert load_checkpoint(run, training=True).training["step"] == 2
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoint", "metrics.jsonl"]


# ---------------------------------------------------------------- the run lock and SIGTERM


def test_a_second_training_into_a_locked_folder_is_refused(tmp_path, capsys):
    data, run = tmp_path / "text.txt", tmp_path / "run"
    data.write_text(synthetic_text(4000))
    with run_lock(run):
        code = main(_train(data, run, "--max-steps", "1"))
        _one_line_error(capsys, code, "in use by another `bdh train`", f"pid {os.getpid()}")
        code = main(["train", "--resume", "--out", str(run)])
        _one_line_error(capsys, code, "in use by another")
    assert main(_train(data, run, "--max-steps", "1")) == 0  # released


def _start_training(data: Path, run: Path) -> subprocess.Popen:
    args = _train(data, run, "--max-steps", "100000", "--ckpt-interval", "100000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bdh.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count("\n") > 2
    ):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc


def test_sigterm_saves_and_exits_like_ctrl_c_and_the_lock_guards_a_live_run(tmp_path, capsys):
    data, run = tmp_path / "text.txt", tmp_path / "run"
    data.write_text(synthetic_text(20_000))
    proc = _start_training(data, run)
    try:
        code = main(_train(data, run, "--max-steps", "1"))  # a live run owns the folder
        _one_line_error(capsys, code, "in use by another `bdh train`", f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout + stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in metrics)
    assert load_checkpoint(run, training=True).training["step"] == last >= 3
    assert main(["train", "--resume", "--out", str(run), "--max-steps", str(last + 1)]) == 0


# ---------------------------------------------------------------- readers racing a writer

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from bdh import BDH, BDHConfig
    from bdh.checkpoint import save_checkpoint
    from bdh.tokenizer import ByteTokenizer

    path, count = sys.argv[1], int(sys.argv[2])
    model = BDH(BDHConfig.from_name("tiny"))
    for k in range(count):  # checkpoint k: every weight equals k, meta names k
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(k))
        save_checkpoint(path, model, "bdh", ByteTokenizer(), meta={"step": k})
        if k == 0:
            print("ready", flush=True)
        time.sleep(0.01)  # a writer saves now and then, not back to back
    """
)


def test_a_file_vanishing_mid_read_as_the_writer_swaps_is_read_again(tmp_path, monkeypatch):
    # The race the test below meets now and then, made certain: a file is gone while the reader
    # reads it (an OSError, not a CheckpointError) because a new checkpoint was swapped in.
    path, model = tmp_path / "ck", BDH(BDHConfig.from_name("tiny"))
    save_checkpoint(path, model, "bdh", ByteTokenizer(), meta={"step": 1})
    real_load, calls = ckpt_mod._load, []

    def swap_then_vanish(where, *args):
        calls.append(where)
        if len(calls) == 1:
            save_checkpoint(path, model, "bdh", ByteTokenizer(), meta={"step": 2})
            raise FileNotFoundError(
                2, "No such file or directory", str(where / "model.safetensors")
            )
        return real_load(where, *args)

    monkeypatch.setattr(ckpt_mod, "_load", swap_then_vanish)
    assert load_checkpoint(path).meta["step"] == 2 and len(calls) == 2

    # Nothing replaced: any other OSError is a one-line CheckpointError naming the checkpoint.
    def denied(where, *args):
        raise PermissionError(13, "Permission denied", str(where / "model.safetensors"))

    monkeypatch.setattr(ckpt_mod, "_load", denied)
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        load_checkpoint(path)


def test_readers_always_see_one_whole_checkpoint_while_it_is_replaced(tmp_path, capsys):
    path = tmp_path / "ck"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "100"],
        stdout=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )
    assert writer.stdout.readline().strip() == "ready"
    loads, steps = 0, set()
    while writer.poll() is None:
        ckpt = load_checkpoint(path)
        k = ckpt.meta["step"]
        for name, p in ckpt.model.named_parameters():
            assert torch.all(p == k), f"{name} from another checkpoint than step {k}"
        loads, steps = loads + 1, steps | {k}
        if loads % 10 == 0:  # and through the CLI
            assert main(["sample", "--ckpt", str(path), "--max-new-tokens", "1"]) == 0, (
                capsys.readouterr().err
            )
    assert writer.returncode == 0
    assert loads >= 20 and len(steps) >= 10, (loads, len(steps))  # the race was exercised
