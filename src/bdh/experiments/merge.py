"""Merging by neuron concatenation, the Table 2 analogue (paper §7.1) with the data at hand.

Tasks (all byte-level, from the shared data folder):
    english      the NLTK Gutenberg books minus the three Shakespeare plays; the last 5% of each
                 book is held out
    translation  Tatoeba En-Fr pairs as the paper's stream (`bdh.translation`): both directions,
                 split by groups of pairs sharing a sentence (valid.txt-style held-out stream)
    shakespeare  tinyshakespeare.txt; its last 10% is held out

Rows: base (english) → child A (translation) and child B (shakespeare), each fine-tuned from the
base; the merge of A and B (no training; shared tensors averaged, and task arithmetic on the base);
the merge after a short fine-tune on both tasks; a joint model fine-tuned from the base on both
tasks for as many tokens as A and B together; and the control: two specialists trained from
scratch (as many tokens as base + child), merged. Every model is scored on the held-out split of
every task (nats per byte).

Training goes through one small loop (`fit`): the project's trainer starts runs from scratch or
resumes them, but cannot start from another model's weights. It uses the trainer's schedule
(`bdh.train.lr_at`), AdamW settings and gradient clipping. Finished stages are checkpoints in
`runs/` and are reused when their settings match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdh import data as bdh_data
from bdh import merge, translation
from bdh.checkpoint import load_checkpoint, read_config, save_checkpoint
from bdh.config import BDHConfig, ConfigError
from bdh.experiments.runs import shared_data_dir
from bdh.model import BDH
from bdh.tokenizer import ByteTokenizer
from bdh.train import TrainConfig, evaluate, lr_at

TASKS = ("english", "translation", "shakespeare")
GUTENBERG_EXCLUDED = ("shakespeare-",)  # Shakespeare is child B's task, not the base's
EN_SENTENCES = ("I am cold.", "Where is the station?", "We have time.")
FR_SENTENCES = ("Il pleut.", "Je suis fatigué.", "Où est mon livre ?")
SHAKESPEARE_PROMPT = "ROMEO:\n"
ENGLISH_PROMPT = "It was a "


@dataclass
class MergeExperimentConfig:
    # The model: the `small` preset's shape with fewer neurons and layers, so that the whole
    # experiment trains in about half an hour on a shared 2-core machine.
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    multiplier: int = 8  # N = 8 · 128 / 4 = 256 neurons per head, n = 1,024
    base_steps: int = 600
    child_steps: int = 300
    merge_ft_fraction: float = 0.1  # the merge's fine-tune, as a fraction of a child's tokens
    batch_size: int = 16
    block_size: int = 64
    lr: float = 3e-3  # from scratch
    ft_lr: float = 1e-3  # fine-tunes
    pairs_limit: int = 50_000  # the shortest Tatoeba pairs, as in `bdh experiment translation`
    eval_tokens: int = 32_768  # held-out tokens per task, the same for every model
    sample_bytes: int = 160
    seed: int = 1337
    threads: int = 1
    runs: str = "runs/merge"
    reuse: bool = True

    def __post_init__(self) -> None:
        for name in ("base_steps", "child_steps", "batch_size", "block_size", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.merge_ft_fraction <= 1:
            raise ConfigError(f"merge_ft_fraction must be in (0, 1], got {self.merge_ft_fraction}")

    @classmethod
    def quick(cls, **changes: Any) -> MergeExperimentConfig:
        """Seconds in all: a smoke test of the pipeline, not a result."""
        fields: dict[str, Any] = dict(
            n_embd=32, n_head=2, multiplier=8, base_steps=8, child_steps=10, batch_size=4,
            block_size=32, pairs_limit=2_000, eval_tokens=2_048, sample_bytes=24,
            runs="runs/merge-quick",
        )  # fmt: skip
        return cls(**{**fields, **changes})

    def model_config(self) -> BDHConfig:
        return BDHConfig(
            n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
            mlp_internal_dim_multiplier=self.multiplier, dropout=0.0,
        )  # fmt: skip

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    @property
    def merge_ft_steps(self) -> int:
        return max(1, int(self.merge_ft_fraction * self.child_steps))


# ---------------------------------------------------------------------------- data


def load_tasks(cfg: MergeExperimentConfig, data_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """{task: {"train": tokens, "val": tokens}} as byte tokens (uint8 arrays)."""
    books = sorted(
        p for p in (data_dir / "gutenberg_nltk").glob("*.txt")
        if not p.name.startswith(GUTENBERG_EXCLUDED) and p.name != "NLTK_README.txt"
    )  # fmt: skip
    if not books:
        raise bdh_data.DataError(f"no Gutenberg books in {data_dir / 'gutenberg_nltk'}")
    train, val = [], []
    for book in books:
        text = bdh_data.clean_gutenberg(book.read_bytes()).encode("utf-8")
        cut = int(len(text) * 0.95)
        train.append(text[:cut])
        val.append(text[cut:])
    pairs = translation.read_pairs(data_dir / "tatoeba_eng_fra.tsv", cfg.pairs_limit)
    splits = translation.split_pairs(pairs, seed=cfg.seed)
    stream = {
        "train": translation.build_stream(splits.train, seed=cfg.seed),
        "val": translation.build_stream(splits.valid, seed=cfg.seed + 1),
    }
    shakespeare = bdh_data.split_bytes(
        "tinyshakespeare", (data_dir / "tinyshakespeare.txt").read_bytes()
    )
    raw = {
        "english": {"train": b"\n\n".join(train), "val": b"\n\n".join(val)},
        "translation": {k: v.encode("utf-8") for k, v in stream.items()},
        "shakespeare": {"train": shakespeare.train, "val": shakespeare.val},
    }
    return {t: {k: np.frombuffer(v, dtype=np.uint8) for k, v in s.items()} for t, s in raw.items()}


# ---------------------------------------------------------------------------- training


def fit(
    model: BDH, tasks: list[np.ndarray], steps: int, lr: float, cfg: MergeExperimentConfig,
    seed: int, log: Any = print,
) -> float:  # fmt: skip
    """Train `model` in place for `steps` AdamW steps; each batch splits its rows evenly over
    `tasks`. Returns the training seconds."""
    schedule = TrainConfig(max_steps=steps, lr=lr, warmup_steps=max(1, steps // 20))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.1)
    rows = [
        cfg.batch_size // len(tasks) + (i < cfg.batch_size % len(tasks)) for i in range(len(tasks))
    ]
    samplers = [
        bdh_data.RandomBatches(t, r, cfg.block_size, seed + i)
        for i, (t, r) in enumerate(zip(tasks, rows, strict=True))
    ]
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, schedule)
        batches = [s.next() for s in samplers]
        x = torch.cat([b[0] for b in batches]).long()
        y = torch.cat([b[1] for b in batches]).long()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  step {step + 1}/{steps}: loss {loss.item():.4f}")
    model.eval()
    return time.perf_counter() - start


def _stage(
    cfg: MergeExperimentConfig, name: str, settings: dict[str, Any], build: Any, log: Any
) -> tuple[BDH, dict[str, Any]]:
    """The model of one stage: reused from runs/<name> when its settings match, else built,
    trained (by `build`, which returns (model, info)) and saved."""
    path = Path(cfg.runs) / name
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if cfg.reuse:
        try:
            meta = read_config(path)["meta"]
            if meta.get("stage_key") == key:
                log(f"[merge] {name}: reusing {path}")
                return load_checkpoint(path).model.eval(), meta["info"]
        except (OSError, ValueError):
            pass
    log(f"[merge] {name}: {settings}")
    model, info = build()
    save_checkpoint(path, model, "bdh", ByteTokenizer(), {"stage_key": key, "info": info})
    return model.eval(), info


def _copy(model: BDH) -> BDH:
    clone = BDH(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


def _trained(
    start: BDH | None, tasks: list[str], steps: int, lr: float, cfg: MergeExperimentConfig,
    data: dict[str, dict[str, np.ndarray]], seed: int, log: Any,
) -> tuple[BDH, dict[str, Any]]:  # fmt: skip
    if start is None:
        torch.manual_seed(seed)
        model = BDH(cfg.model_config())
    else:
        model = _copy(start)
    seconds = fit(model, [data[t]["train"] for t in tasks], steps, lr, cfg, seed, log)
    return model, {"steps": steps, "tokens": steps * cfg.tokens_per_step, "tasks": tasks,
                   "train_seconds": round(seconds, 1)}  # fmt: skip


# ---------------------------------------------------------------------------- the experiment


def run_merge(
    cfg: MergeExperimentConfig, log: Any = print, data_dir: Path | None = None
) -> dict[str, Any]:
    """Train every row, merge, evaluate and sample; returns the JSON payload."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data_dir = data_dir or shared_data_dir()
    data = load_tasks(cfg, data_dir)
    log(f"[merge] config {json.dumps(dataclasses.asdict(cfg))}")
    log(f"[merge] machine {machine_line()}")
    for task, split in data.items():
        log(f"[merge] {task}: train {len(split['train']):,} bytes, held-out {len(split['val']):,}")
    shape = dataclasses.asdict(cfg.model_config())
    common = {"shape": shape, "batch": cfg.batch_size, "block": cfg.block_size, "seed": cfg.seed,
              "pairs": cfg.pairs_limit}  # fmt: skip

    def stage(name: str, start: BDH | None, tasks: list[str], steps: int, lr: float, parent: str,
              seed: int) -> tuple[BDH, dict[str, Any]]:  # fmt: skip
        settings = {**common, "tasks": tasks, "steps": steps, "lr": lr, "parent": parent, "s": seed}
        train = lambda: _trained(start, tasks, steps, lr, cfg, data, seed, log)  # noqa: E731
        return _stage(cfg, name, settings, train, log)

    s, c, ft = cfg.seed, cfg.child_steps, cfg.ft_lr
    base, base_info = stage("base", None, ["english"], cfg.base_steps, cfg.lr, "-", s)
    child_a, a_info = stage("child_a", base, ["translation"], c, ft, "base", s + 1)
    child_b, b_info = stage("child_b", base, ["shakespeare"], c, ft, "base", s + 2)
    merged = merge.merge_models([child_a, child_b], names=["child_a", "child_b"])
    merged_ta = merge.merge_models(
        [child_a, child_b], names=["child_a", "child_b"], base=base, shared="task-arithmetic"
    )
    merged_ft, mft_info = stage("merge_ft", merged, ["translation", "shakespeare"],
                                cfg.merge_ft_steps, ft, "merge", s + 3)  # fmt: skip
    # The same short fine-tune (same batches) at the from-scratch lr: does a larger step recover
    # the averaged embedding and head faster? (Measured: no; see the README.)
    merged_ft_hi, mft_hi_info = stage("merge_ft_lr", merged, ["translation", "shakespeare"],
                                      cfg.merge_ft_steps, cfg.lr, "merge", s + 3)  # fmt: skip
    joint, joint_info = stage(
        "joint", base, ["translation", "shakespeare"], 2 * c, ft, "base", s + 4
    )
    scratch = cfg.base_steps + c  # as many tokens as base + child
    spec_a, sa_info = stage("scratch_a", None, ["translation"], scratch, cfg.lr, "-", s + 5)
    spec_b, sb_info = stage("scratch_b", None, ["shakespeare"], scratch, cfg.lr, "-", s + 6)
    control = merge.merge_models([spec_a, spec_b], names=["scratch_a", "scratch_b"])
    pruned = prune_rows(merged, data, cfg)

    rows: dict[str, tuple[BDH, dict[str, Any]]] = {
        "base": (base, base_info),
        "child A (translation)": (child_a, a_info),
        "child B (shakespeare)": (child_b, b_info),
        "merge A+B (mean)": (merged, {"steps": 0, "tokens": 0}),
        "merge A+B (task arithmetic)": (merged_ta, {"steps": 0, "tokens": 0}),
        "merge A+B + fine-tune": (merged_ft, mft_info),
        "merge A+B + fine-tune (from-scratch lr)": (merged_ft_hi, mft_hi_info),
        "joint (from base)": (joint, joint_info),
        "scratch A (translation)": (spec_a, sa_info),
        "scratch B (shakespeare)": (spec_b, sb_info),
        "control: scratch A+B merged": (control, {"steps": 0, "tokens": 0}),
        **{name: (model, {"steps": 0, "tokens": 0}) for name, model in pruned.items()},
    }
    held_out = {t: data[t]["val"][: cfg.eval_tokens + 1] for t in TASKS}
    results = {}
    for name, (model, info) in rows.items():
        losses = {t: _nats_per_byte(model, held_out[t], cfg.block_size) for t in TASKS}
        log(f"[merge] {name}: " + ", ".join(f"{t} {v:.4f}" for t, v in losses.items()))
        results[name] = {"neurons": model.config.n, "params": model.num_params(), **info,
                         "loss": losses, "samples": samples(model, cfg)}  # fmt: skip
    self_merge = _self_merge_error(base, held_out["english"][: cfg.block_size])
    return {
        "experiment": "merge",
        "config": dataclasses.asdict(cfg),
        "machine": machine_line(),
        "data": data_description(cfg),
        "rows": results,
        "summary": summary(results),
        "self_merge_max_logit_diff": self_merge,
    }


