"""English-French translation: BDH against the GPT baseline at equal parameters and tokens (App. B).

The sentence pairs become the paper's byte stream (`bdh.translation.write_dataset`: random
direction per pair, split by groups of pairs sharing a sentence, so no held-out sentence is trained
on in either direction). The dataset folder is an ordinary `bdh.data` source: `train.txt` trains
and `valid.txt` validates. Both models train through `bdh.train` with the same settings; each then
translates the held-out sources greedily with its decoding state, scored by sacrebleu against every
accepted translation of the source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdh import data as bdh_data
from bdh import translation
from bdh.baseline.presets import LADDER, QUICK_LADDER
from bdh.checkpoint import load_checkpoint
from bdh.config import ConfigError
from bdh.experiments.runs import final_eval, heldout_tokens, shared_data_dir, train_run
from bdh.train import TrainConfig

MODELS = ("bdh", "gpt")
PAIRS_FILE = "tatoeba_eng_fra.tsv"


@dataclass
class TranslationConfig:
    pairs: str | None = None  # source<TAB>target file; None: the shared Tatoeba En-Fr pairs
    limit: int | None = 50_000  # the first pairs of the file (Tatoeba's are sorted by length)
    size: str = "1m"  # a ladder size: both models get its matched shapes
    tokens: int = 655_360  # training tokens per model
    batch_size: int = 8
    block_size: int = 128
    lr: float = 3e-3
    # The GPT's own peak lr (None: the same as BDH's). Equal settings are the simplest fair
    # protocol, but the deeper GPTs of the ladder prefer a lower lr (see the notes).
    gpt_lr: float | None = None
    warmup_fraction: float = 0.05
    evals: int = 8
    eval_batches: int = 8
    eval_tokens: int = 65_536  # slice of valid.txt for the final loss
    test_sentences: int | None = 500  # held-out sources translated per direction (None: all)
    seed: int = 1337
    threads: int = 0
    runs: str = "runs/translation"  # the dataset and both runs
    reuse: bool = True

    def __post_init__(self) -> None:
        ladders = {**LADDER, **QUICK_LADDER}
        if self.size not in ladders:
            raise ConfigError(
                f"unknown ladder size {self.size!r}; choose one of {', '.join(ladders)}"
            )
        if self.steps < 1:
            raise ConfigError(f"tokens ({self.tokens}) must cover at least one training step")

    @classmethod
    def quick(cls, **changes: Any) -> TranslationConfig:
        """A few seconds per model: a smoke test of the pipeline, not a translation result."""
        fields: dict[str, Any] = dict(
            limit=2_000, size="q70k", tokens=8_192, block_size=32, evals=2, eval_batches=2,
            eval_tokens=4_096, test_sentences=20, runs="runs/translation-quick",
        )  # fmt: skip
        return cls(**{**fields, **changes})

    def lr_of(self, model: str) -> float:
        return self.gpt_lr if model == "gpt" and self.gpt_lr is not None else self.lr

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.block_size)

    @property
    def pairs_path(self) -> Path:
        return Path(self.pairs) if self.pairs else shared_data_dir() / PAIRS_FILE

    @property
    def dataset(self) -> Path:
        return Path(self.runs).resolve() / "data"

    def train_config(self, model: str) -> TrainConfig:
        return TrainConfig(
            data=str(self.dataset), out=str(Path(self.runs) / model), model=model,
            preset=self.size, max_steps=self.steps, batch_size=self.batch_size,
            block_size=self.block_size, lr=self.lr_of(model),
            warmup_steps=max(1, round(self.warmup_fraction * self.steps)),
            eval_interval=max(1, self.steps // self.evals), eval_batches=self.eval_batches,
            ckpt_interval=self.steps, seed=self.seed, threads=self.threads,
        )  # fmt: skip


def build_dataset(cfg: TranslationConfig, log: Any = print) -> dict[str, int]:
    """Write the streams and test.tsv into cfg.dataset; returns the pair counts per split."""
    pairs = translation.read_pairs(cfg.pairs_path, cfg.limit)
    counts = translation.write_dataset(pairs, cfg.dataset, seed=cfg.seed)
    corpus = bdh_data.load_corpus(str(cfg.dataset))
    # The trainer splits a folder by whole files; it must hold out exactly valid.txt.
    if corpus.train_docs != ["train.txt"] or corpus.val_docs != ["valid.txt"]:
        raise RuntimeError(f"{cfg.dataset} should hold only train.txt and valid.txt")
    log(f"[translation] {cfg.pairs_path}: {len(pairs):,} pairs -> {counts}")
    return counts


def run_translation(cfg: TranslationConfig, log: Any = print) -> dict[str, Any]:
    """Build the data, train both models, score both directions; returns the JSON payload."""
    counts = build_dataset(cfg, log)
    test_pairs = translation.read_pairs(cfg.dataset / "test.tsv")
    heldout = heldout_tokens(str(cfg.dataset), cfg.eval_tokens)
    results = {}
    for model in MODELS:
        log(f"[translation] training {model} ({cfg.size}) for {cfg.steps} steps")
        record = train_run(cfg.train_config(model), log=log, reuse=cfg.reuse)
        record.final = final_eval(record, heldout, cfg.block_size)
        scores = score_checkpoint(record.checkpoint, test_pairs, cfg.test_sentences, cfg.seed)
        log(f"[translation] {model}: " + ", ".join(
            f"{d} BLEU {s['bleu']:.2f} chrF {s['chrf']:.2f}" for d, s in scores.items()
        ))  # fmt: skip
        results[model] = {**record.to_dict(), "scores": scores}
    return {
        "experiment": "translation",
        # The file's name, not its path: results are shared and the data lives outside the project.
        "config": {**dataclasses.asdict(cfg), "pairs": cfg.pairs_path.name},
        "pairs": counts,
        "runs": results,
    }


def score_checkpoint(
    path: str, test_pairs: list[translation.Pair], limit: int | None, seed: int
) -> dict[str, dict[str, Any]]:
    """BLEU and chrF of greedy translation in both directions on the held-out pairs."""
    model = load_checkpoint(path).model.eval()
    results = [
        translation.evaluate(model, test_pairs, reverse=reverse, limit=limit, seed=seed)
        for reverse in (False, True)  # en->fr (the first column is English), then fr->en
    ]
    return {result["direction"]: result for result in results}


def table_markdown(payload: dict[str, Any]) -> str:
    """The README table: one row per model."""
    lines = [
        "| model | params | training tokens | wall-clock | valid loss (nats/byte) "
        "| en→fr BLEU | en→fr chrF | fr→en BLEU | fr→en chrF |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in payload["runs"].items():
        ef, fe = r["scores"]["en->fr"], r["scores"]["fr->en"]
        lines.append(
            f"| {model.upper()} {r['preset']} | {r['params']:,} | {r['tokens']:,}"
            f" | {r['wall_s'] / 60:.1f} min | {r['final']['loss']:.3f}"
            f" | {ef['bleu']:.2f} | {ef['chrf']:.2f} | {fe['bleu']:.2f} | {fe['chrf']:.2f} |"
        )
    return "\n".join(lines) + "\n"
