"""What every experiment does with a training run: train it through `bdh.train`, read its curve,
evaluate it on a held-out slice, and time models side by side.

The experiments compare BDH with the GPT baseline through exactly the harness a user has: the same
`TrainConfig`, trainer, checkpoint format and evaluation. Nothing here trains differently.

Wall-clock time on a shared machine is noisy: another process may take a core for the length of one
run and not the next. Runs record their own clock (the trainer's sum of step times) and the
process's CPU time; `side_by_side_rates` measures the models' training speed interleaved in one
process, so their ratio is free of that drift.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdh import data as bdh_data
from bdh.baseline.presets import flops_per_token
from bdh.checkpoint import RUN_SUBDIR, load_checkpoint, model_kind, read_config
from bdh.train import (
    METRICS_FILE,
    TrainConfig,
    TrainingDiverged,
    evaluate,
    resolve_model_config,
    train,
)

CPU_FILE = "cpu.json"  # beside checkpoint/ and metrics.jsonl: the CPU seconds the run took
DIVERGED_FILE = "diverged.json"  # the settings of a run whose loss became NaN or infinite


def shared_data_dir() -> Path:
    """$BDH_SHARED_DATA, else ../shared/data next to the repository this package runs from."""
    if os.environ.get("BDH_SHARED_DATA"):
        return Path(os.environ["BDH_SHARED_DATA"])
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass
class RunRecord:
    """One finished training run, as the experiments report it."""

    model: str  # "bdh" or "gpt"
    preset: str
    params: int
    tokens: int  # training tokens
    steps: int
    wall_s: float  # the trainer's clock: training steps only
    # Process CPU time of the train() calls that made the run (resumed parts added up; None for a
    # run trained before this was recorded), kept in the run directory so reuse reports it too.
    cpu_s: float | None
    train_flops: float  # matmul FLOPs of training (bdh.baseline.flops_per_token x tokens)
    curve: list[dict[str, float]]  # {"tokens", "seconds", "val_loss"} at each validation
    final: dict[str, Any] = field(default_factory=dict)  # held-out evaluation
    checkpoint: str = ""
    reused: bool = False  # taken finished from an earlier invocation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_run(cfg: TrainConfig, log: Any = print, reuse: bool = True) -> RunRecord:
    """Train `cfg` and return its record. With `reuse`, a finished run of the same configuration
    in cfg.out is taken as it is, and an interrupted one is resumed (exactly, see `bdh.train`)."""
    ckpt_dir, cpu_file = Path(cfg.out) / RUN_SUBDIR, Path(cfg.out) / CPU_FILE
    diverged_file = Path(cfg.out) / DIVERGED_FILE
    diverged = _read_json(diverged_file) if reuse else {}
    if diverged.get("train") == cfg.to_dict():
        log(f"[experiment] {cfg.out} diverged before with these settings; not trained again")
        raise TrainingDiverged(str(diverged.get("message", "diverged")))
    step = _saved_step(ckpt_dir, cfg) if reuse else None
    reused = step == cfg.max_steps
    if reused:
        log(f"[experiment] reusing the finished run in {cfg.out}")
    else:
        before = _read_cpu(cpu_file) if step is not None else 0.0
        if step is not None:
            log(f"[experiment] resuming the run in {cfg.out} from step {step}")
        start = time.process_time()
        try:
            result = train(cfg, resume=step is not None, progress=False, log=log)
        except TrainingDiverged as e:  # remembered: the same settings diverge the same way
            diverged_file.write_text(json.dumps({"train": cfg.to_dict(), "message": str(e)}))
            raise
        finally:  # an interrupted part counts too
            spent = time.process_time() - start
            if before is not None and cpu_file.parent.is_dir():  # not if nothing was started
                cpu_file.write_text(json.dumps({"cpu_s": before + spent}) + "\n")
        if result.status != "done":
            raise RuntimeError(f"training {cfg.out} stopped: {result.status}")
    meta = read_config(ckpt_dir)["meta"]
    model_config = resolve_model_config(cfg, 256)
    curve = read_curve(Path(cfg.out) / METRICS_FILE, cfg.batch_size * cfg.block_size)
    tokens = int(meta["tokens_seen"])
    return RunRecord(
        model=cfg.model,
        preset=cfg.preset,
        params=int(model_config.num_params),
        tokens=tokens,
        steps=int(meta["step"]),
        wall_s=curve[-1]["seconds"] if curve else 0.0,
        cpu_s=_read_cpu(cpu_file),
        train_flops=flops_per_token(model_config, cfg.block_size) * tokens,
        curve=curve,
        checkpoint=str(ckpt_dir),
        reused=reused,
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON object the experiment keeps beside a run; {} if absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_cpu(path: Path) -> float | None:
    value = _read_json(path).get("cpu_s")
    return float(value) if isinstance(value, int | float) else None


def _saved_step(ckpt_dir: Path, cfg: TrainConfig) -> int | None:
    """The step of a checkpoint of this very configuration (training and model), else None."""
    try:
        saved = read_config(ckpt_dir)
    except (OSError, ValueError):
        return None
    meta, model = saved.get("meta", {}), resolve_model_config(cfg, 256).to_dict()
    same = _shape(saved["config"]) == _shape(model) and meta.get("train") == cfg.to_dict()
    step = meta.get("step")
    return step if same and isinstance(step, int) and 0 < step <= cfg.max_steps else None


def _shape(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "meta"}


def read_curve(metrics: Path, tokens_per_step: int) -> list[dict[str, float]]:
    """Validation points of a run with the training seconds spent to reach them.

    The trainer logs each step's rate; seconds are summed back from it (steps only: validation
    and checkpoints are not training time, as in the trainer's own clock).
    """
    seconds, tokens, curve = 0.0, 0, []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "tok_per_s" in record:
            seconds += tokens_per_step / max(record["tok_per_s"], 1e-9)
            tokens = record["tokens"]
        if "val_loss" in record:  # written right after the step it validates
            curve.append({"tokens": tokens, "seconds": seconds, "val_loss": record["val_loss"]})
    return curve


def interpolate(curve: list[dict[str, float]], key: str, x: float) -> float | None:
    """val_loss at curve[key] == x, linear between validation points; None outside the curve."""
    xs = [p[key] for p in curve]
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p["val_loss"] for p in curve]))


# ---------------------------------------------------------------------------- held-out data


def heldout_tokens(source: str, limit: int) -> np.ndarray:
    """The first `limit` + 1 byte tokens of the validation split of `source` (the same slice for
    every model, so final losses are computed on identical bytes)."""
    from bdh.tokenizer import ByteTokenizer

    corpus = bdh_data.load_corpus(source)
    tokens = bdh_data.tokenize_cached(corpus.val, ByteTokenizer())
    return np.asarray(tokens[: limit + 1])


def final_eval(record: RunRecord, tokens: np.ndarray, block_size: int) -> dict[str, Any]:
    """Loss (nats per byte) and bits per byte of the run's checkpoint on `tokens`."""
    ckpt = load_checkpoint(record.checkpoint)
    result = evaluate(ckpt.model, tokens, ckpt.tokenizer.bytes_per_token, block_size)
    return result.to_dict()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, torch and its threads, the load."""
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------- speed


def side_by_side_rates(
    cfgs: list[TrainConfig], rounds: int = 3, steps: int = 2, seed: int = 0
) -> dict[str, float]:
    """Training tokens per second of each run's model, keyed by cfg.model, measured interleaved.

    Each round times `steps` optimizer steps of every model in a rotating order; the median over
    rounds is kept. Load that comes and goes hits every model alike, unlike separate runs.
    """
    torch.manual_seed(seed)
    cases = {cfg.model: _step_case(cfg) for cfg in cfgs}
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds + 1):  # round 0 warms up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            tokens = sum(cases[name]() for _ in range(steps))
            if r:
                samples[name].append(tokens / (time.perf_counter() - start))
    return {name: statistics.median(s) for name, s in samples.items()}


def _step_case(cfg: TrainConfig) -> Any:
    model = model_kind(cfg.model).build(resolve_model_config(cfg, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x = torch.randint(0, 256, (cfg.batch_size, cfg.block_size + 1))

    def step() -> int:
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x.shape[0] * (x.shape[1] - 1)

    return step
