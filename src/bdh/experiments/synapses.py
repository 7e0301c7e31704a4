"""Monosemantic synapses in a bilingual BDH (paper §6.3, Figs. 11–13), with held-out statistics.

    bdh experiment synapses --ckpt runs/synapses/bdh [--quick] [--concept F --contrast F]

1. Sentences: the Tatoeba English–French pairs, one pair per group of pairs that share a sentence
   (`bdh.translation.group_pairs`). Concept sets hold the pairs whose English side names a currency
   (or a country); contrast pairs name neither concept in either language and are matched to the
   concept pairs in English length. Each set is split into discovery and held-out test pairs;
   since a pair is a whole group, no sentence nor any of its translations is in both.
2. Search (`bdh.interpret.find_concept_synapses`) on the English discovery sentences; the best
   synapse is tested on the held-out English sentences, and on their French translations (does
   it carry across languages?). The same for a search on the French sides, tested on English.
3. Control: the English search with concept/contrast labels shuffled over the discovery set;
   its best synapse is tested on the held-out set with the true labels.
4. Figures: 11 (degree histograms of the thresholded positive σ of the best synapse's head at the
   end of a long passage), 12 (its value over the tokens of held-out sentences, both languages),
   13 (the neurons of y_{l−1} and x_l active at its largest jump).

Each sentence is read from an empty state after the stream's source marker (`\\n<F:en>`).
Writes synapses.json, synapses.md and synapses-fig11/12/13.png into --out.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdh import translation
from bdh.checkpoint import load_checkpoint
from bdh.experiments.runs import shared_data_dir
from bdh.figures import save_figure
from bdh.interpret import concepts
from bdh.interpret.synapses import synapses

PAIRS_FILE = "tatoeba_eng_fra.tsv"
CONCEPTS: dict[str, dict[str, list[str]]] = {
    "currency": {
        "en": ["euros?", "dollars?", "yen", "francs?", "money", "currency", "currencies", "cash",
               "coins?", "cents?", "pounds? sterling"],
        "fr": ["euros?", "dollars?", "yens?", "francs?", "argent", "monnaies?", "devises?",
               "espèces", "pièces? de monnaie", "centimes?", "livres? sterling"],
    },
    "country": {
        "en": ["France", "Japan", "Canada", "Germany", "Italy", "Spain", "China", "England",
               "America", "Australia", "Brazil", "Russia", "Mexico", "India", "Egypt",
               "Switzerland", "Korea", "Belgium", "Portugal", "Greece", "Ireland", "Holland"],
        "fr": ["France", "Japon", "Canada", "Allemagne", "Italie", "Espagne", "Chine",
               "Angleterre", "Amérique", "Australie", "Brésil", "Russie", "Mexique", "Inde",
               "Égypte", "Suisse", "Corée", "Belgique", "Portugal", "Grèce", "Irlande",
               "Hollande"],
    },
}  # fmt: skip
LANGS = ("en", "fr")


@dataclass
class SynapsesConfig:
    ckpt: str | None = None  # a bilingual checkpoint; None: train one (quick only)
    pairs: str | None = None  # source<TAB>target file (default: the shared Tatoeba pairs)
    concept: str | None = None  # a user's concept pairs file (with `contrast`): replaces CONCEPTS
    contrast: str | None = None
    discovery: int = 100  # concept sentences (and as many contrast) searched on
    test: int = 50  # held-out concept sentences (and as many contrast)
    concepts: str | None = None  # comma-separated names of CONCEPTS (default: all)
    search: str = "en,fr"  # languages searched on (each best synapse is tested on both)
    control: bool = True  # the shuffled-label search
    top_k: int = 10
    candidates: int = 64  # per head, rescored with the jump value
    passage_bytes: int = 2048  # Fig. 11's long passage
    seed: int = 0
    out: str = "benchmarks/results"
    quick: bool = False

    def __post_init__(self) -> None:
        if (self.concept is None) != (self.contrast is None):
            raise ValueError("give --concept and --contrast together")
        for name in ("discovery", "test", "top_k", "candidates"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be ≥ 2, got {getattr(self, name)}")

    @classmethod
    def quick_config(cls, **changes: Any) -> SynapsesConfig:
        fields = dict(
            discovery=12, test=8, top_k=3, candidates=8, passage_bytes=256, quick=True,
            out="runs/synapses-quick",
        )  # fmt: skip
        return cls(**{**fields, **changes})

    @property
    def pairs_path(self) -> Path:
        return Path(self.pairs) if self.pairs else shared_data_dir() / PAIRS_FILE


# ---------------------------------------------------------------------------- sentence sets


@dataclass
class ConceptSets:
    """Pairs (en, fr) of one concept: discovery and held-out, concept and matched contrast."""

    name: str
    discovery: list[translation.Pair]
    discovery_contrast: list[translation.Pair]
    test: list[translation.Pair]
    test_contrast: list[translation.Pair]
    available: int = 0  # concept pairs in the data (one per group)
    sizes: dict[str, int] = field(default_factory=dict)


def _pattern(words: list[str]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)


def one_pair_per_group(pairs: list[translation.Pair]) -> list[translation.Pair]:
    """The first pair of each group sharing a sentence: items that never share a sentence."""
    return [group[0] for group in translation.group_pairs(pairs)]


def concept_sets(
    items: list[translation.Pair],
    name: str,
    is_concept: Any,
    is_excluded: Any,
    discovery: int,
    test: int,
    rng: random.Random,
) -> ConceptSets:
    """Split concept items into test and discovery; pick length-matched contrast items for each."""
    concept = [p for p in items if is_concept(p)]
    pool = [p for p in items if not is_excluded(p)]
    rng.shuffle(concept)
    rng.shuffle(pool)
    want = discovery + test
    if len(concept) < 4:
        raise ValueError(f"concept {name!r}: only {len(concept)} sentences in the data, need ≥ 4")
    chosen = concept[:want]
    n_test = max(2, round(len(chosen) * test / want))
    held, disc = chosen[:n_test], chosen[n_test:]
    contrast = _length_matched(pool, held + disc)
    return ConceptSets(
        name, disc, contrast[n_test:], held, contrast[:n_test], available=len(concept),
        sizes={"discovery": len(disc), "test": len(held)},
    )  # fmt: skip


def _length_matched(pool: list[translation.Pair], targets: list[translation.Pair]) -> list:
    """For each target (in order) an unused pool item of the nearest English length."""
    by_length: dict[int, list[translation.Pair]] = {}
    for p in pool:
        by_length.setdefault(len(p[0]), []).append(p)
    out = []
    for target in targets:
        n = len(target[0])
        length = min((k for k, v in by_length.items() if v), key=lambda k: (abs(k - n), k))
        out.append(by_length[length].pop())
    return out


def builtin_sets(cfg: SynapsesConfig, log: Any) -> list[ConceptSets]:
    pairs = translation.read_pairs(cfg.pairs_path)
    items = one_pair_per_group(pairs)
    log(f"[synapses] {cfg.pairs_path.name}: {len(pairs):,} pairs, {len(items):,} groups")
    every = [_pattern(w[lang]) for w in CONCEPTS.values() for lang in LANGS]

    def excluded(p: translation.Pair) -> bool:
        return any(pat.search(p[0]) or pat.search(p[1]) for pat in every)

    out = []
    wanted = [c.strip() for c in (cfg.concepts or ",".join(CONCEPTS)).split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONCEPTS]
    if unknown:
        raise ValueError(f"unknown concept {unknown[0]!r}; choose from {', '.join(CONCEPTS)}")
    for k, (name, words) in enumerate(CONCEPTS.items()):
        if name not in wanted:
            continue
        en = _pattern(words["en"])
        sets = concept_sets(
            items, name, lambda p, en=en: bool(en.search(p[0])), excluded,
            cfg.discovery, cfg.test, random.Random(cfg.seed + k),
        )  # fmt: skip
        out.append(sets)
    return out


def user_sets(cfg: SynapsesConfig) -> list[ConceptSets]:
    """--concept/--contrast files; a second column of translations enables the cross test."""
    concept = _read_user(Path(cfg.concept or ""))
    contrast = _read_user(Path(cfg.contrast or ""))
    rng = random.Random(cfg.seed)
    rng.shuffle(concept)
    rng.shuffle(contrast)
    n_test = max(2, round(len(concept) * cfg.test / (cfg.discovery + cfg.test)))
    m_test = max(2, round(len(contrast) * cfg.test / (cfg.discovery + cfg.test)))
    if len(concept) - n_test < 2 or len(contrast) - m_test < 2:
        raise ValueError("--concept and --contrast need at least 4 sentences each")
    return [
        ConceptSets(
            Path(cfg.concept or "").stem, concept[n_test:], contrast[m_test:], concept[:n_test],
            contrast[:m_test], available=len(concept),
            sizes={"discovery": len(concept) - n_test, "test": n_test},
        )
    ]  # fmt: skip


def _read_user(path: Path) -> list[translation.Pair]:
    if not path.is_file():
        raise ValueError(f"sentence file not found: {path}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            a, _, b = line.partition("\t")
            out.append((a.strip(), b.strip()))
    return out


# ---------------------------------------------------------------------------- the experiment


def encode(tokenizer: Any, sentences: list[str], lang: str) -> list[torch.Tensor]:
    """Each sentence as the model reads a source: after the stream's newline and source marker."""
    return [
        torch.as_tensor(tokenizer.encode(f"{translation.END}<F:{lang}>{s}"), dtype=torch.long)
        for s in sentences
    ]


