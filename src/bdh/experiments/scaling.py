"""BDH against the parameter-matched GPT at several sizes (the paper's Fig. 7, at CPU scale).

For each size of the ladder (`bdh.baseline.presets`), both models train through `bdh.train` on the
same bytes with the same token budget, batches and schedule. The protocol a reviewer asks for:

- **Learning rate per model and size.** Each model trains at every rate of `lrs` with the first
  `select_seeds` seeds; the rate with the lowest mean loss on the *validation slice* is chosen.
  The remaining seeds then train at the chosen rate only (their losses never chose anything).
- **Two held-out slices.** The validation split's first `val_tokens` tokens are the validation
  slice: the trainer's periodic estimates (`TrainConfig.val_limit`) and the choice of rate read
  only them. The next `test_tokens` tokens are the test slice, read once, after every rate has
  been chosen, to score the chosen runs.
- **Three views of the gap BDH − GPT** (nats per byte; negative: BDH is better), each as mean ±
  standard deviation over seeds, the two models paired by seed:
  - equal tokens: the test-slice loss at the end of training;
  - equal training FLOPs: the validation curves where the cheaper model's budget ends
    (BDH spends ~4x the FLOPs of its GPT per token, so there BDH is a quarter of the way through
    its schedule, still at a high learning rate; this view is therefore kind to the GPT);
  - equal wall-clock on this machine: the same, with time = tokens / the training speed of each
    model measured side by side in one process (free of the drift between separate runs).

Every finished run is kept in `runs/<size>/<model>/lr<lr>-seed<seed>` and reused when the same
configuration is asked again, so the experiment resumes and extends (more seeds, rates or sizes).
`run_scaling` returns the JSON payload; `table_markdown` and `plot` render it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdh.baseline.presets import LADDER, QUICK_LADDER, matched_pair, param_gap
from bdh.config import ConfigError
from bdh.data import DataError
from bdh.experiments.runs import (
    RunRecord,
    final_eval,
    heldout_tokens,
    interpolate,
    machine_info,
    side_by_side_rates,
    train_run,
)
from bdh.figures import save_figure
from bdh.train import TrainConfig, TrainingDiverged

MODELS = ("bdh", "gpt")


@dataclass
class ScalingConfig:
    """One scaling experiment; `quick()` is the CI-sized variant."""

    sizes: list[str] = field(default_factory=lambda: ["360k", "1m"])
    data: str = "shakespeare"  # any bdh.data source; the default corpus by default
    tokens: int = 2_097_152  # training tokens per run (rounded down to whole steps)
    batch_size: int = 8
    block_size: int = 128
    # Peak learning rates tried for each model and size, in half-decade steps. 3e-4 is there
    # because the 1m BDH did best at the lowest rate of 1e-3..1e-2 (1.537 vs 1.543 at 3e-3).
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2])
    # The GPT's own rates (None: `lrs`). It gets 3e-2 too because the 360k GPT did best at 1e-2,
    # the top of the shared grid.
    gpt_lrs: list[float] | None = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    seeds: list[int] = field(default_factory=lambda: [1337, 1338])
    # The first `select_seeds` seeds train at every rate and choose it; the others train only at
    # the chosen rate. 1 costs len(lrs) + len(seeds) - 1 runs per model and size instead of
    # len(lrs) * len(seeds), and leaves the later seeds' losses unbiased by the choice.
    select_seeds: int = 1
    warmup_fraction: float = 0.05
    evals: int = 16  # validation points along each run (the loss-vs-FLOPs and -time curves)
    eval_batches: int = 8  # blocks per validation point (the same blocks for every run)
    val_tokens: int = 65_536  # validation slice: the periodic estimates and the choice of rate
    test_tokens: int = 65_536  # test slice: the next tokens, scored once, after the choice
    rate_rounds: int = 3  # rounds of the side-by-side speed measurement
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
        for name in ("lrs", "gpt_lrs"):
            grid = getattr(self, name)
            if grid is not None and (not grid or any(not lr > 0 for lr in grid)):
                raise ConfigError(f"{name} must be one or more positive rates, got {grid}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be one or more distinct integers, got {self.seeds}")
        if not 1 <= self.select_seeds <= len(self.seeds):
            raise ConfigError(
                f"select_seeds must be in [1, {len(self.seeds)}] (the number of seeds),"
                f" got {self.select_seeds}"
            )
        for name in ("evals", "eval_batches", "val_tokens", "test_tokens", "rate_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.lrs = sorted(float(lr) for lr in self.lrs)
        if self.gpt_lrs is not None:
            self.gpt_lrs = sorted(float(lr) for lr in self.gpt_lrs)

    @classmethod
    def quick(cls, **changes: Any) -> ScalingConfig:
        """The quick ladder for a few seconds per run: a smoke test, not a scaling result."""
        fields: dict[str, Any] = dict(
            sizes=["q70k", "q170k"], tokens=8_192, batch_size=8, block_size=32, evals=4,
            gpt_lrs=None, eval_batches=2, val_tokens=2_048, test_tokens=2_048, rate_rounds=1,
            runs="runs/scaling-quick", seeds=[1337, 1338], lrs=[1e-3, 3e-3, 1e-2],
        )  # fmt: skip
        return cls(**{**fields, **changes})

    def lrs_of(self, model: str) -> list[float]:
        return self.gpt_lrs if model == "gpt" and self.gpt_lrs is not None else self.lrs

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.block_size)

    def train_config(self, model: str, size: str, lr: float, seed: int) -> TrainConfig:
        """One run's trainer settings; the runs of a size differ only in model, lr and seed."""
        data = str(Path(self.data).resolve()) if Path(self.data).exists() else self.data
        return TrainConfig(
            data=data, out=str(Path(self.runs) / size / model / run_name(lr, seed)),
            model=model, preset=size, max_steps=self.steps, batch_size=self.batch_size,
            block_size=self.block_size, lr=lr,
            warmup_steps=max(1, round(self.warmup_fraction * self.steps)),
            eval_interval=max(1, self.steps // self.evals), eval_batches=self.eval_batches,
            val_limit=self.val_tokens, ckpt_interval=self.steps, seed=seed, threads=self.threads,
        )  # fmt: skip


def run_name(lr: float, seed: int) -> str:
    return f"lr{lr:g}-seed{seed}"


# ---------------------------------------------------------------------------- held-out slices


def validation_slice(cfg: ScalingConfig) -> np.ndarray:
    """The first val_tokens predictions of the validation split: all the selection may read."""
    return heldout_tokens(_data(cfg), cfg.val_tokens)


def test_slice(cfg: ScalingConfig) -> np.ndarray:
    """The test_tokens predictions after the validation slice. Read once, after selection."""
    tokens = heldout_tokens(_data(cfg), cfg.val_tokens + cfg.test_tokens)
    if len(tokens) < cfg.val_tokens + cfg.test_tokens + 1:
        raise DataError(
            f"the validation split of {cfg.data} has {len(tokens) - 1:,} predictions; the"
            f" validation and test slices need {cfg.val_tokens + cfg.test_tokens:,}"
            " (lower --val-tokens / --test-tokens)"
        )
    return tokens[cfg.val_tokens :]


def _data(cfg: ScalingConfig) -> str:
    return cfg.train_config("bdh", cfg.sizes[0], cfg.lrs[0], cfg.seeds[0]).data


# ---------------------------------------------------------------------------- the experiment


def run_scaling(cfg: ScalingConfig, log: Any = print) -> dict[str, Any]:
    """Sweep, choose, test; returns the JSON payload (config, sweep, choice, runs, rows)."""
    if cfg.threads:  # the trainer sets the same for each run; the speed measurement uses it too
        torch.set_num_threads(cfg.threads)
    machine = machine_info()
    log(f"[scaling] config {dataclasses.asdict(cfg)}")
    log("[scaling] machine " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    started = time.perf_counter()
    val = validation_slice(cfg)
    test_slice(cfg)  # fails early on a split too short for both slices; the tokens are dropped
    sweep: dict[str, dict[str, dict[str, Any]]] = {}
    chosen: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, dict[int, RunRecord]]] = {}
    every: list[RunRecord] = []  # every run of the sweep, chosen or not
    for size in cfg.sizes:
        sweep[size], chosen[size], runs[size] = {}, {}, {}
        for model in MODELS:
            tuned = _tune(cfg, size, model, val, log)
            sweep[size][model], chosen[size][model], runs[size][model] = tuned[:3]
            every += tuned[3]
    # Every rate is chosen: only now is the test slice read.
    test = test_slice(cfg)
    log(f"[scaling] rates chosen: {chosen}; scoring the chosen runs on the test slice")
    for record in (r for s in runs.values() for m in s.values() for r in m.values()):
        record.final = {**record.final, **final_eval(record, test, cfg.block_size)}
    rates = {}
    for size in cfg.sizes:
        log(f"[scaling] {size}: measuring training speed side by side")
        pair = [cfg.train_config(m, size, chosen[size][m], cfg.seeds[0]) for m in MODELS]
        rates[size] = side_by_side_rates(pair, rounds=cfg.rate_rounds, seed=cfg.seeds[0])
    grids = {m: cfg.lrs_of(m) for m in MODELS}
    rows = [summarise(size, runs[size], rates[size], chosen[size], grids) for size in cfg.sizes]
    return {
        "experiment": "scaling",
        "config": dataclasses.asdict(cfg),
        "machine": machine,
        "slices": {
            "validation": [0, cfg.val_tokens],
            "test": [cfg.val_tokens, cfg.val_tokens + cfg.test_tokens],
        },
        "sweep": sweep,
        "chosen_lr": chosen,
        "rows": rows,
        "runs": {
            s: {m: {str(seed): r.to_dict() for seed, r in per.items()} for m, per in pair.items()}
            for s, pair in runs.items()
        },
        # CPU seconds of every run's training, this call's and earlier ones'
        "cpu_s": sum(r.cpu_s for r in every if r.cpu_s is not None),
        "cpu_s_unrecorded_runs": sum(r.cpu_s is None for r in every),
        # and the trainers' own clocks (training steps only), known for every run
        "train_s": sum(r.wall_s for r in every),
        "runs_trained": sum(not r.reused for r in every),
        "runs_reused": sum(r.reused for r in every),
        "wall_s": time.perf_counter() - started,
    }


