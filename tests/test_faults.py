"""SIGKILL at random moments of a training run, each followed by `--resume`: the final weights
are bit-identical to those of a run that was never interrupted.

A moment is drawn from a seeded generator: the k-th training step, the k-th evaluation batch,
a stage of a checkpoint write (after the weights, after the trainer state, between the two
renames of the swap) or a torn file inside the temporary checkpoint. The process kills itself
with SIGKILL there (nothing runs after it: no handler, no flush). The next process resumes from
whatever checkpoint survived, or starts afresh when none was written yet.

The default suite kills at 3 moments; `pytest -m slow tests/test_faults.py` at 24 (and
`BDH_FAULTS_REPORT=FILE` writes what was survived as JSON).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bdh.checkpoint import load_checkpoint
from bdh.cli import main
from conftest import synthetic_text

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 24
SETTINGS = ["--preset", "tiny", "--batch-size", "4", "--block-size", "16", "--eval-batches", "2"]
SETTINGS += ["--threads", "1", "--no-progress", "--max-steps", str(STEPS)]
SETTINGS += ["--ckpt-interval", "3", "--eval-interval", "4"]
KINDS = ("step", "eval", "model.safetensors", "trainer_state.safetensors", "swap", "torn")

# Runs `bdh train` (or `--resume`) in a fresh process that SIGKILLs itself at the chosen moment.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from bdh import checkpoint, train
    from bdh.cli import main

    kind, count, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    seen = {"n": 0}

    def arrive():
        seen["n"] += 1
        if seen["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(module, name, before=False):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            if before:
                arrive()
            out = real(*args, **kwargs)
            if not before:
                arrive()
            return out

        setattr(module, name, wrapped)

    if kind == "step":  # after the optimizer updated the weights in memory, before any record
        wrap(train, "_train_step")
    elif kind == "eval":  # in the middle of an evaluation
        wrap(train, "_score")
    elif kind == "torn":  # a file of the temporary checkpoint half-written
        real_save = checkpoint.save_file

        def torn(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            if seen["n"] + 1 == count:
                os.truncate(filename, os.path.getsize(filename) // 2)
            arrive()

        checkpoint.save_file = torn
    else:  # a stage of the checkpoint write
        checkpoint._on_write = lambda stage: arrive() if stage == kind else None
    sys.exit(main(argv))
    """
)


def _moments(n: int, seed: int) -> list[tuple[str, int]]:
    """n moments: each kind in turn (so every phase is hit), the count drawn at random."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    # Counts small enough that each process dies before finishing; steps reach further.
    return [(k, rng.randint(1, 5 if k == "step" else 2)) for k in kinds]


def _run(kind: str, count: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", DRIVER, kind, str(count), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _kill_and_resume(tmp_path: Path, kills: int, seed: int) -> dict[str, int]:
    data, run, reference = tmp_path / "text.txt", tmp_path / "run", tmp_path / "reference"
    data.write_text(synthetic_text(6000))
    assert main(["train", "--data", str(data), "--out", str(reference), *SETTINGS]) == 0
    fresh = ["train", "--data", str(data), "--out", str(run), *SETTINGS]
    resume = ["train", "--resume", "--out", str(run)]
    killed: dict[str, int] = {}
    moments = _moments(kills, seed)
    for kind, count in moments:
        started = (run / "checkpoint").exists() or (run / ".checkpoint.old").exists()
        done = _run(kind, count, resume if started else fresh)
        if done.returncode == 0:  # the run finished before the moment came
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
        killed[kind] = killed.get(kind, 0) + 1
        # The killed process's lock file stays behind; the kernel released the lock itself.
        assert (run / ".lock").read_text().strip().isdigit()
    assert main(resume) == 0  # the last resume runs to the end
    final, expected = load_checkpoint(run), load_checkpoint(reference)
    assert final.meta["step"] == expected.meta["step"] == STEPS
    for name, tensor in expected.model.state_dict().items():
        assert torch.equal(final.model.state_dict()[name], tensor), name
    _assert_same_losses(run, reference)
    return killed


def _assert_same_losses(run: Path, reference: Path) -> None:
    def losses(path: Path) -> list[tuple[int, float]]:
        records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss", r.get("val_loss"))) for r in records]

    assert losses(run) == losses(reference)


def test_sigkill_at_a_few_moments_then_resume_is_bit_identical(tmp_path):
    killed = _kill_and_resume(tmp_path, kills=3, seed=0)
    assert sum(killed.values()) == 3, killed


@pytest.mark.slow
def test_sigkill_at_24_moments_then_resume_is_bit_identical(tmp_path):
    killed = _kill_and_resume(tmp_path, kills=24, seed=1)
    print(f"\n[faults] kill points survived: {sum(killed.values())} {killed}")
    if os.environ.get("BDH_FAULTS_REPORT"):  # the README's figure
        report = {"kills": sum(killed.values()), "by_moment": killed, "steps": STEPS}
        report |= {"final_weights": "bit-identical", "losses": "identical"}
        Path(os.environ["BDH_FAULTS_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    assert sum(killed.values()) >= 20, killed
    assert set(killed) == set(KINDS)  # every phase was hit
