"""The training loop, evaluation in bits per byte, and exact resume.

`train(TrainConfig(...))` trains a model kind of `bdh.checkpoint.MODEL_KINDS` on a data source of
`bdh.data`: AdamW (weight decay 0.1, as the reference), linear warmup then cosine or linear decay,
global-norm gradient clipping, gradient accumulation, validation every `eval_interval` steps,
a checkpoint every `ckpt_interval` steps and at the end, and a JSONL metrics log.

Resuming restores everything that decides the next step: weights, optimizer moments, the step (and
so the learning rate), the batch sampler's position and the Python, NumPy and torch RNG states.
A resumed run therefore reproduces the uninterrupted run's losses exactly on the same machine.

A run directory holds `checkpoint/` (the latest checkpoint), `metrics.jsonl` and `.lock`, which
the training process holds (flock) so that a second training into the same directory is refused;
the kernel drops the lock when its owner dies. SIGTERM, like Ctrl-C, saves and stops the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdh import data as bdh_data
from bdh import distributed
from bdh.baseline.presets import preset_config
from bdh.checkpoint import (
    RUN_SUBDIR,
    Checkpoint,
    CheckpointError,
    check_fits_in_memory,
    load_checkpoint,
    model_kind,
    save_checkpoint,
)
from bdh.config import ConfigError
from bdh.speed import freed_memory_retained
from bdh.tokenizer import KINDS as TOKENIZER_KINDS
from bdh.tokenizer import Tokenizer, train_tokenizer

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"  # held by the process training into the run directory (see run_lock)
_TORCH_THREADS = torch.get_num_threads()  # torch's default, before anyone changes it
DECAYS = ("cosine", "linear", "constant")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
SEEDS = (-(2**63), 2**63)  # what torch.manual_seed accepts


class RunLocked(ValueError):
    """Another live process is training into the same run directory."""


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN or infinite; the last saved checkpoint is untouched."""


@dataclass
class TrainConfig:
    """Everything that defines a run besides the model shape; saved with every checkpoint."""

    data: str = "shakespeare"  # a named corpus, a text file or a folder of .txt files
    out: str = "runs/bdh"  # run directory: checkpoint/ and metrics.jsonl
    model: str = "bdh"  # a kind of bdh.checkpoint.MODEL_KINDS
    preset: str = "small"  # the model's named preset
    config_file: str | None = None  # JSON of model config fields, applied over the preset
    tokenizer: str = "bytes"  # "bytes" (V = 256) or "bpe" (trained on the train split)
    bpe_vocab_size: int = 1024
    batches: str = "random"  # "random" offsets or temporally coherent "stream"s
    max_steps: int = 1000
    # Also stop after this many minutes of training steps (evaluation and saving not counted).
    # Runs then depend on the machine's speed, so exact resume holds only without it.
    max_minutes: float | None = None
    batch_size: int = 32
    block_size: int = 64
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr: float | None = None  # reached at max_steps by the decay; None = lr / 10
    warmup_steps: int = 50
    decay: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # global norm; 0 disables clipping
    eval_interval: int = 250
    eval_batches: int = 16
    # Validate on the first N tokens of the validation split only (None: all of it), so that an
    # experiment can keep the rest of the split unseen until its final test.
    val_limit: int | None = None
    ckpt_interval: int = 500
    log_interval: int = 50  # a log line every N steps when there is no progress bar
    seed: int = 1337
    threads: int = 0  # torch CPU threads; 0 = auto (see `choose_threads`)
    # The paper's regime and speed options (bdh.distributed, bdh.speed). Only carry_state changes
    # what is learned: each batch starts from the state S the previous one left (paper App. B).
    carry_state: bool = False  # needs batches="stream"; the state is detached between batches
    recompute: bool = False  # recompute each layer in the backward pass: less memory, ~+30% time
    precision: str = "fp32"  # "bf16": products under bf16 autocast, the state stays float32
    compile: bool = False  # torch.compile the model (eager, with a warning, where unsupported)
    # Where the model trains: "cpu", "cuda", "cuda:K" or "auto" (a GPU if there is one). Under
    # torchrun each process takes the GPU of its LOCAL_RANK. Checkpoints are stored on the CPU.
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ("max_steps", "batch_size", "block_size", "grad_accum", "bpe_vocab_size")
        positive += ("eval_interval", "eval_batches", "ckpt_interval", "log_interval")
        positive += ("val_limit",) if self.val_limit is not None else ()  # None: the whole split
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be > 0, got {self.max_minutes!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr = {self.lr}], got {self.min_lr!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr * max(1.0, self.weight_decay) <= FLOAT32_MAX:  # AdamW steps in float32
            raise ConfigError(
                f"lr ({self.lr!r}) and lr * weight_decay must stay within float32 range (3.4e38)"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not SEEDS[0] <= self.seed < SEEDS[1]
        ):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**63), got {self.seed!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        _require_choice("decay", self.decay, DECAYS)
        _require_choice("tokenizer", self.tokenizer, TOKENIZER_KINDS)
        _require_choice("batches", self.batches, bdh_data.BATCHES)
        distributed.validate_options(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**data)


def _require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup over warmup_steps, then cosine or linear decay from lr to min_lr.

    With a time budget the decay follows whichever is further along, the steps or the clock, so
    a run stopped by `max_minutes` still ends at min_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, max((step - cfg.warmup_steps) / span, time_fraction(cfg, elapsed)))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    weight = 1.0 - progress if cfg.decay == "linear" else cosine
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    return min_lr + (cfg.lr - min_lr) * weight