def _tune(
    cfg: ScalingConfig, size: str, model: str, val: np.ndarray, log: Any
) -> tuple[dict[str, Any], float, dict[int, RunRecord], list[RunRecord]]:
    """Train `model` at every rate with the selecting seeds, choose, then train the other seeds.

    Returns the sweep ({lr: validation losses per seed, None where the run diverged}), the chosen
    rate, the chosen rate's runs by seed, and every run trained or reused for this.
    """
    selecting, later = cfg.seeds[: cfg.select_seeds], cfg.seeds[cfg.select_seeds :]
    sweep: dict[str, Any] = {}
    records: dict[float, dict[int, RunRecord | None]] = {}
    for lr in cfg.lrs_of(model):
        records[lr] = {s: _train(cfg, size, model, lr, s, val, log) for s in selecting}
        losses = [None if r is None else r.final["val_loss"] for r in records[lr].values()]
        sweep[f"{lr:g}"] = {"seeds": selecting, "val_loss": losses}
    best = choose_lr({lr: sweep[f"{lr:g}"]["val_loss"] for lr in cfg.lrs_of(model)})
    if best is None:
        raise RuntimeError(f"{size} {model}: every learning rate diverged ({cfg.lrs_of(model)})")
    log(f"[scaling] {size} {model}: chose lr {best:g} on the validation slice")
    for seed in later:
        records[best][seed] = _train(cfg, size, model, best, seed, val, log)
    chosen = {s: r for s, r in records[best].items() if r is not None}
    if len(chosen) < len(cfg.seeds):
        raise RuntimeError(f"{size} {model}: a seed diverged at the chosen lr {best:g}")
    every = [r for by_seed in records.values() for r in by_seed.values() if r is not None]
    return {"lrs": sweep}, best, chosen, every


