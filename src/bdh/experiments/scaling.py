"""BDH against the parameter-matched GPT at several sizes (the paper's Fig. 7, at CPU scale).

For each size of the ladder (`bdh.baseline.presets`), both models train through `bdh.train` on the
same bytes with the same token budget, batches, schedule and seed; both are validated on the same
blocks during training and evaluated at the end on the same held-out slice. Reported per size:

- the final validation loss of each model in nats per byte, the gap BDH − GPT in nats and in % of
  the GPT's loss;
- each run's wall-clock training time, CPU time and training FLOPs;
- the loss both reach at equal wall-clock time: BDH spends ~5x the FLOPs of its GPT per token
  (its attention runs in the neuron dimension and its weights are re-applied at every layer),
  so at the time the GPT finishes, BDH has seen fewer tokens. Two clocks are given: each run's
  own (noisy on a shared machine) and training speeds measured side by side in one process.

`run_scaling` returns the JSON payload; `write_outputs` writes it with the plot and the table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdh.baseline.presets import LADDER, QUICK_LADDER, matched_pair, param_gap
from bdh.config import ConfigError
from bdh.experiments.runs import (
    RunRecord,
    final_eval,
    heldout_tokens,
    interpolate,
    side_by_side_rates,
    train_run,
)
from bdh.figures import save_figure
from bdh.train import TrainConfig

MODELS = ("bdh", "gpt")


@dataclass
class ScalingConfig:
    """One scaling experiment; `quick()` is the CI-sized variant."""

    sizes: list[str] = field(default_factory=lambda: ["360k", "1m", "3m"])
    data: str = "shakespeare"  # any bdh.data source; the default corpus by default
    tokens: int = 262_144  # training tokens per run (rounded down to whole steps)
    batch_size: int = 8
    block_size: int = 128
    lr: float = 3e-3
    # The GPT's own peak lr (None: the same as BDH's). Equal settings are the simplest fair
    # protocol, but the deeper GPTs of the ladder prefer a lower lr (see the notes).
    gpt_lr: float | None = None
    warmup_fraction: float = 0.05
    evals: int = 16  # validation points along each run (the loss-vs-time curves)
    eval_batches: int = 4  # blocks per validation point (the same blocks for every run)
    eval_tokens: int = 65_536  # the held-out slice of the final evaluation
    rate_rounds: int = 3  # rounds of the side-by-side speed measurement
    seed: int = 1337
    threads: int = 0
    runs: str = "runs/scaling"  # run directories (checkpoints, metrics)
    reuse: bool = True  # keep finished runs of the same configuration

    def __post_init__(self) -> None:
        known = {**LADDER, **QUICK_LADDER}
        bad = [s for s in self.sizes if s not in known]
        if bad or not self.sizes:
            raise ConfigError(f"unknown ladder size(s) {bad}; choose from {', '.join(known)}")
        if self.steps < 1:
            raise ConfigError(
                f"tokens ({self.tokens}) must cover at least one step of"
                f" batch_size x block_size = {self.batch_size * self.block_size}"
            )
        for name in ("evals", "eval_batches", "eval_tokens", "rate_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def quick(cls, **changes: Any) -> ScalingConfig:
        """The quick ladder for a few seconds per run: a smoke test, not a scaling result."""
        fields: dict[str, Any] = dict(
            sizes=list(QUICK_LADDER), tokens=8_192, batch_size=8, block_size=32, evals=4,
            eval_batches=2, eval_tokens=4_096, rate_rounds=1, runs="runs/scaling-quick",
        )  # fmt: skip
        return cls(**{**fields, **changes})

    def lr_of(self, model: str) -> float:
        return self.gpt_lr if model == "gpt" and self.gpt_lr is not None else self.lr

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.block_size)

    def train_config(self, model: str, size: str) -> TrainConfig:
        """The trainer's settings of one run; the two models of a size differ only in `model`."""
        data = str(Path(self.data).resolve()) if Path(self.data).exists() else self.data
        return TrainConfig(
            data=data, out=str(Path(self.runs) / size / model), model=model, preset=size,
            max_steps=self.steps, batch_size=self.batch_size, block_size=self.block_size,
            lr=self.lr_of(model), warmup_steps=max(1, round(self.warmup_fraction * self.steps)),
            eval_interval=max(1, self.steps // self.evals), eval_batches=self.eval_batches,
            ckpt_interval=self.steps, seed=self.seed, threads=self.threads,
        )  # fmt: skip


def run_scaling(cfg: ScalingConfig, log: Any = print) -> dict[str, Any]:
    """Train and evaluate every pair; returns the JSON payload (config, runs, rows)."""
    heldout = heldout_tokens(cfg.train_config("bdh", cfg.sizes[0]).data, cfg.eval_tokens)
    runs: dict[str, dict[str, RunRecord]] = {}
    rates: dict[str, dict[str, float]] = {}
    for size in cfg.sizes:
        pair = [cfg.train_config(model, size) for model in MODELS]
        log(f"[scaling] {size}: measuring training speed side by side")
        rates[size] = side_by_side_rates(pair, rounds=cfg.rate_rounds, seed=cfg.seed)
        runs[size] = {}
        for train_cfg in pair:
            log(f"[scaling] {size}: training {train_cfg.model} for {cfg.steps} steps")
            record = train_run(train_cfg, log=log, reuse=cfg.reuse)
            record.final = final_eval(record, heldout, cfg.block_size)
            runs[size][train_cfg.model] = record
            log(f"[scaling] {size} {train_cfg.model}: held-out loss {record.final['loss']:.4f}")
    rows = [summarise(size, runs[size], rates[size]) for size in cfg.sizes]
    return {
        "experiment": "scaling",
        "config": dataclasses.asdict(cfg),
        "heldout_tokens": len(heldout) - 1,
        "rows": rows,
        "runs": {s: {m: r.to_dict() for m, r in pair.items()} for s, pair in runs.items()},
    }


def summarise(size: str, pair: dict[str, RunRecord], rates: dict[str, float]) -> dict[str, Any]:
    """One row of the table: final losses, the gap, time, FLOPs, and losses at equal time."""
    bdh, gpt = pair["bdh"], pair["gpt"]
    gap = bdh.final["loss"] - gpt.final["loss"]
    bdh_cfg, gpt_cfg = matched_pair(size)
    return {
        "size": size,
        "params": {"bdh": bdh.params, "gpt": gpt.params},
        "param_gap": param_gap(bdh_cfg, gpt_cfg),
        "loss": {"bdh": bdh.final["loss"], "gpt": gpt.final["loss"]},
        "bpb": {"bdh": bdh.final["bpb"], "gpt": gpt.final["bpb"]},
        "gap_nats": gap,
        "gap_percent": 100.0 * gap / gpt.final["loss"],
        "wall_s": {"bdh": bdh.wall_s, "gpt": gpt.wall_s},
        "cpu_s": {"bdh": bdh.cpu_s, "gpt": gpt.cpu_s},
        "train_flops": {"bdh": bdh.train_flops, "gpt": gpt.train_flops},
        "tokens": bdh.tokens,
        "rates_tok_s": rates,
        "equal_time": {
            "side_by_side": equal_time_by_rate(bdh, gpt, rates),
            "own_clocks": equal_time_by_clock(bdh, gpt),
        },
    }


def equal_time_by_clock(bdh: RunRecord, gpt: RunRecord) -> dict[str, Any]:
    """Validation losses when the faster run ended, on each run's own clock."""
    t = min(bdh.wall_s, gpt.wall_s)
    return {
        "seconds": t,
        "bdh": interpolate(bdh.curve, "seconds", t),
        "gpt": interpolate(gpt.curve, "seconds", t),
    }


def equal_time_by_rate(bdh: RunRecord, gpt: RunRecord, rates: dict[str, float]) -> dict[str, Any]:
    """The same on one clock: time = tokens / (tokens per second measured side by side)."""
    t = min(bdh.tokens / rates["bdh"], gpt.tokens / rates["gpt"])
    return {
        "seconds": t,
        "bdh": interpolate(bdh.curve, "tokens", t * rates["bdh"]),
        "gpt": interpolate(gpt.curve, "tokens", t * rates["gpt"]),
    }


# ---------------------------------------------------------------------------- outputs


def table_markdown(payload: dict[str, Any]) -> str:
    """The README table: one row per size."""
    head = (
        "| size | params BDH / GPT | val loss BDH | val loss GPT | gap (nats/byte) | gap (%) "
        "| wall-clock BDH / GPT | train FLOPs BDH / GPT | loss at equal time: BDH / GPT |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [_row(r) for r in payload["rows"]]
    return head + "\n".join(lines) + "\n"


def _row(r: dict[str, Any]) -> str:
    eq = r["equal_time"]["side_by_side"]
    p, w, f = r["params"], r["wall_s"], r["train_flops"]
    return (
        f"| {r['size']} | {p['bdh']:,} / {p['gpt']:,} | {r['loss']['bdh']:.3f}"
        f" | {r['loss']['gpt']:.3f} | {r['gap_nats']:+.3f} | {r['gap_percent']:+.1f}%"
        f" | {_duration(w['bdh'])} / {_duration(w['gpt'])} | {f['bdh']:.2e} / {f['gpt']:.2e}"
        f" | {_loss(eq['bdh'])} / {_loss(eq['gpt'])} at {_duration(eq['seconds'])} |"
    )


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot(payload: dict[str, Any], path: str | Path) -> Path:
    """Validation loss against parameters (left, like Fig. 7) and against training time (right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"bdh": "tab:red", "gpt": "tab:blue"}
    for model in MODELS:
        params = [r["params"][model] for r in payload["rows"]]
        losses = [r["loss"][model] for r in payload["rows"]]
        left.plot(params, losses, "o-", color=colors[model], label=model.upper())
        for size, alpha in zip(payload["runs"], _alphas(len(payload["runs"])), strict=True):
            curve = payload["runs"][size][model]["curve"]
            right.plot(
                [p["seconds"] for p in curve], [p["val_loss"] for p in curve],
                color=colors[model], alpha=alpha, label=f"{model.upper()} {size}",
            )  # fmt: skip
    tokens = payload["rows"][0]["tokens"]
    left.set(xscale="log", xlabel="parameters", ylabel="validation loss (nats/byte)")
    left.set_title(f"same data, {tokens:,} training tokens per run")
    right.set(xscale="log", xlabel="training wall-clock (s)", ylabel="validation loss (nats/byte)")
    right.set_title("validation loss during training")
    left.legend()
    right.legend(fontsize=7, ncol=2)
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path, dpi=120)


def _alphas(n: int) -> list[float]:
    """Lighter lines for smaller sizes."""
    return [0.35 + 0.65 * (i + 1) / n for i in range(n)]