def choose_threads(threads: int = 0, log: Callable[[str], None] | None = None) -> int:
    """`threads` if given; else torch's default on an idle machine and 1 on a busy one.

    When other processes already keep every core busy (1-minute load average >= cores), a
    second torch thread mostly waits for the first at each synchronisation point: on 2 shared
    cores one thread was measured 1.5-3x faster than two. Threads change the order of float
    sums, so bit-exact resume needs the same count: pass it explicitly for that.
    """
    if threads:
        return threads
    cores, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    chosen = 1 if load >= cores else _TORCH_THREADS
    if log is not None:
        log(f"[train] torch threads: {chosen} (load average {load:.1f} on {cores} cores)")
    return chosen


def time_fraction(cfg: TrainConfig, elapsed: float) -> float:
    """Share of the time budget used by `elapsed` seconds of training steps (0 without one)."""
    return 0.0 if cfg.max_minutes is None else elapsed / (60.0 * cfg.max_minutes)


# ---------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    loss: float  # nats per predicted token
    bpb: float  # bits per byte of the predicted tokens
    tokens: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _score(model: nn.Module, x: Tensor, y: Tensor, nbytes: Tensor) -> tuple[float, int, int]:
    """Summed nats, token count and byte count of predicting y from x, on the model's device."""
    device = next(model.parameters()).device
    logits, _ = model(x.to(device))
    nats = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum")
    return float(nats), y.numel(), int(nbytes[y].sum())