def _train(
    cfg: ScalingConfig, size: str, model: str, lr: float, seed: int, val: np.ndarray, log: Any
) -> RunRecord | None:
    """One run with its validation-slice loss; None if its loss became NaN or infinite."""
    train_cfg = cfg.train_config(model, size, lr, seed)
    log(f"[scaling] {size} {model} lr {lr:g} seed {seed}: {cfg.steps} steps")
    try:
        record = train_run(train_cfg, log=log, reuse=cfg.reuse)
    except TrainingDiverged as e:
        log(f"[scaling] {size} {model} lr {lr:g} seed {seed}: diverged ({e})")
        return None
    record.final = {"val_loss": final_eval(record, val, cfg.block_size)["loss"]}
    log(f"[scaling] {size} {model} lr {lr:g} seed {seed}: validation loss "
        f"{record.final['val_loss']:.4f}")  # fmt: skip
    return record


def choose_lr(val_losses: dict[float, list[float | None]]) -> float | None:
    """The rate with the lowest mean validation loss over seeds (the lower rate on a tie); a rate
    with a diverged run (None or NaN) never wins. None if every rate diverged."""

    def mean(lr: float) -> float:
        losses = val_losses[lr]
        if any(v is None or not math.isfinite(v) for v in losses):
            return math.inf
        return statistics.fmean(losses)

    best = min(val_losses, key=lambda lr: (mean(lr), lr))
    return None if mean(best) == math.inf else best


