"""Loss against position, far past the training block: can the model keep reading?

    bdh experiment length [--quick]

BDH's state has a constant size and no context window (paper §4.2, §6.1), but a model trained on
short windows has only ever read short histories. Each variant below trains on the same bytes for
the same tokens (the parameter-matched ladder size, `bdh.baseline.presets`), then reads held-out
streams of `stream_length` tokens (≥ 16× the training block) from an empty state, the state
carried through, as generation reads; the loss is reported by position bucket 0–T, T–2T, 2T–4T, …

- `none`:    BDH without damping (the reference): the state only ever sums;
- `alibi`:   BDH with the ALiBi damping schedule λ_h = exp(−2^(−8h/nh)) (the `small` preset's);
- `learned`: the same schedule as the start of a learned per-head decay (`learn_damping`);
- `carry`:   BDH without damping, trained on streams with the state carried from batch to batch
             (paper App. B), so it sees histories far longer than a block;
- `gpt`:     the matched GPT with ALiBi, reading through its key-value cache.

Writes length.json (every number), length.md (the table) and length.png (loss against position).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdh.baseline.presets import LADDER, QUICK_LADDER
from bdh.checkpoint import load_checkpoint
from bdh.config import ConfigError
from bdh.experiments.runs import heldout_tokens, machine_info, read_curve
from bdh.figures import save_figure
from bdh.streams import evaluate_streams
from bdh.train import METRICS_FILE, TrainConfig, evaluate, train

# variant -> (model kind, BDH config fields, training options)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "none": ("bdh", {"damping": None}, {}),
    "alibi": ("bdh", {"damping": "alibi"}, {}),
    "learned": ("bdh", {"damping": "alibi", "learn_damping": True}, {}),
    "carry": ("bdh", {"damping": None}, {"batches": "stream", "carry_state": True}),
    "gpt": ("gpt", {}, {}),
}


@dataclass
class LengthConfig:
    """One length experiment; `quick()` is the CI-sized variant."""

    size: str = "360k"  # ladder size of every model (BDH 360,448 / GPT 360,288 parameters)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    data: str = "shakespeare"
    tokens: int = 307_200  # training tokens per run (300 steps of 16 × 64)
    batch_size: int = 16
    block_size: int = 64
    lr: float = 3e-3
    gpt_lr: float | None = None  # the GPT's own peak lr (None: lr)
    warmup_fraction: float = 0.05
    stream_length: int = 4096  # tokens per held-out stream: 64× the block
    eval_streams: int = 32  # held-out streams (the same tokens for every model)
    eval_tokens: int | None = None  # if given, eval_streams = eval_tokens // stream_length
    seed: int = 1337
    threads: int = 0
    runs: str = "runs/length"
    reuse: bool = True

    def __post_init__(self) -> None:
        if self.eval_tokens is not None:
            self.eval_streams = self.eval_tokens // self.stream_length
        if self.size not in {**LADDER, **QUICK_LADDER}:
            raise ConfigError(f"unknown ladder size {self.size!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
        if self.steps < 1:
            raise ConfigError(f"tokens ({self.tokens}) must cover at least one batch")
        if self.stream_length < 16 * self.block_size:
            raise ConfigError(
                f"stream_length ({self.stream_length}) must be at least 16 × block_size"
                f" ({16 * self.block_size})"
            )
        if self.eval_streams < 1:
            raise ConfigError(f"eval_streams must be >= 1, got {self.eval_streams}")

    @classmethod
    def quick(cls, **changes: Any) -> LengthConfig:
        """Seconds per run: a smoke test of the pipeline, not a result."""
        fields: dict[str, Any] = dict(
            size="q70k", tokens=2_048, batch_size=4, block_size=16, stream_length=256,
            eval_streams=2, runs="runs/length-quick",
        )  # fmt: skip
        return cls(**{**fields, **changes})

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.block_size)

    def train_config(self, variant: str) -> TrainConfig:
        """The trainer's settings of one variant; they differ only in VARIANTS' fields."""
        model, fields, options = VARIANTS[variant]
        out = Path(self.runs) / variant
        config_file = None
        if fields:  # model options go through a config file, as on the command line
            out.mkdir(parents=True, exist_ok=True)
            config_file = str((out / "model.json").resolve())
            Path(config_file).write_text(json.dumps(fields))
        return TrainConfig(
            data=self.data, out=str(out), model=model, preset=self.size, config_file=config_file,
            max_steps=self.steps, batch_size=self.batch_size, block_size=self.block_size,
            lr=self.gpt_lr if model == "gpt" and self.gpt_lr else self.lr,
            warmup_steps=max(1, round(self.warmup_fraction * self.steps)),
            eval_interval=self.steps, eval_batches=4, ckpt_interval=self.steps, seed=self.seed,
            threads=self.threads, **options,
        )  # fmt: skip


def run_length(cfg: LengthConfig, log: Any = print) -> dict[str, Any]:
    """Train (or reuse) and read every variant; returns the JSON payload."""
    machine = machine_info()
    log(f"[length] config {json.dumps(dataclasses.asdict(cfg))}")
    log("[length] machine " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    heldout = heldout_tokens(cfg.data, cfg.eval_streams * cfg.stream_length)
    runs = {}
    for variant in cfg.variants:
        train_cfg = cfg.train_config(variant)
        seconds = _train(train_cfg, cfg.reuse, log)
        runs[variant] = {"train_seconds": seconds, **score(train_cfg.out, heldout, cfg)}
        r = runs[variant]
        log(
            f"[length] {variant}: windows {r['windows']['bpb']:.3f} bits/byte, stream"
            f" {r['stream']['bpb']:.3f}, last bucket {r['stream']['buckets'][-1]['bpb']:.3f}"
        )
    return {
        "experiment": "length",
        "config": dataclasses.asdict(cfg),
        "machine": machine,
        "heldout_tokens": len(heldout) - 1,
        "runs": runs,
    }


def _train(cfg: TrainConfig, reuse: bool, log: Any) -> float:
    """Train unless a finished run of this very configuration is there; the trainer's clock
    (seconds of training steps, from the run's metrics), the same for a reused run."""
    ckpt = Path(cfg.out) / "checkpoint"
    finished = False
    if reuse and ckpt.is_dir():
        meta = json.loads((ckpt / "config.json").read_text())["meta"]
        finished = meta.get("train") == cfg.to_dict() and meta.get("step") == cfg.max_steps
    if finished:
        log(f"[length] reusing the finished run in {cfg.out}")
    else:
        log(f"[length] training {cfg.out} for {cfg.max_steps} steps")
        train(cfg, progress=False, log=lambda line: None)
    curve = read_curve(Path(cfg.out) / METRICS_FILE, cfg.batch_size * cfg.block_size)
    return curve[-1]["seconds"]


def score(path: str, heldout: Any, cfg: LengthConfig) -> dict[str, Any]:
    """Windows of the block and streams read through the state, on the same held-out tokens."""
    ckpt = load_checkpoint(path)
    nbytes = ckpt.tokenizer.bytes_per_token
    windows = evaluate(ckpt.model, heldout, nbytes, cfg.block_size)
    stream = evaluate_streams(ckpt.model, heldout, nbytes, cfg.block_size, cfg.stream_length)
    damping = getattr(ckpt.model, "attn", None)
    learned = None if damping is None or damping.damping is None else damping.damping.tolist()
    return {
        "params": ckpt.model.num_params(),
        "step": ckpt.meta.get("step"),
        "damping": learned,
        "windows": windows.to_dict(),
        "stream": stream.to_dict(),
    }


def table_markdown(payload: dict[str, Any]) -> str:
    """Bits per byte by position for every variant, with the windows number beside."""
    runs = payload["runs"]
    buckets = next(iter(runs.values()))["stream"]["buckets"]
    head = "| model | params | windows | stream, all | "
    head += " | ".join(f"{b['start']}–{b['stop']}" for b in buckets) + " |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(buckets)]
    for name, r in runs.items():
        cells = " | ".join(f"{b['bpb']:.3f}" for b in r["stream"]["buckets"])
        lines.append(
            f"| {name} | {r['params']:,} | {r['windows']['bpb']:.3f} |"
            f" {r['stream']['bpb']:.3f} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: str | Path) -> Path:
    """Bits per byte against position in the stream (log scale), one line per variant."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, r in payload["runs"].items():
        buckets = r["stream"]["buckets"]
        xs = [max(1, b["start"] + b["stop"]) / 2 for b in buckets]
        style = "s--" if name == "gpt" else "o-"
        ax.plot(xs, [b["bpb"] for b in buckets], style, label=name)
    block = payload["config"]["block_size"]
    ax.axvline(block, color="grey", lw=0.8, ls=":")
    ax.text(block, ax.get_ylim()[1], " training block", va="top", fontsize=8, color="grey")
    ax.set(xscale="log", xlabel="position in the stream (tokens)", ylabel="bits per byte")
    c = payload["config"]
    ax.set_title(f"{c['size']} models, {c['tokens']:,} training tokens, read as streams")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path, dpi=120)
