"""Training through a carried state (paper App. B) and multi-process data-parallel training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.checkpoint import load_checkpoint
from bdh.config import ConfigError
from bdh.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"progress": False, "log": lambda line: None}


def _cfg(tmp_path, text_file, name: str, **changes) -> TrainConfig:
    fields = dict(
        data=str(text_file), out=str(tmp_path / name), preset="tiny", max_steps=6,
        batch_size=4, block_size=16, warmup_steps=2, eval_interval=3, eval_batches=2,
        ckpt_interval=3, lr=3e-3, threads=1,
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# ---------------------------------------------------------------- the carried state
def test_a_carried_state_continues_the_stream_exactly():
    """Two batches read through a carried state give the logits of one long forward pass."""
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny")).double().eval()
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    whole, _ = model(idx)
    state = model.init_state(2)
    state.layers = [S.double() for S in state.layers]
    first, _ = model(idx[:, :23], state=state)
    state = state.detach()  # what the trainer does between batches
    second, _ = model(idx[:, 23:], state=state)
    assert state.pos == 40
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-10)


def test_the_state_is_detached_between_batches():
    """Truncated BPTT: batch 2's loss sends no gradient into batch 1's activations."""
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny"))
    emb = model.embed.weight
    idx = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    state = model.init_state(1)
    model(idx[:, :10], state=state)
    S_after_first = state.layers[0]
    assert S_after_first.requires_grad
    state = state.detach()
    _, loss = model(idx[:, 10:], idx[:, 10:], state=state)
    (grad,) = torch.autograd.grad(loss, S_after_first, allow_unused=True)
    assert grad is None and emb is model.embed.weight


def test_carry_state_run_resumes_exactly_with_its_state(tmp_path, text_file):
    full = train(_cfg(tmp_path, text_file, "full", batches="stream", carry_state=True), **QUIET)
    part = _cfg(tmp_path, text_file, "part", batches="stream", carry_state=True, max_steps=3)
    train(part, **QUIET)
    saved = load_checkpoint(tmp_path / "part", training=True).training["stepper"]["carried"]
    assert saved["pos"] == 3 * 16 and saved["layers"][0].shape[0] == 4  # every row's S, at 48
    train(TrainConfig(out=part.out), resume=True, overrides={"max_steps": 6}, **QUIET)
    assert full.step == 6
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")


def test_carry_state_differs_from_plain_stream_training(tmp_path, text_file):
    carried = train(_cfg(tmp_path, text_file, "c", batches="stream", carry_state=True), **QUIET)
    plain = train(_cfg(tmp_path, text_file, "p", batches="stream"), **QUIET)
    first_c, first_p = _losses(tmp_path / "c")[0], _losses(tmp_path / "p")[0]
    assert first_c == first_p  # the first batch starts from an empty state either way
    assert carried.last_loss != plain.last_loss


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"carry_state": True}, "--batches stream"),
        ({"carry_state": True, "batches": "stream", "model": "gpt"}, "--model bdh"),
        ({"precision": "fp16"}, "precision"),
        ({"recompute": "yes"}, "recompute"),
    ],
)
def test_training_options_that_do_not_fit_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_devices(monkeypatch):
    from bdh.distributed import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device must be cpu, cuda, cuda:K or auto"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        TrainConfig(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # where there are GPUs:
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on this node
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


def test_auto_without_a_gpu_trains_like_the_default_cpu(tmp_path, text_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    default = train(_cfg(tmp_path, text_file, "default"), **QUIET)
    auto = train(_cfg(tmp_path, text_file, "auto", device="auto"), **QUIET)
    assert auto.last_loss == default.last_loss


def test_recompute_and_bf16_train(tmp_path, text_file):
    result = train(_cfg(tmp_path, text_file, "r", recompute=True, precision="bf16"), **QUIET)
    assert result.status == "done" and all(
        map(torch.isfinite, map(torch.tensor, [result.last_loss]))
    )


# ---------------------------------------------------------------- two processes
WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    import bdh.train as T

    def dump_after_save(save):
        def wrapped(run):
            path = save(run)  # every rank takes part; rank 0 writes
            rank = dist.get_rank()
            name = f"{run.cfg.out}/params.rank{rank}.step{run.step}.pt"
            torch.save({k: v.detach().clone() for k, v in run.model.state_dict().items()}, name)
            return path
        return wrapped

    T._save = dump_after_save(T._save)
    quiet = {"progress": False, "log": lambda line: None}
    for fields in json.loads(sys.argv[1]):
        T.train(T.TrainConfig(**{**fields, "max_steps": 3}), **quiet)
        T.train(T.TrainConfig(out=fields["out"]), resume=True, overrides={"max_steps": 6}, **quiet)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, text_file):
    """torchrun, 2 ranks on 127.0.0.1 (gloo): identical parameters on both ranks, losses and
    weights equal to one process with the same global batch, resume, and a carried state."""
    runs = {
        "plain": {"grad_accum": 2},  # random batches; gradients averaged on the 2nd micro-batch
        "carry": {"batches": "stream", "carry_state": True},
    }
    singles = {k: _cfg(tmp_path, text_file, f"one-{k}", **v) for k, v in runs.items()}
    ddps = {k: _cfg(tmp_path, text_file, f"two-{k}", **v) for k, v in runs.items()}
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    argv += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker)]
    argv.append(json.dumps([c.to_dict() for c in ddps.values()]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BDH_DIST_BACKEND": "gloo"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, single in singles.items():
        train(single, **QUIET)
        one, two = tmp_path / f"one-{name}", tmp_path / f"two-{name}"
        for step in (3, 6):
            rank0 = torch.load(two / f"params.rank0.step{step}.pt")
            rank1 = torch.load(two / f"params.rank1.step{step}.pt")
            for k in rank0:
                torch.testing.assert_close(rank1[k], rank0[k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(
            torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6
        )
        weights = load_checkpoint(one).model.state_dict()
        for k, v in load_checkpoint(two).model.state_dict().items():
            torch.testing.assert_close(v, weights[k], rtol=1e-4, atol=1e-6, msg=k)
        # What 2 processes saved (the carried state of all rows too) resumes in 1.
        for run_dir in (one, two):
            train(TrainConfig(out=str(run_dir)), resume=True, overrides={"max_steps": 9}, **QUIET)
        assert len(_losses(two)) == len(_losses(one)) == 9
        torch.testing.assert_close(
            torch.tensor(_losses(two)[6:]), torch.tensor(_losses(one)[6:]), rtol=1e-4, atol=1e-5
        )


# ---------------------------------------------------------------- torch.compile
def test_compile_falls_back_to_eager_with_a_warning_where_unsupported(monkeypatch):
    import bdh.speed as speed

    monkeypatch.setattr(speed.shutil, "which", lambda name: None)  # no C++ compiler
    model = BDH(BDHConfig.from_name("tiny"))
    with pytest.warns(UserWarning, match="--compile ignored: no C\\+\\+ compiler"):
        assert speed.compile_model(model, "cpu") is model
    assert getattr(model, "_compiled_call_impl", None) is None  # still eager


@pytest.mark.slow  # compiles forward and backward (~1 minute)
def test_a_compiled_run_trains_like_the_eager_one(tmp_path, text_file):
    from bdh.speed import compile_supported

    if not compile_supported("cpu")[0]:
        pytest.skip(compile_supported("cpu")[1])
    eager = train(_cfg(tmp_path, text_file, "eager", max_steps=3), **QUIET)
    compiled = train(_cfg(tmp_path, text_file, "compiled", max_steps=3, compile=True), **QUIET)
    assert len(_losses(tmp_path / "compiled")) == 3
    torch.testing.assert_close(
        torch.tensor(_losses(tmp_path / "compiled")), torch.tensor(_losses(tmp_path / "eager")),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip
    assert compiled.status == eager.status == "done"