# ---------------------------------------------------------------------------- summary


def summarise(
    size: str,
    runs: dict[str, dict[int, RunRecord]],
    rates: dict[str, float],
    chosen: dict[str, float],
    grids: dict[str, list[float]],
) -> dict[str, Any]:
    """One row: the chosen rates and the three views of the gap, paired by seed."""
    seeds = sorted(set(runs["bdh"]) & set(runs["gpt"]))
    bdh_cfg, gpt_cfg = matched_pair(size)
    first = runs["bdh"][seeds[0]]
    views = {
        "equal_tokens": _view(runs, seeds, lambda b, g: (b.final["loss"], g.final["loss"])),
        "equal_flops": _view(runs, seeds, equal_flops),
        "equal_time": _view(runs, seeds, lambda b, g: equal_time_by_rate(b, g, rates)),
    }
    views["equal_tokens"]["tokens"] = first.tokens
    views["equal_flops"]["flops"] = min(first.train_flops, runs["gpt"][seeds[0]].train_flops)
    views["equal_time"]["seconds"] = _equal_seconds(first, runs["gpt"][seeds[0]], rates)
    return {
        "size": size,
        "params": {"bdh": first.params, "gpt": runs["gpt"][seeds[0]].params},
        "param_gap": param_gap(bdh_cfg, gpt_cfg),
        "lr": dict(chosen),
        "lr_at_edge": {
            m: chosen[m] in (grids[m][0], grids[m][-1]) and len(grids[m]) > 1 for m in MODELS
        },
        "seeds": seeds,
        "bpb": {m: _spread([runs[m][s].final["bpb"] for s in seeds]) for m in MODELS},
        "train_flops": {m: runs[m][seeds[0]].train_flops for m in MODELS},
        "wall_s": {m: _spread([runs[m][s].wall_s for s in seeds]) for m in MODELS},
        "rates_tok_s": rates,
        **views,
    }


def _view(runs: dict[str, dict[int, RunRecord]], seeds: list[int], pick: Any) -> dict[str, Any]:
    """Per seed (BDH, GPT) losses -> mean ± sd of each and of their paired difference."""
    pairs = [pick(runs["bdh"][s], runs["gpt"][s]) for s in seeds]
    if any(b is None or g is None for b, g in pairs):
        return {"bdh": None, "gpt": None, "gap": None}
    return {
        "bdh": _spread([b for b, _ in pairs]),
        "gpt": _spread([g for _, g in pairs]),
        "gap": _spread([b - g for b, g in pairs]),
    }