def _side(pairs: list[translation.Pair], lang: str) -> list[str]:
    return [p[LANGS.index(lang)] for p in pairs]


def analyse(model: Any, tokenizer: Any, sets: ConceptSets, cfg: SynapsesConfig, log: Any) -> dict:
    """Search, held-out test, cross-language test and shuffled control of one concept."""
    bilingual = all(p[1] for p in sets.discovery + sets.test + sets.test_contrast)
    langs = LANGS if bilingual else ("en",)

    def enc(pairs: list[translation.Pair], lang: str) -> list[torch.Tensor]:
        return encode(tokenizer, _side(pairs, lang), lang)

    result: dict[str, Any] = {"sizes": sets.sizes, "available": sets.available}
    searched = [lang for lang in cfg.search.split(",") if lang in langs]
    if not searched:
        raise ValueError(f"--search names no language of the data ({', '.join(langs)})")
    for lang in searched:
        t0 = time.perf_counter()
        found = concepts.find_concept_synapses(
            model, enc(sets.discovery, lang), enc(sets.discovery_contrast, lang),
            top_k=cfg.top_k, candidates=cfg.candidates,
        )  # fmt: skip
        best = found.best
        entry: dict[str, Any] = {"search": found.to_dict(), "seconds": time.perf_counter() - t0}
        for test_lang in langs:
            test = concepts.test_synapse(
                model, best, enc(sets.test, test_lang), enc(sets.test_contrast, test_lang)
            )
            entry[f"test_{test_lang}"] = test.to_dict()
        result[lang] = entry
        log(f"[synapses] {sets.name} {lang}: best {_name(best)} discovery AUC {best.auc:.3f};"
            + "".join(f" held-out {t}: r {entry[f'test_{t}']['r']:+.3f}"
                      f" p {entry[f'test_{t}']['p']:.2g}" for t in langs))  # fmt: skip
    if cfg.control:
        result["control"] = _control(model, sets, cfg, enc, log)
    return result


