"""Library calls leave process-wide settings as they found them: torch's thread count and
glibc's retention of freed memory are scoped to `train`, and `evaluate_checkpoint` sets none."""

from __future__ import annotations

import torch

from bdh import speed
from bdh import train as train_mod
from bdh.train import TrainConfig, evaluate_checkpoint, train

QUIET = {"progress": False, "log": lambda line: None}
RETAIN, DEFAULT = (1 << 30, 2**31 - 1), (128 * 1024, 128 * 1024)


def _cfg(tmp_path, text_file, threads: int) -> TrainConfig:
    return TrainConfig(
        data=str(text_file), out=str(tmp_path / "run"), preset="tiny", max_steps=3,
        batch_size=2, block_size=16, eval_batches=1, threads=threads,
    )  # fmt: skip


def test_train_holds_its_threads_and_allocator_setting_only_while_it_runs(
    tmp_path, text_file, monkeypatch
):
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    thresholds: list[tuple[int, int]] = []
    real_set = speed._set_thresholds
    monkeypatch.setattr(speed, "_set_thresholds", lambda *t: thresholds.append(t) or real_set(*t))
    seen: list[tuple[int, tuple[int, int] | None]] = []  # (threads, allocator) at every step
    real_step = train_mod._train_step

    def step(run, lr):
        seen.append((torch.get_num_threads(), thresholds[-1] if thresholds else None))
        return real_step(run, lr)

    monkeypatch.setattr(train_mod, "_train_step", step)
    train(_cfg(tmp_path, text_file, wanted), **QUIET)
    assert seen == [(wanted, RETAIN)] * 3  # the run's settings while it trains
    assert torch.get_num_threads() == before  # and the caller's after
    assert thresholds[-1] == DEFAULT


def test_evaluate_checkpoint_leaves_the_thread_count_alone(tmp_path, text_file, monkeypatch):
    train(_cfg(tmp_path, text_file, 1), **QUIET)
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    result, _ = evaluate_checkpoint(tmp_path / "run", max_tokens=50)
    assert result.tokens == 50 and calls == []


def test_freed_memory_is_released_when_the_block_ends_even_on_error(monkeypatch):
    thresholds: list[tuple[int, int]] = []
    monkeypatch.setattr(speed, "_set_thresholds", lambda *t: thresholds.append(t) or True)
    monkeypatch.setattr(speed, "_glibc", lambda: type("C", (), {"malloc_trim": staticmethod(abs)}))
    try:
        with speed.freed_memory_retained() as retained:
            assert retained and thresholds == [RETAIN]
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert thresholds == [RETAIN, DEFAULT]