def _spread(values: list[float]) -> dict[str, Any]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "values": values}


def equal_flops(bdh: RunRecord, gpt: RunRecord) -> tuple[float | None, float | None]:
    """Validation losses where the cheaper run's training FLOPs ran out."""
    flops = min(bdh.train_flops, gpt.train_flops)
    return (
        interpolate(bdh.curve, "tokens", flops / (bdh.train_flops / bdh.tokens)),
        interpolate(gpt.curve, "tokens", flops / (gpt.train_flops / gpt.tokens)),
    )


def equal_time_by_rate(
    bdh: RunRecord, gpt: RunRecord, rates: dict[str, float]
) -> tuple[float | None, float | None]:
    """The same at equal time: time = tokens / (tokens per second measured side by side)."""
    t = _equal_seconds(bdh, gpt, rates)
    return (
        interpolate(bdh.curve, "tokens", t * rates["bdh"]),
        interpolate(gpt.curve, "tokens", t * rates["gpt"]),
    )


def _equal_seconds(bdh: RunRecord, gpt: RunRecord, rates: dict[str, float]) -> float:
    return min(bdh.tokens / rates["bdh"], gpt.tokens / rates["gpt"])


# ---------------------------------------------------------------------------- outputs


def table_markdown(payload: dict[str, Any]) -> str:
    """The README tables: the three views per size, then the learning-rate sweep."""
    seeds = len(payload["config"]["seeds"])
    head = (
        f"Losses in nats/byte, mean ± sd over {seeds} seeds; gap = BDH − GPT, paired by seed.\n\n"
        "| size | params BDH / GPT | lr BDH / GPT | equal tokens: BDH / GPT | gap "
        "| equal FLOPs: BDH / GPT | gap | equal wall-clock: BDH / GPT | gap |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [_row(r) for r in payload["rows"]]
    return head + "\n".join(lines) + "\n\n" + sweep_markdown(payload)


def _row(r: dict[str, Any]) -> str:
    p, lr, edge = r["params"], r["lr"], r["lr_at_edge"]
    lrs = " / ".join(f"{lr[m]:g}{'*' if edge[m] else ''}" for m in MODELS)
    tok, fl, tm = r["equal_tokens"], r["equal_flops"], r["equal_time"]
    return (
        f"| {r['size']} | {p['bdh']:,} / {p['gpt']:,} | {lrs}"
        f" | {_pair(tok)} at {tok['tokens']:,} tokens | {_pm(tok['gap'], signed=True)}"
        f" | {_pair(fl)} at {fl['flops']:.2e} | {_pm(fl['gap'], signed=True)}"
        f" | {_pair(tm)} at {_duration(tm['seconds'])} | {_pm(tm['gap'], signed=True)} |"
    )


def sweep_markdown(payload: dict[str, Any]) -> str:
    """Validation-slice loss of every rate (the first seeds), the chosen one in bold."""
    lrs = sorted(set(payload["config"]["lrs"]) | set(payload["config"]["gpt_lrs"] or []))
    head = "| size | model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |\n"
    head += "|---|---|" + "---|" * len(lrs) + "\n"
    lines = []
    for size, models in payload["sweep"].items():
        for model, by_lr in models.items():
            best = payload["chosen_lr"][size][model]
            cells = []
            for lr in lrs:
                if f"{lr:g}" not in by_lr["lrs"]:
                    cells.append("–")  # not in this model's grid
                    continue
                text = _loss(_mean(by_lr["lrs"][f"{lr:g}"]["val_loss"]))
                cells.append(f"**{text}**" if lr == best else text)
            lines.append(f"| {size} | {model.upper()} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _pair(view: dict[str, Any]) -> str:
    if view["bdh"] is None:
        return "n/a"
    return f"{_pm(view['bdh'])} / {_pm(view['gpt'])}"


def _pm(stat: dict[str, Any] | None, signed: bool = False) -> str:
    if stat is None:
        return "n/a"
    mean = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
    return f"{mean} ± {stat['sd']:.3f}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _loss(value: float) -> str:
    return "diverged" if not math.isfinite(value) else f"{value:.3f}"


def _mean(losses: list[float | None]) -> float:
    """Mean over seeds; NaN if a run diverged (a gap in the plot, "diverged" in the table)."""
    if any(v is None for v in losses):
        return math.nan
    return statistics.fmean(losses)


def plot(payload: dict[str, Any], path: str | Path) -> Path:
    """Four panels: the sweep, and loss at equal tokens, against FLOPs and against time."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    _plot_sweep(axes[0][0], payload)
    _plot_equal_tokens(axes[0][1], payload)
    _plot_curves(axes[1][0], payload, "flops")
    _plot_curves(axes[1][1], payload, "seconds")
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


COLORS = {"bdh": "tab:red", "gpt": "tab:blue"}


def _plot_sweep(ax: Any, payload: dict[str, Any]) -> None:
    styles = ["o-", "s--", "^:", "d-."]
    for i, (size, models) in enumerate(payload["sweep"].items()):
        for model, by_lr in models.items():
            lrs = sorted(float(lr) for lr in by_lr["lrs"])
            losses = [_mean(by_lr["lrs"][f"{lr:g}"]["val_loss"]) for lr in lrs]
            ax.plot(lrs, losses, styles[i % len(styles)], color=COLORS[model],
                    label=f"{model.upper()} {size}")  # fmt: skip
            best = payload["chosen_lr"][size][model]
            ax.plot([best], [losses[lrs.index(best)]], "*", ms=14, color=COLORS[model], mfc="none")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation-slice loss (nats/byte)")
    ax.set_title("learning-rate sweep (selecting seed; ☆ chosen)")
    ax.legend(fontsize=7)


def _plot_equal_tokens(ax: Any, payload: dict[str, Any]) -> None:
    for model in MODELS:
        rows = payload["rows"]
        params = [r["params"][model] for r in rows]
        mean = [r["equal_tokens"][model]["mean"] for r in rows]
        sd = [r["equal_tokens"][model]["sd"] for r in rows]
        ax.errorbar(params, mean, yerr=sd, fmt="o-", capsize=3, color=COLORS[model],
                    label=f"{model.upper()} (best lr)")  # fmt: skip
    tokens = payload["rows"][0]["equal_tokens"]["tokens"]
    ax.set(xscale="log", xlabel="parameters", ylabel="test-slice loss (nats/byte)")
    ax.set_title(f"equal tokens ({tokens:,} per run)")
    ax.legend()


def _plot_curves(ax: Any, payload: dict[str, Any], x: str) -> None:
    """Validation curves of the chosen runs, every seed, against FLOPs or side-by-side time."""
    sizes = list(payload["runs"])
    rates = {r["size"]: r["rates_tok_s"] for r in payload["rows"]}
    for i, size in enumerate(sizes):
        alpha = 0.35 + 0.65 * (i + 1) / len(sizes)
        for model in MODELS:
            for j, run in enumerate(payload["runs"][size][model].values()):
                per_token = run["train_flops"] / run["tokens"]
                scale = per_token if x == "flops" else 1.0 / rates[size][model]
                xs = [p["tokens"] * scale for p in run["curve"]]
                label = f"{model.upper()} {size}" if j == 0 else None
                ys = [p["val_loss"] for p in run["curve"]]
                ax.plot(xs, ys, color=COLORS[model], alpha=alpha, label=label)
    for row in payload["rows"]:  # where the cheaper model's budget ends: the comparison point
        at = row["equal_flops"]["flops"] if x == "flops" else row["equal_time"]["seconds"]
        ax.axvline(at, color="gray", ls=":", lw=1)
    xlabel = "training FLOPs" if x == "flops" else "training time on this machine (s)"
    ax.set(xscale="log", xlabel=xlabel, ylabel="validation-slice loss (nats/byte)")
    ax.set_title("equal FLOPs" if x == "flops" else "equal wall-clock (side-by-side speeds)")
    ax.legend(fontsize=7, ncol=2)