def prune_rows(
    merged: BDH, data: dict[str, dict[str, np.ndarray]], cfg: MergeExperimentConfig
) -> dict[str, BDH]:
    """The merge cut back to the children's width (no training), by decoder row norm and by
    firing rate on the children's training text (the first eval_tokens bytes of each task)."""
    text = np.concatenate(
        [data[t]["train"][: cfg.eval_tokens] for t in ("translation", "shakespeare")]
    )
    rates = merge.firing_rate_scores(
        merged, torch.from_numpy(text.astype(np.int64)), cfg.block_size
    )
    return {
        "merge pruned to half (decoder norm)": merge.prune_model(merged, 0.5),
        "merge pruned to half (firing rate)": merge.prune_model(merged, 0.5, rates),
    }


def data_description(cfg: MergeExperimentConfig) -> dict[str, str]:
    return {
        "english": "gutenberg_nltk/*.txt but shakespeare-*.txt; last 5% of each book held out",
        "translation": f"tatoeba_eng_fra.tsv, first {cfg.pairs_limit:,} pairs, both directions,"
        " 2% of the sentence groups held out",
        "shakespeare": "tinyshakespeare.txt; last 10% held out",
    }


def _nats_per_byte(model: BDH, tokens: np.ndarray, block_size: int) -> float:
    ones = np.ones(256, dtype=np.int64)  # byte tokens: one byte each
    return round(evaluate(model, tokens.astype(np.int64), ones, block_size).loss, 4)