def _result(nats: float, tokens: int, nbytes: int) -> EvalResult:
    # bpb = total nats / ln 2 / total bytes: with BPE a token stands for several bytes.
    return EvalResult(nats / tokens, nats / math.log(2) / nbytes, tokens, nbytes)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    bytes_per_token: np.ndarray,
    block_size: int,
    batch_size: int = 32,
    progress: bool = False,
) -> EvalResult:
    """Loss over every token of `tokens` but the first, in consecutive windows of block_size.

    Each window starts from an empty context, as in training; the last window may be shorter.
    """
    if len(tokens) < 2:
        raise bdh_data.DataError(f"need at least 2 tokens to evaluate, got {len(tokens)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    was_training = model.training
    model.eval()
    nbytes = torch.from_numpy(np.asarray(bytes_per_token, dtype=np.int64))
    nats, count, total_bytes = 0.0, 0, 0
    for x, y in _windows(tokens, block_size, batch_size, progress):
        n, t, b = _score(model, x, y, nbytes)
        nats, count, total_bytes = nats + n, count + t, total_bytes + b
    model.train(was_training)
    return _result(nats, count, total_bytes)


def _windows(
    tokens: np.ndarray, block_size: int, batch_size: int, progress: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    from tqdm.auto import tqdm

    T, n = block_size, len(tokens) - 1  # n targets
    full = n // T
    starts = range(0, full * T, T)
    batches = [starts[i : i + batch_size] for i in range(0, full, batch_size)]
    for group in tqdm(batches, desc="eval", disable=not progress, leave=False, file=sys.stderr):
        rows = np.stack([tokens[s : s + T + 1] for s in group]).astype(np.int64)
        rows = torch.from_numpy(rows)
        yield rows[:, :-1], rows[:, 1:]
    if n % T:  # the tail, shorter than a block
        rows = torch.from_numpy(np.asarray(tokens[full * T :], dtype=np.int64))[None]
        yield rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def estimate(
    model: nn.Module, tokens: np.ndarray, bytes_per_token: np.ndarray, cfg: TrainConfig
) -> EvalResult:
    """A quick estimate on `eval_batches` random blocks, the same blocks at every call."""
    was_training = model.training
    model.eval()
    sampler = bdh_data.RandomBatches(tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed + 1)
    nbytes = torch.from_numpy(np.asarray(bytes_per_token, dtype=np.int64))
    nats, count, total_bytes = 0.0, 0, 0
    for _ in range(cfg.eval_batches):
        n, t, b = _score(model, *sampler.next(), nbytes)
        nats, count, total_bytes = nats + n, count + t, total_bytes + b
    model.train(was_training)
    return _result(nats, count, total_bytes)


def evaluate_checkpoint(
    path: str | Path,
    data: str | None = None,
    split: str | None = None,
    batch_size: int = 32,
    progress: bool = False,
    max_tokens: int | None = None,
) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate a checkpoint on the validation split of its training data, or on `data`.

    A file given as `data` is evaluated whole (split "all"); a folder or named corpus on its
    validation split. `max_tokens` scores only the split's first max_tokens predictions (a
    quick estimate for models that are slow on the CPU). Returns the result and a description
    of what was evaluated. Runs on torch's current thread count (`bdh eval` sets it).
    """
    ckpt = load_checkpoint(path)
    tokens, what = checkpoint_tokens(ckpt, data, split, max_tokens)
    block = int(ckpt.meta.get("train", {}).get("block_size", 256))
    result = evaluate(
        ckpt.model, tokens, ckpt.tokenizer.bytes_per_token, block, batch_size, progress
    )
    return result, what


def checkpoint_tokens(
    ckpt: Checkpoint, data: str | None, split: str | None, max_tokens: int | None
) -> tuple[np.ndarray, dict[str, Any]]:
    """The tokens `evaluate_checkpoint` scores (see there) and a description of them."""
    if max_tokens is not None and max_tokens < 1:
        raise bdh_data.DataError(f"max_tokens must be ≥ 1, got {max_tokens}")
    trained = ckpt.meta.get("train", {})
    source = data or trained.get("data")
    if source is None:
        raise bdh_data.DataError("the checkpoint does not name its data; pass --data SOURCE")
    if split is None:
        split = "all" if data is not None and Path(data).is_file() else "val"
    tokens = bdh_data.tokenize_split(source, split, ckpt.tokenizer)  # a file streams
    bdh_data.check_tokens(tokens, 1, ckpt.config.vocab_size, f"the {split} split of {source}")
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]  # max_tokens targets, each with its context
    return tokens, {"checkpoint": str(ckpt.path), "data": source, "split": split}


# ---------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    status: str  # "done" or "interrupted" (a diverged run raises TrainingDiverged)
    step: int
    checkpoint: Path | None
    last_loss: float | None
    val: EvalResult | None
    signal: int | None = None  # what interrupted the run: SIGINT (Ctrl-C) or SIGTERM


@dataclass
class _Run:
    """What the loop works on; built fresh or restored from a checkpoint."""

    cfg: TrainConfig
    model: nn.Module
    model_config: Any
    tokenizer: Tokenizer
    optimizer: torch.optim.Optimizer
    sampler: bdh_data.RandomBatches | bdh_data.StreamBatches
    train_tokens: np.ndarray | bdh_data.TokenFile
    val_tokens: np.ndarray | bdh_data.TokenFile
    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    stepper: distributed.Stepper | None = None  # this rank's micro-batches (see _train_step)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> Any:
    """The preset of cfg.model, with the fields of cfg.config_file applied over it."""
    kind = model_kind(cfg.model)
    fields: dict[str, Any] = {"vocab_size": vocab_size}
    if cfg.config_file is not None:
        fields |= _read_json_object(cfg.config_file)
    return preset_config(kind.config_class, cfg.preset, **fields)  # ladder sizes too


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of config fields")
    return data


def _prepare_data(
    cfg: TrainConfig, tokenizer: Tokenizer | None, log: Callable[[str], None]
) -> tuple[Tokenizer, np.ndarray | bdh_data.TokenFile, np.ndarray | bdh_data.TokenFile]:
    if tokenizer is None and cfg.tokenizer == "bytes":
        tokenizer = train_tokenizer("bytes", [])
    if tokenizer is not None and bdh_data.is_file_source(cfg.data):
        # A single file streams from disk: a multi-gigabyte file is never held in memory.
        train_tokens = bdh_data.tokenize_split(cfg.data, "train", tokenizer)
        val_tokens = bdh_data.tokenize_split(cfg.data, "val", tokenizer)
        log(
            f"[data] {cfg.data}: train {len(train_tokens):,} tokens (1 docs),"
            f" val {len(val_tokens):,} tokens ({cfg.data})"
        )
        return tokenizer, train_tokens, val_tokens
    corpus = bdh_data.load_corpus(cfg.data)
    if tokenizer is None:
        tokenizer = train_tokenizer(
            cfg.tokenizer, [corpus.train.decode("utf-8", "replace")], cfg.bpe_vocab_size
        )
    train_tokens = bdh_data.tokenize_cached(corpus.train, tokenizer)
    val_tokens = bdh_data.tokenize_cached(corpus.val, tokenizer)
    log(
        f"[data] {cfg.data}: train {len(train_tokens):,} tokens ({len(corpus.train_docs)} docs),"
        f" val {len(val_tokens):,} tokens ({', '.join(corpus.val_docs)})"
    )
    return tokenizer, train_tokens, val_tokens


def _limit_val(
    cfg: TrainConfig, val_tokens: np.ndarray | bdh_data.TokenFile
) -> np.ndarray | bdh_data.TokenFile:
    """The validation tokens the run may read: all, or the first val_limit predictions."""
    return val_tokens if cfg.val_limit is None else val_tokens[: cfg.val_limit + 1]


def _check_data(run: _Run) -> None:
    V, T = run.model_config.vocab_size, run.cfg.block_size
    bdh_data.check_tokens(run.train_tokens, T, V, f"the train split of {run.cfg.data}")
    bdh_data.check_tokens(run.val_tokens, T, V, f"the validation split of {run.cfg.data}")


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Weight decay on every parameter, as the reference's AdamW(lr, weight_decay=0.1).
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
    )


def _new_run(cfg: TrainConfig, log: Callable[[str], None]) -> _Run:
    resolve_model_config(cfg, 256)  # a bad preset or config file fails before data is read
    tokenizer, train_tokens, val_tokens = _prepare_data(cfg, None, log)
    model_config = resolve_model_config(cfg, tokenizer.vocab_size)
    check_fits_in_memory(model_config, "the model config", copies=4)  # weights, grads, AdamW
    _seed_everything(cfg.seed)
    model = model_kind(cfg.model).build(model_config)
    sampler = bdh_data.make_batches(
        cfg.batches, train_tokens, cfg.batch_size, cfg.block_size, cfg.seed
    )
    return _Run(
        cfg, model, model_config, tokenizer, _optimizer(model, cfg), sampler,
        train_tokens, _limit_val(cfg, val_tokens), stepper=distributed.Stepper(model, cfg),
    )  # fmt: skip


def _resumed_run(cfg: TrainConfig, overrides: dict[str, Any], log: Callable[[str], None]) -> _Run:
    """Restore a run from cfg.out; settings given in `overrides` replace the saved ones."""
    ckpt = load_checkpoint(Path(cfg.out) / RUN_SUBDIR, training=True)
    if not isinstance(ckpt.meta.get("train"), dict):
        raise CheckpointError(
            f"{ckpt.path} holds no training settings (not written by `bdh train`): cannot resume"
        )
    # The run directory is the one resumed from: a path saved inside a checkpoint (which may come
    # from anyone) never decides where this run writes.
    cfg = _settings(ckpt, {**ckpt.meta["train"], **overrides, "out": cfg.out})
    tokenizer, train_tokens, val_tokens = _prepare_data(cfg, ckpt.tokenizer, log)
    sampler = bdh_data.make_batches(
        cfg.batches, train_tokens, cfg.batch_size, cfg.block_size, cfg.seed
    )
    optimizer = _optimizer(ckpt.model, cfg)
    run = _Run(
        cfg, ckpt.model, ckpt.config, tokenizer, optimizer, sampler, train_tokens,
        _limit_val(cfg, val_tokens), stepper=distributed.Stepper(ckpt.model, cfg),
    )  # fmt: skip
    try:
        _restore_training(run, ckpt)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the training state in {ckpt.path} is malformed: {e!r}") from None
    log(f"[train] resumed {cfg.out} at step {run.step}")
    return run


def _settings(ckpt: Checkpoint, settings: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.from_dict(settings)
    except TypeError as e:
        raise CheckpointError(f"{ckpt.path}: malformed training settings: {e}") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _training_state(run: _Run) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "step": run.step,
        "tokens_seen": run.tokens_seen,
        "elapsed": run.elapsed,
        "data": run.sampler.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
        },
        "stepper": run.stepper.state_dict(),  # collective: every rank calls _save
    }


def _restore_training(run: _Run, ckpt: Checkpoint) -> None:
    state = ckpt.training
    run.step, run.tokens_seen, run.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
    run.sampler.load_state_dict(state["data"])
    _load_optimizer(run.optimizer, state["optimizer"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["rng"]["torch"])
    run.stepper.load_state_dict(state.get("stepper", {}))


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer state that must look like the fresh one: the same kinds of
    settings and, for every parameter, tensors shaped like it (a damaged state fails here with
    a message, not in the middle of a step)."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, before in zip(optimizer.param_groups, fresh, strict=True):
        for key, value in before.items():
            if not _same_kind(group.get(key), value):
                raise ValueError(f"optimizer setting {key} is {group.get(key)!r}")
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                shape = (1,) if name == "step" else tuple(p.shape)  # AdamW: a count, moments
                if not isinstance(value, Tensor) or tuple(value.shape or (1,)) != shape:
                    raise ValueError(f"optimizer {name} does not match its parameter {p.shape}")


def _same_kind(a: Any, b: Any) -> bool:
    """Both numbers, both sequences of the same length and kinds, or the same type."""
    number = (int, float)
    if isinstance(b, number) and not isinstance(b, bool):
        return isinstance(a, number) and not isinstance(a, bool)
    if isinstance(b, (list, tuple)):
        return (
            isinstance(a, (list, tuple))
            and len(a) == len(b)
            and all(_same_kind(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b)


def _save(run: _Run) -> Path:
    meta = {"train": run.cfg.to_dict(), "step": run.step, "tokens_seen": run.tokens_seen}
    training = _training_state(run)
    try:
        if not run.stepper.is_main:  # rank 0 writes; the others only took part in the gathers
            return run.run_dir / RUN_SUBDIR
        return save_checkpoint(
            run.run_dir / RUN_SUBDIR,
            run.model,
            run.cfg.model,
            run.tokenizer,
            meta=meta,
            training=training,
        )
    finally:
        run.stepper.barrier()  # no rank reads the checkpoint before it is complete


def _train_step(run: _Run, lr: float) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches; returns (mean loss, gradient norm)."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total, stepper = 0.0, run.stepper
    for i in range(cfg.grad_accum):
        x, y = stepper.next_batch(run.sampler)  # this rank's rows of the global batch
        with stepper.sync(last=i == cfg.grad_accum - 1):
            loss = stepper.loss(x, y)
            if not stepper.all_finite(loss):
                return float(loss.detach()), float("nan")
            (loss / cfg.grad_accum).backward()
        stepper.after_backward()
        total += stepper.mean(loss.item())
    params = [p for p in run.model.parameters() if p.grad is not None]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if math.isfinite(norm):
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total / cfg.grad_accum, norm


class _MetricsLog:
    """metrics.jsonl: one JSON object per training step or evaluation."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Records past the resumed step come from a run that went on after its last checkpoint;
        # they are replaced by the resumed run's own.
        kept = []
        if resume_step and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in kept if _record_step(ln) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self._file = open(path, "a")  # noqa: SIM115 - open for the whole run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _record_step(line: str) -> float:
    """The step of a metrics record; a line torn by a crash or a full disk counts as past."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and what schedulers send


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, Any]]:
    """The first Ctrl-C or SIGTERM asks the loop to save and stop after the current step; a
    second one interrupts at once. Signal handlers can only be set from the main thread."""
    flag: dict[str, Any] = {"stop": False, "signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"], flag["signal"] = True, signum

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Own `run_dir` for this process: a second training into it is refused with a message.

    An advisory lock (flock) on RUN/.lock: the kernel releases it when the process ends, however
    it ends, so a crashed or killed run never leaves a stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not guarded
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunLocked(
                f"{run_dir} is in use by another `bdh train` (pid {owner}); wait for it to"
                " finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def train(
    cfg: TrainConfig,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume) the run of `cfg`; with resume, `overrides` replace saved settings.

    Process-wide settings are scoped to the call: torch's thread count (`choose_threads`) and
    glibc's retention of freed memory (`bdh.speed.freed_memory_retained`) are restored on return.
    """
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume, overrides, progress, log)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    resume: bool,
    overrides: dict[str, Any] | None,
    progress: bool,
    log: Callable[[str], None],
) -> TrainResult:
    if not resume and Path(cfg.data).exists():
        # The checkpoint names its data; an absolute path keeps `bdh eval` working from anywhere.
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    if not distributed.world().is_main:  # rank 0 speaks for the run
        log, progress = _quiet, False
    owner = run_lock(Path(cfg.out)) if distributed.world().is_main else contextlib.nullcontext()
    with owner:
        return _train_owned(cfg, resume, overrides or {}, progress, log)