def _control(model: Any, sets: ConceptSets, cfg: SynapsesConfig, enc: Any, log: Any) -> dict:
    """The English search with labels shuffled over the discovery set, tested with true labels."""
    mixed = sets.discovery + sets.discovery_contrast
    order = list(range(len(mixed)))
    random.Random(cfg.seed + 1000).shuffle(order)
    fake = [mixed[k] for k in order[: len(sets.discovery)]]
    fake_contrast = [mixed[k] for k in order[len(sets.discovery) :]]
    found = concepts.find_concept_synapses(
        model, enc(fake, "en"), enc(fake_contrast, "en"), top_k=cfg.top_k,
        candidates=cfg.candidates,
    )  # fmt: skip
    test = concepts.test_synapse(
        model, found.best, enc(sets.test, "en"), enc(sets.test_contrast, "en")
    )
    log(f"[synapses] {sets.name} control: best {_name(found.best)} discovery AUC"
        f" {found.best.auc:.3f}; held-out r {test.r:+.3f} p {test.p:.2g}")  # fmt: skip
    return {"search": found.to_dict(), "test_en": test.to_dict()}


def _name(s: concepts.Synapse) -> str:
    return f"σ_{s.layer}^{s.head}({s.i},{s.j}) [{s.feature}]"


def run_synapses(cfg: SynapsesConfig, log: Any = print) -> tuple[dict[str, Any], dict]:
    """Everything but the figures; returns the JSON payload and what the figures need."""
    torch.manual_seed(cfg.seed)
    ckpt_path = cfg.ckpt or quick_checkpoint(cfg, log)
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.model.eval()
    sets = user_sets(cfg) if cfg.concept else builtin_sets(cfg, log)
    log(f"[synapses] config {asdict(cfg)}")
    log(f"[synapses] machine: {platform.machine()} {platform.processor() or ''} torch"
        f" {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    results = {s.name: analyse(model, ckpt.tokenizer, s, cfg, log) for s in sets}
    payload = {
        "experiment": "synapses",
        "config": {**asdict(cfg), "pairs": cfg.pairs_path.name},
        "model": {"checkpoint": str(ckpt_path), "config": asdict(ckpt.config)
                  if hasattr(ckpt.config, "__dataclass_fields__") else str(ckpt.config),
                  "step": ckpt.meta.get("step")},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "concepts": results,
    }  # fmt: skip
    return payload, {"model": model, "tokenizer": ckpt.tokenizer, "sets": sets}


def quick_checkpoint(cfg: SynapsesConfig, log: Any) -> str:
    """--quick without --ckpt: a tiny bilingual model trained for a few steps (a smoke test)."""
    from bdh.train import TrainConfig, train

    runs = Path(cfg.out) / "synapses-quick-run"
    pairs = translation.read_pairs(cfg.pairs_path, limit=4_000)
    translation.write_dataset(pairs, runs / "data", seed=cfg.seed)
    tc = TrainConfig(
        data=str((runs / "data").resolve()), out=str(runs / "bdh"), preset="tiny", max_steps=20,
        batch_size=8, block_size=64, warmup_steps=2, eval_interval=20, eval_batches=2,
        ckpt_interval=20, seed=cfg.seed,
    )  # fmt: skip
    log(f"[synapses] training a tiny model for {tc.max_steps} steps into {tc.out}")
    train(tc, log=lambda m: None)
    return tc.out


# ---------------------------------------------------------------------------- tables and figures


def table_markdown(payload: dict[str, Any]) -> str:
    rows = [
        "| concept | searched on | best synapse | discovery AUC | tested on | U / U_opt | p | r |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in payload["concepts"].items():
        for lang in (k for k in LANGS if k in res and "search" in res[k]):
            best = res[lang]["search"]["top"][0]
            for t in (k for k in LANGS if f"test_{k}" in res[lang]):
                rows.append(_row(name, lang, best, t, res[lang][f"test_{t}"]))
        ctl = res.get("control")
        if ctl:
            top = ctl["search"]["top"][0]
            rows.append(_row(name, "en, shuffled labels", top, "en", ctl["test_en"]))
    return "\n".join(rows) + "\n"


def _row(name: str, lang: str, best: dict, test_lang: str, t: dict) -> str:
    syn = f"σ_{best['layer']}^{best['head']}({best['i']},{best['j']}) {best['feature']}"
    return (
        f"| {name} | {lang} | {syn} | {best['auc']:.3f} | {test_lang} held-out"
        f" ({t['n_concept']}+{t['n_contrast']}) | {t['u']:.0f} / {t['u_opt']:.0f} |"
        f" {t['p']:.2g} | {t['r']:+.3f} |"
    )


def plot(payload: dict[str, Any], extra: dict, out: Path, prefix: str) -> dict[str, Path]:
    """Figs. 11–13 for the first concept's best synapse (of the first language searched on)."""
    import matplotlib

    matplotlib.use("Agg")
    model, tok, sets = extra["model"], extra["tokenizer"], extra["sets"][0]
    res = payload["concepts"][sets.name]
    lang = next(k for k in LANGS if k in res)  # the first language searched on
    top = res[lang]["search"]["top"][0]
    best = concepts.Synapse(**{k: v for k, v in top.items() if k != "auc"})
    paths = {
        "fig11": _fig11(model, tok, sets, best, payload, out / f"{prefix}-fig11.png"),
        "fig12": _fig12(model, tok, sets, best, out / f"{prefix}-fig12.png"),
        "fig13": _fig13(model, tok, sets, best, out / f"{prefix}-fig13.png"),
    }
    return paths


def _fig11(model: Any, tok: Any, sets: ConceptSets, best: Any, payload: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    text = "".join(
        f"{translation.END}<F:en>{a}<T:fr>{b}" for a, b in sets.test + sets.test_contrast
    )
    ids = torch.as_tensor(tok.encode(text)[: payload["config"]["passage_bytes"]], dtype=torch.long)
    sigma = synapses(model, ids, best.layer, best.head)[0, 0].numpy()  # (n, N) at the end
    positive = sigma[sigma > 0]
    tau = float(np.quantile(positive, 0.99)) if positive.size else 0.0
    kept = sigma > tau
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, degrees, what in ((axes[0], kept.sum(1), "out-degree of i (y of layer l−1)"),
                              (axes[1], kept.sum(0), "in-degree of j (x of layer l)")):  # fmt: skip
        values, counts = np.unique(degrees[degrees > 0], return_counts=True)
        ax.loglog(values, counts, "o", ms=4)
        ax.set_xlabel(what)
        ax.set_ylabel("neurons")
    fig.suptitle(f"σ layer {best.layer} head {best.head} after {ids.numel()} bytes,"
                 f" σ > τ = {tau:.3g} (top 1% of positive)", fontsize=9)  # fmt: skip
    payload["fig11"] = {"bytes": int(ids.numel()), "tau": tau, "kept": int(kept.sum())}
    return _save(fig, path)


def _trajectory(model: Any, ids: torch.Tensor, best: Any) -> np.ndarray:
    pair = [(best.i, best.j)]
    return synapses(model, ids, best.layer, best.head, pairs=pair)[0, :, 0].numpy()


def _fig12(model: Any, tok: Any, sets: ConceptSets, best: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    rows = [(p[0], "en", "concept") for p in sets.test[:3]]
    rows += [(p[1], "fr", "concept") for p in sets.test[:3] if p[1]]
    rows += [(p[0], "en", "contrast") for p in sets.test_contrast[:2]]
    fig, axes = plt.subplots(len(rows), 1, figsize=(11, 1.5 * len(rows)), squeeze=False)
    trajs = [_trajectory(model, encode(tok, [s], lang)[0], best) for s, lang, _ in rows]
    jumps = np.concatenate([np.diff(t, prepend=0.0) for t in trajs])
    threshold = 0.5 * float(np.abs(jumps).max() or 1.0)
    for ax, (sentence, lang, kind), traj in zip(axes[:, 0], rows, trajs, strict=True):
        text = f"\n<F:{lang}>{sentence}"
        labels = [chr(b) if 32 <= b < 127 else "·" for b in text.encode()][: len(traj)]
        ax.plot(traj, lw=1)
        step = np.diff(traj, prepend=0.0)
        for t in np.nonzero(np.abs(step) > threshold)[0]:
            ax.text(t, traj[t], "*", color="red", ha="center")
        ax.set_xticks(range(len(labels)), labels, fontsize=6)
        ax.set_ylabel(f"{lang} {kind}", fontsize=7)
    fig.suptitle(f"σ_{best.layer}^{best.head}({best.i},{best.j}) over held-out sentences;"
                 f" * where it changes by more than {threshold:.3g}", fontsize=9)  # fmt: skip
    return _save(fig, path)


def _fig13(model: Any, tok: Any, sets: ConceptSets, best: Any, path: Path) -> Path:
    """Mean y_{l−1} and x_l at each held-out concept sentence's largest jump of the synapse."""
    import matplotlib.pyplot as plt

    from bdh.interpret.synapses import _activations

    ys, xs = [], []
    for ids in encode(tok, _side(sets.test, "en"), "en"):
        t = int(np.argmax(np.diff(_trajectory(model, ids, best), prepend=0.0)))
        y, x = _activations(model, ids[None], best.layer, best.head, torch.float64)
        ys.append(y[0, t].numpy())
        xs.append(x[0, t].numpy())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, mean, own, what in ((axes[0], np.mean(ys, 0), best.i, f"y of layer {best.layer - 1}"),
                                (axes[1], np.mean(xs, 0), best.j,
                                 f"x of layer {best.layer}, head {best.head}")):  # fmt: skip
        top = list(np.argsort(-mean)[:25])
        if own not in top:
            top[-1] = own
        ax.bar(range(len(top)), mean[top], color=["red" if k == own else "gray" for k in top])
        ax.set_xticks(range(len(top)), [str(k) for k in top], rotation=90, fontsize=6)
        ax.set_title(f"{what}: most active at the jump (red: the synapse's neuron {own})",
                     fontsize=8)  # fmt: skip
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    return save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", metavar="DIR", help="a bilingual BDH checkpoint (required unless --quick)"
    )
    p.add_argument(
        "--pairs",
        metavar="FILE",
        help=f"source<TAB>target pairs (default: $BDH_SHARED_DATA/{PAIRS_FILE})",
    )
    p.add_argument(
        "--concept",
        metavar="FILE",
        help="your concept's sentences, one a line (optionally <TAB> a translation)",
    )
    p.add_argument("--contrast", metavar="FILE", help="contrast sentences, same format")
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        default=None,
        help="skip the shuffled-label control search",
    )
    p.add_argument(
        "--concepts",
        metavar="NAMES",
        help=f"built-in concepts, comma-separated (default: {','.join(CONCEPTS)})",
    )
    p.add_argument(
        "--search",
        metavar="LANGS",
        help="languages searched on; each best synapse is tested on both (default: en,fr)",
    )
    p.add_argument(
        "--discovery",
        type=int,
        metavar="N",
        help="concept sentences searched on (default: 100; quick: 12)",
    )
    p.add_argument(
        "--test", type=int, metavar="N", help="held-out concept sentences (default: 50; quick: 8)"
    )
    p.add_argument("--top-k", type=int, metavar="K", help="synapses kept (default: 10)")
    p.add_argument(
        "--candidates",
        type=int,
        metavar="M",
        help="per head, rescored with their largest jump (default: 64)",
    )
    p.add_argument("--seed", type=int, help="seed of splits, matching and shuffles (default: 0)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sets (and, without --ckpt, a tiny model trained for seconds)",
    )
    p.add_argument("--out", metavar="DIR", help="JSON/PNG/table (default: benchmarks/results)")


def config_from_args(args: argparse.Namespace) -> SynapsesConfig:
    keys = ("ckpt", "pairs", "concept", "contrast", "concepts", "search", "discovery", "test",
            "top_k", "candidates", "seed", "out", "control")  # fmt: skip
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if args.quick:
        return SynapsesConfig.quick_config(**given)
    if "ckpt" not in given:
        raise ValueError("bdh experiment synapses needs --ckpt (or --quick to train a tiny model)")
    return SynapsesConfig(**given)


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Path]:
    from bdh.experiments import write_outputs

    cfg = config_from_args(args)
    payload, extra = run_synapses(cfg, log)
    out = Path(cfg.out)
    name = "synapses-quick" if cfg.quick else "synapses"
    if cfg.concepts:
        name += "-" + cfg.concepts.replace(",", "-")
    figs = plot(payload, extra, out, name)
    table = table_markdown(payload)
    paths = write_outputs(out, name, payload, table)
    paths |= figs
    log("\n" + table)
    for path in paths.values():
        log(f"wrote {path}")
    return paths