def _self_merge_error(model: BDH, tokens: np.ndarray) -> float:
    """Max |logit| difference between the trained base and the base merged with itself."""
    idx = torch.from_numpy(tokens.astype(np.int64))[None]
    with torch.no_grad():
        a = model(idx)[0]
        b = merge.merge_models([model, model]).eval()(idx)[0]
    return float((a - b).abs().max())


def samples(model: BDH, cfg: MergeExperimentConfig) -> dict[str, Any]:
    """Greedy translations both ways and sampled Shakespeare and English continuations."""
    out: dict[str, Any] = {}
    for src, tgt, texts in (("en", "fr", EN_SENTENCES), ("fr", "en", FR_SENTENCES)):
        hyps = translation.translate(model, list(texts), src, tgt, 48)
        out[f"{src}->{tgt}"] = dict(zip(texts, hyps, strict=True))
    for name, prompt in (("shakespeare", SHAKESPEARE_PROMPT), ("english", ENGLISH_PROMPT)):
        idx = torch.tensor([list(prompt.encode())])
        gen = torch.Generator().manual_seed(cfg.seed)
        tokens = model.generate(idx, cfg.sample_bytes, temperature=0.8, top_k=20, generator=gen)
        out[name] = bytes(tokens[0].tolist()).decode("utf-8", errors="replace")
    return out


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, as measured.

    kept = (L_base − L_merge) / (L_base − L_parent) on each parent's own task: the share of the
    parent's gain over the base that the merge keeps (paper: 73-90%). The control's parents are
    the from-scratch specialists, measured against the same base. Then the merge after its short
    fine-tune against the joint model: (L − L_joint) / L_joint on each task (target: within 5%).
    """
    base = results["base"]["loss"]
    merges = {
        "merge A+B (mean)": ("child A (translation)", "child B (shakespeare)"),
        "merge A+B (task arithmetic)": ("child A (translation)", "child B (shakespeare)"),
        "control: scratch A+B merged": ("scratch A (translation)", "scratch B (shakespeare)"),
    }
    out: dict[str, Any] = {}
    for merged, parents in merges.items():
        for task, parent in zip(("translation", "shakespeare"), parents, strict=True):
            gain = base[task] - results[parent]["loss"][task]
            kept = base[task] - results[merged]["loss"][task]
            out[f"{merged}: share of {parent}'s gain kept on {task}"] = (
                round(kept / gain, 3) if gain else None
            )
    joint = results["joint (from base)"]["loss"]
    for row in ("merge A+B + fine-tune", "merge A+B + fine-tune (from-scratch lr)"):
        for task in TASKS:
            ft = results[row]["loss"][task]
            out[f"{row} vs joint on {task}: (L - L_joint) / L_joint"] = round(
                (ft - joint[task]) / joint[task], 4
            )
    return out


def machine_line() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}"
            f" threads {torch.get_num_threads()} python {platform.python_version()}")  # fmt: skip


def table_markdown(payload: dict[str, Any]) -> str:
    """The README table: one row per model, held-out nats per byte on every task."""
    lines = [
        "| model | neurons n | training tokens | english | en↔fr translation | shakespeare |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in payload["rows"].items():
        loss = r["loss"]
        lines.append(
            f"| {name} | {r['neurons']:,} | {r['tokens']:,} | {loss['english']:.3f}"
            f" | {loss['translation']:.3f} | {loss['shakespeare']:.3f} |"
        )
    lines += ["", "| target | measured |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in payload["summary"].items()]
    return "\n".join(lines) + "\n"


def samples_markdown(payload: dict[str, Any]) -> str:
    parts = []
    for name, r in payload["rows"].items():
        s = r["samples"]
        parts.append(f"### {name}\n")
        for direction in ("en->fr", "fr->en"):
            parts += [f"- {direction}: {src!r} → {hyp!r}" for src, hyp in s[direction].items()]
        parts += ["", "```", s["shakespeare"], "```", "", "```", s["english"], "```", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------- command line


def add_merge_arguments(sub: Any) -> None:
    """`bdh experiment merge` and its options; every default is the config's."""
    p = sub.add_parser("merge", help="two fine-tunes of one base merged by concatenating neurons")
    p.add_argument("--quick", action="store_true", help="a tiny model, seconds: a smoke test")
    p.add_argument("--base-steps", type=int, metavar="N", help="steps of the base (default: 600)")
    p.add_argument("--child-steps", type=int, metavar="N",
                   help="steps of each child's fine-tune; the joint model gets twice as many"
                   " (default: 300)")  # fmt: skip
    p.add_argument("--eval-tokens", type=int, metavar="N",
                   help="held-out bytes per task, the same for every model"
                   " (default: 32768)")  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of weights and batches (default: 1337)")
    p.add_argument("--data", metavar="DIR",
                   help="the shared data folder: gutenberg_nltk/, tatoeba_eng_fra.tsv,"
                   " tinyshakespeare.txt (default: $BDH_SHARED_DATA, else"
                   " ../shared/data)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, help="torch CPU threads, 0 = torch's default (default: 1)"
    )
    p.add_argument("--runs", metavar="DIR", help="stage checkpoints (default: runs/merge)")
    p.add_argument("--out", metavar="DIR", help="where to write JSON and tables (default: --runs)")
    p.add_argument("--fresh", action="store_true", help="retrain stages that already finished")


def run_from_args(args: Any, log: Any = print) -> dict[str, Path]:
    from bdh.experiments import write_outputs

    names = ("base_steps", "child_steps", "eval_tokens", "seed", "threads", "runs")
    given: dict[str, Any] = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    given["reuse"] = not args.fresh
    cfg = MergeExperimentConfig.quick(**given) if args.quick else MergeExperimentConfig(**given)
    payload = run_merge(cfg, log, Path(args.data) if args.data else None)
    out = Path(args.out or cfg.runs)
    name = "merge" + ("-quick" if args.quick else "")
    table = table_markdown(payload)
    paths = write_outputs(out, name, payload, table)
    paths["samples"] = out / f"{name}-samples.md"
    paths["samples"].write_text(samples_markdown(payload))
    log("\n" + table)
    for path in paths.values():
        log(f"wrote {path}")
    return paths