def _train_owned(
    cfg: TrainConfig,
    resume: bool,
    overrides: dict[str, Any],
    progress: bool,
    log: Callable[[str], None],
) -> TrainResult:
    run = _resumed_run(cfg, overrides, log) if resume else _new_run(cfg, log)
    _check_data(run)
    torch.set_num_threads(choose_threads(run.cfg.threads, log))  # the resumed run's setting
    log(f"[train] model {run.cfg.model}: {_num_params(run.model):,} parameters")
    log(f"[train] model config {json.dumps(run.model_config.to_dict())}")
    log(f"[train] training config {json.dumps(run.cfg.to_dict())}")
    metrics = (
        _MetricsLog(run.run_dir / METRICS_FILE, run.step)
        if run.stepper.is_main
        else distributed.NullLog()
    )
    try:
        # Every step frees and re-allocates the same activations; keeping the freed memory in the
        # process spares the page faults of fresh allocations (bdh.speed), results unchanged.
        with _stop_on_signals() as flag, freed_memory_retained():
            return _loop(run, metrics, flag, progress, log)
    finally:
        metrics.close()


def _quiet(message: str) -> None:
    pass


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _loop(
    run: _Run,
    metrics: _MetricsLog,
    flag: dict[str, bool],
    progress: bool,
    log: Callable[[str], None],
) -> TrainResult:
    from tqdm.auto import tqdm

    cfg = run.cfg
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not progress, file=sys.stderr)
    say = bar.write if progress else log
    loss, val, ckpt = None, None, None
    run.model.train()
    while run.step < cfg.max_steps and time_fraction(cfg, run.elapsed) < 1:
        lr = lr_at(run.step, cfg, run.elapsed)
        start = time.perf_counter()
        loss, norm = _train_step(run, lr)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            bar.close()
            raise TrainingDiverged(
                f"stopped at step {run.step + 1}: loss {loss}, gradient norm {norm} (not finite);"
                f" the last checkpoint in {run.run_dir / RUN_SUBDIR} is kept -- try a lower --lr"
            )
        dt = run.stepper.agree_seconds(time.perf_counter() - start)
        flag["stop"] = run.stepper.agree_stop(flag["stop"])
        run.step, run.tokens_seen, run.elapsed = (
            run.step + 1, run.tokens_seen + tokens_per_step, run.elapsed + dt
        )  # fmt: skip
        record = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": norm}
        record |= {"tokens": run.tokens_seen, "tok_per_s": round(tokens_per_step / dt, 1)}
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
        if not progress and run.step % cfg.log_interval == 0:
            rate = run.tokens_seen / max(run.elapsed, 1e-9)
            log(f"step {run.step}: loss {loss:.4f}, lr {lr:.2e}, {rate:,.0f} tok/s")
        last = run.step == cfg.max_steps or time_fraction(cfg, run.elapsed) >= 1
        if (run.step % cfg.eval_interval == 0 or last) and run.stepper.is_main:
            val = estimate(run.model, run.val_tokens, run.tokenizer.bytes_per_token, cfg)
            metrics.write({"step": run.step, "val_loss": val.loss, "val_bpb": val.bpb})
            say(f"step {run.step}: loss {loss:.4f}, val loss {val.loss:.4f}, val bpb {val.bpb:.3f}")
        if run.step % cfg.ckpt_interval == 0 or last or flag["stop"]:
            ckpt = _save(run)
        if flag["stop"]:
            bar.close()
            say(f"[train] interrupted at step {run.step}; saved {ckpt}; continue with --resume")
            return TrainResult("interrupted", run.step, ckpt, loss, val, flag.get("signal"))
    bar.close()
    if ckpt is None:  # nothing left to do (resumed at max_steps)
        ckpt = run.run_dir / RUN_SUBDIR
    return TrainResult("done", run.step, ckpt, loss, val)
