"""Sparsity against surprisal (paper §6.4, Fig. 14): does BDH fire more when the input surprises it?

    bdh experiment surprisal --ckpt runs/quickstart [--quick]

Three measurements on one checkpoint, each repeated on its untrained twin (same config and seed,
the weights `bdh train` started from) as the control:

1. Held-out text, in windows of the training block from an empty state: per token, the fraction
   of the n neurons with y ≠ 0 in each layer against the token's surprisal −log p(token | before),
   the model's own loss on it. Spearman ρ per layer with a 95% bootstrap interval over windows
   (tokens of one window are not independent; windows are resampled), and the partial ρ given
   the position in the window (both fall as context accumulates).
2. y density on in-domain held-out text against out-of-domain text (French sentences; the same
   held-out bytes shuffled), per window, with a Mann–Whitney test over windows.
3. Fig. 14: a fixed 13-letter warm-up, then 8 repetitions of a random 8-letter word (77 letters),
   for many words. Per layer the fraction of active y at every position; the first presentation
   (memorisation) against the seven repetitions, paired over words (Wilcoxon signed-rank); the
   loss of each presentation (in-context copying); and (Fig. 14b) neurons in 8 groups by rotary
   frequency, each group spanning a factor θ^(1/8) = 4 of periods, as in the paper.

Writes surprisal.json (every number), surprisal.md (the README tables), fig14a.png, fig14b.png.
"""

from __future__ import annotations

import argparse
import math
import platform
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from bdh.experiments.runs import shared_data_dir
from bdh.figures import save_figure

WARMUP, WORD, REPEATS = 13, 8, 8  # Fig. 14: 13 + 8·8 = 77 letters
GROUPS = 8  # Fig. 14b: rotary-frequency groups
FRENCH_FILE = "tatoeba_eng_fra.tsv"


@dataclass
class SurprisalConfig:
    ckpt: str
    data: str | None = None  # in-domain source (default: the checkpoint's training data, val split)
    ood: str | None = None  # an out-of-domain text file (default: French sentences of Tatoeba)
    tokens: int = 32_768  # held-out tokens of each source
    block_size: int | None = None  # window length (default: the training block)
    words: int = 32  # Fig. 14 random words
    bootstrap: int = 1000  # resamples of the bootstrap intervals
    seed: int = 0
    control: bool = True  # also measure the untrained twin
    out: str = "runs/surprisal"

    def __post_init__(self) -> None:
        for name in ("tokens", "words", "bootstrap"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be ≥ 2, got {getattr(self, name)}")

    @classmethod
    def quick(cls, **changes: Any) -> SurprisalConfig:
        """Seconds: a smoke test of the pipeline, not a result."""
        return cls(**{"tokens": 2_048, "words": 6, "bootstrap": 50, **changes})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="a BDH checkpoint or run directory")
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="in-domain text (default: the checkpoint's training data, val split)",
    )
    p.add_argument(
        "--ood",
        metavar="FILE",
        help="out-of-domain text file (default: the French"
        f" sentences of $BDH_SHARED_DATA/{FRENCH_FILE})",
    )
    p.add_argument(
        "--tokens",
        type=int,
        metavar="N",
        help="held-out tokens per source (default: 32768; quick: 2048)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        metavar="T",
        help="window length (default: the checkpoint's training block)",
    )
    p.add_argument(
        "--words",
        type=int,
        metavar="W",
        help="random words of the Fig. 14 sequence (default: 32; quick: 6)",
    )
    p.add_argument(
        "--bootstrap", type=int, metavar="B", help="bootstrap resamples (default: 1000; quick: 50)"
    )
    p.add_argument("--seed", type=int, help="seed of words, shuffles and resamples (default: 0)")
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        default=None,
        help="skip the untrained twin",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    p.add_argument(
        "--out", metavar="DIR", help="where to write JSON/PNG/table (default: runs/surprisal)"
    )


def config_from_args(args: argparse.Namespace) -> SurprisalConfig:
    keys = (
        "ckpt",
        "data",
        "ood",
        "tokens",
        "block_size",
        "words",
        "bootstrap",
        "seed",
        "control",
        "out",
    )
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    return SurprisalConfig.quick(**given) if args.quick else SurprisalConfig(**given)


# ---------------------------------------------------------------------------- observation


@torch.no_grad()
def token_profile(model: Any, windows: torch.Tensor, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per window and position: surprisal of the token read and the fraction of active x and y.

    windows (W, T) → "surprisal" (W, T) with NaN at position 0 (nothing predicts it), and
    "x", "y" (L, W, T) fractions of the n neurons that fired (heads pooled), and
    "y_groups" (L, G, W, T): the same for y within each of the G rotary-frequency groups.
    """
    L, N = model.config.n_layer, model.config.N
    names = [f"layers.{l}.{k}" for l in range(L) for k in ("x", "y")]
    group = torch.arange(N) * GROUPS // N  # neuron k of a head → its frequency group
    out: dict[str, list[np.ndarray]] = {"surprisal": [], "x": [], "y": [], "y_groups": []}
    model.eval()
    for rows in windows.split(batch_size):
        logits, cache = model.run_with_cache(rows, names=names)
        logp = F.log_softmax(logits.double(), dim=-1)[:, :-1]  # predicts positions 1 .. T−1
        s = -logp.gather(-1, rows[:, 1:, None]).squeeze(-1)
        out["surprisal"].append(F.pad(s, (1, 0), value=math.nan).numpy())
        fired = {k: torch.stack([cache[k, l] > 0 for l in range(L)]) for k in ("x", "y")}
        for k in ("x", "y"):  # (L, B, nh, T, N) → (L, B, T)
            out[k].append(fired[k].double().mean((2, 4)).numpy())
        by_group = torch.stack(
            [fired["y"][..., group == g].double().mean((2, 4)) for g in range(GROUPS)], dim=1
        )
        out["y_groups"].append(by_group.numpy())
    axis = {"surprisal": 0, "x": 1, "y": 1, "y_groups": 2}
    return {k: np.concatenate(v, axis=axis[k]) for k, v in out.items()}


def group_periods(N: int) -> list[list[float]]:
    """The range of rotary periods (positions per turn) of each frequency group."""
    from bdh.ops import frequencies

    period = (1.0 / frequencies(N).double()).numpy()
    group = np.arange(N) * GROUPS // N
    return [
        [float(period[group == g].min()), float(period[group == g].max())] for g in range(GROUPS)
    ]


# ---------------------------------------------------------------------------- statistics


def spearman_by_windows(
    density: np.ndarray, surprisal: np.ndarray, resamples: int, rng: np.random.Generator
) -> dict[str, float]:
    """Spearman ρ of (W, T) arrays pooled over tokens, a 95% bootstrap interval resampling whole
    windows, and the partial ρ given the position in the window.

    A resample repeats whole windows, so it is the original tokens with integer weights; its ρ
    is computed exactly from those weights (`weighted_spearman`), without re-sorting.
    """
    keep = ~np.isnan(surprisal)
    pos = np.broadcast_to(np.arange(density.shape[1]), density.shape)
    d, s, p = density[keep], surprisal[keep], pos[keep]
    rho = float(stats.spearmanr(d, s).statistic)
    window = np.broadcast_to(np.arange(density.shape[0])[:, None], density.shape)[keep]
    inv_d, inv_s = (np.unique(v, return_inverse=True)[1] for v in (d, s))
    W = density.shape[0]
    boot = [
        weighted_spearman(inv_d, inv_s, np.bincount(rng.integers(0, W, W), minlength=W)[window])
        for _ in range(resamples)
    ]
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    partial = _partial(rho, stats.spearmanr(d, p).statistic, stats.spearmanr(s, p).statistic)
    return {
        "rho": rho,
        "ci95": [float(lo), float(hi)],
        "partial_rho_given_position": partial,
        "tokens": int(keep.sum()),
    }


def weighted_spearman(inv_a: np.ndarray, inv_b: np.ndarray, weight: np.ndarray) -> float:
    """Spearman ρ of a sample in which item k appears weight[k] times; inv_a, inv_b give each
    item's position among the sorted distinct values of a and b (np.unique's inverse)."""
    ra, rb = _midranks(inv_a, weight), _midranks(inv_b, weight)
    total = weight.sum()
    ma, mb = (weight * ra).sum() / total, (weight * rb).sum() / total
    cov = (weight * (ra - ma) * (rb - mb)).sum()
    var = (weight * (ra - ma) ** 2).sum() * (weight * (rb - mb) ** 2).sum()
    return float(cov / np.sqrt(var)) if var > 0 else float("nan")


def _midranks(inv: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The average rank (1-based, ties averaged, as scipy's rankdata) of every item."""
    count = np.bincount(inv, weights=weight)
    below = np.cumsum(count) - count
    return (below + (count + 1) / 2)[inv]


def _paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p over paired samples; 1.0 when they do not differ at all."""
    if np.array_equal(a, b):
        return 1.0
    return float(stats.wilcoxon(a, b).pvalue)


def _partial(r_xy: float, r_xz: float, r_yz: float) -> float:
    return float((r_xy - r_xz * r_yz) / math.sqrt(max(1e-300, (1 - r_xz**2) * (1 - r_yz**2))))


def mean_ci(values: np.ndarray, resamples: int, rng: np.random.Generator) -> dict[str, Any]:
    """Mean of per-window values with a 95% bootstrap interval."""
    boot = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(resamples)]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(values.mean()), "ci95": [float(lo), float(hi)]}


# ---------------------------------------------------------------------------- the sources


def windows_of(tokens: np.ndarray, block: int, count: int) -> torch.Tensor:
    """The first `count` tokens (or all there are) as full (W, block) windows."""
    W = min(count, len(tokens)) // block
    if W < 2:
        raise ValueError(f"need at least 2 windows of {block} tokens, got {len(tokens)} tokens")
    return torch.as_tensor(np.asarray(tokens[: W * block], dtype=np.int64)).view(W, block)


def french_text(path: Path, limit_bytes: int, rng: np.random.Generator) -> bytes:
    """Distinct French sentences (the second column of a Tatoeba-style TSV) drawn at random, one
    per line, about limit_bytes of them: the file is sorted by length, so its head would be only
    the shortest exclamations."""
    from bdh.data import DataError

    if not path.is_file():
        raise DataError(f"out-of-domain text not found: {path} (give one with --ood FILE)")
    with path.open("rb") as f:
        rows = (raw.rstrip(b"\n").split(b"\t") for raw in f)
        sentences = list(dict.fromkeys(r[1] for r in rows if len(r) >= 2 and r[1]))
    lines, size = [], 0
    for k in rng.permutation(len(sentences)):
        lines.append(sentences[k])
        size += len(sentences[k]) + 1
        if size >= limit_bytes:
            break
    return b"\n".join(lines)


def sources(cfg: SurprisalConfig, ckpt: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """In-domain held-out tokens, out-of-domain tokens, and the in-domain tokens shuffled."""
    from bdh import data as bdh_data
    from bdh.interpret.sparsity import checkpoint_tokens

    held, _ = checkpoint_tokens(ckpt, cfg.data, None, cfg.tokens)
    if cfg.ood:
        ood_bytes = bdh_data.load_corpus(cfg.ood).split("all")
        ood_name = f"out-of-domain ({Path(cfg.ood).name})"
    else:
        ood_bytes = french_text(shared_data_dir() / FRENCH_FILE, 2 * cfg.tokens, rng)
        ood_name = "French (Tatoeba, random sentences)"
    ood = np.asarray(ckpt.tokenizer.encode(ood_bytes.decode("utf-8", "replace")))[: cfg.tokens]
    return {"in-domain (held out)": held, ood_name: ood, "shuffled held-out": rng.permutation(held)}


def periodic_sequences(words: int, rng: np.random.Generator) -> tuple[str, list[str]]:
    """The fixed warm-up (13 letters) and `words` random 8-letter words."""
    letters = np.array(list(string.ascii_lowercase))
    warmup = "".join(np.random.default_rng(12345).choice(letters, WARMUP))  # fixed for every run
    return warmup, ["".join(rng.choice(letters, WORD)) for _ in range(words)]


# ---------------------------------------------------------------------------- the experiment


def measure(
    model: Any,
    cfg: SurprisalConfig,
    srcs: dict[str, np.ndarray],
    block: int,
    warmup: str,
    words: list[str],
    tokenizer: Any,
) -> dict[str, Any]:
    """All three measurements on one model."""
    rng = np.random.default_rng(cfg.seed + 1)
    profiles = {
        name: token_profile(model, windows_of(t, block, cfg.tokens)) for name, t in srcs.items()
    }
    held = profiles[next(iter(srcs))]
    L = held["y"].shape[0]
    result: dict[str, Any] = {
        "correlation": [
            spearman_by_windows(held["y"][l], held["surprisal"], cfg.bootstrap, rng)
            for l in range(L)
        ],
        "domains": _domains(profiles, cfg.bootstrap, rng),
    }
    ids = [tokenizer.encode(warmup + w * REPEATS) for w in words]
    if len({len(i) for i in ids}) != 1 or len(ids[0]) != WARMUP + WORD * REPEATS:
        raise ValueError("the Fig. 14 sequences need a tokenizer with one token per letter (bytes)")
    fig14 = token_profile(model, torch.as_tensor(np.stack(ids), dtype=torch.long))
    result["fig14"] = _fig14(fig14)
    return result


def _domains(
    profiles: dict[str, dict[str, np.ndarray]], resamples: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Per source and layer: mean y and x density over windows (bootstrap interval), mean
    surprisal, and a Mann–Whitney test of per-window y density against the in-domain text."""
    names = list(profiles)
    base = profiles[names[0]]["y"].mean(-1)  # (L, W) per-window density
    out: dict[str, Any] = {}
    for name, prof in profiles.items():
        y, x = prof["y"].mean(-1), prof["x"].mean(-1)
        entry: dict[str, Any] = {
            "windows": int(y.shape[1]),
            "surprisal": float(np.nanmean(prof["surprisal"])),
            "y_density": [mean_ci(y[l], resamples, rng) for l in range(len(y))],
            "x_density": [float(x[l].mean()) for l in range(len(x))],
        }
        if name != names[0]:
            entry["mannwhitney_p_vs_in_domain"] = [
                float(stats.mannwhitneyu(y[l], base[l]).pvalue) for l in range(len(y))
            ]
        out[name] = entry
    return out


def _fig14(prof: dict[str, np.ndarray]) -> dict[str, Any]:
    """Memorisation (first presentation) against repetition (the other seven), per layer."""
    first = slice(WARMUP, WARMUP + WORD)
    rest = slice(WARMUP + WORD, WARMUP + WORD * REPEATS)
    y, groups = prof["y"], prof["y_groups"]  # (L, W, 77), (L, G, W, 77)
    layers = []
    for l in range(y.shape[0]):
        mem, rep = y[l][:, first].mean(-1), y[l][:, rest].mean(-1)  # per word
        layers.append(
            {
                "memorisation": float(mem.mean()),
                "repetition": float(rep.mean()),
                "ratio": float(mem.mean() / max(rep.mean(), 1e-12)),
                "words_higher_when_memorising": int((mem > rep).sum()),
                "wilcoxon_p": _paired_p(mem, rep),
                "groups": [
                    {
                        "memorisation": float(groups[l, g][:, first].mean()),
                        "repetition": float(groups[l, g][:, rest].mean()),
                        "ratio": float(
                            groups[l, g][:, first].mean() / max(groups[l, g][:, rest].mean(), 1e-12)
                        ),
                    }
                    for g in range(groups.shape[1])
                ],
            }
        )
    s = prof["surprisal"]  # (W, 77)
    loss = [s[:, WARMUP + r * WORD : WARMUP + (r + 1) * WORD].mean(-1) for r in range(REPEATS)]
    return {
        "words": int(y.shape[1]),
        "layers": layers,
        "loss_per_presentation": [float(v.mean()) for v in loss],
        "loss_first_vs_last_wilcoxon_p": _paired_p(loss[0], loss[-1]),
        "y_over_time": y.mean(1).tolist(),  # (L, 77) mean over words
        "y_groups_over_time": groups.mean(2).tolist(),  # (L, G, 77)
        "loss_over_time": [None, *s[:, 1:].mean(0).tolist()],  # nothing predicts position 0
    }


def run_surprisal(cfg: SurprisalConfig, log: Any = print) -> dict[str, Any]:
    from bdh.checkpoint import load_checkpoint
    from bdh.interpret.sparsity import untrained_twin
    from bdh.train import choose_threads

    torch.set_num_threads(choose_threads())
    ckpt = load_checkpoint(cfg.ckpt)
    if ckpt.kind != "bdh":
        raise ValueError(f"{ckpt.path} holds a {ckpt.kind} model; this experiment needs BDH")
    block = cfg.block_size or int(ckpt.meta.get("train", {}).get("block_size", 256))
    rng = np.random.default_rng(cfg.seed)
    srcs = sources(cfg, ckpt, rng)
    warmup, words = periodic_sequences(cfg.words, rng)
    log(
        f"[surprisal] {ckpt.path}: block {block}, sources "
        + ", ".join(f"{k} {len(v):,} tokens" for k, v in srcs.items())
    )
    log(f"[surprisal] config: {asdict(cfg)}")
    log(
        f"[surprisal] machine: {platform.machine()}, {torch.get_num_threads()} threads,"
        f" torch {torch.__version__}"
    )
    start = time.perf_counter()
    models = {"trained": ckpt.model}
    if cfg.control:
        models["untrained"] = untrained_twin(ckpt)
    results = {}
    for name, model in models.items():
        log(f"[surprisal] measuring the {name} model")
        results[name] = measure(model, cfg, srcs, block, warmup, words, ckpt.tokenizer)
    return {
        "config": asdict(cfg),
        "checkpoint": str(ckpt.path),
        "model_config": ckpt.config.to_dict(),
        "block_size": block,
        "warmup": warmup,
        "words": words,
        "group_periods": group_periods(ckpt.config.N),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "seconds": time.perf_counter() - start,
        "models": results,
    }


# ---------------------------------------------------------------------------- report


def table_markdown(payload: dict[str, Any]) -> str:
    """The README tables: correlation, domains, and Fig. 14 memorisation vs repetition."""
    models = payload["models"]
    out = [
        "Spearman ρ of per-token y density and surprisal (held-out text, 95% bootstrap"
        " interval over windows; partial ρ given the position in the window):",
        "",
        "| model | layer | ρ | 95% interval | partial ρ given position |",
        "|---|---:|---:|---|---:|",
    ]
    for name, r in models.items():
        for l, c in enumerate(r["correlation"]):
            lo, hi = c["ci95"]
            out.append(
                f"| {name} | {l} | {c['rho']:+.3f} | [{lo:+.3f}, {hi:+.3f}]"
                f" | {c['partial_rho_given_position']:+.3f} |"
            )
    out += [
        "",
        "Mean fraction of active y per layer by source (per-window means; p: Mann–Whitney"
        " over windows against the in-domain text):",
        "",
        "| model | source | surprisal (nats) | y density by layer | p by layer |",
        "|---|---|---:|---|---|",
    ]
    for name, r in models.items():
        for src, d in r["domains"].items():
            dens = " / ".join(f"{e['mean']:.2%}" for e in d["y_density"])
            ps = " / ".join(f"{p:.1e}" for p in d.get("mannwhitney_p_vs_in_domain", [])) or "–"
            out.append(f"| {name} | {src} | {d['surprisal']:.2f} | {dens} | {ps} |")
    out += [
        "",
        "Fig. 14 (13-letter warm-up + 8 × a random 8-letter word, "
        f"{payload['config']['words']} words): fraction of active y while memorising (first"
        " presentation) and repeating (presentations 2–8); p: Wilcoxon signed-rank over"
        " words:",
        "",
        "| model | layer | memorising | repeating | ratio | words higher when memorising | p |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in models.items():
        f = r["fig14"]
        for l, e in enumerate(f["layers"]):
            out.append(
                f"| {name} | {l} | {e['memorisation']:.2%} | {e['repetition']:.2%}"
                f" | {e['ratio']:.2f} | {e['words_higher_when_memorising']}/{f['words']}"
                f" | {e['wilcoxon_p']:.1e} |"
            )
    out += [
        "",
        "Loss (nats/letter) of each presentation of the word, mean over words"
        " (p: first vs last, Wilcoxon):",
        "",
        "| model | " + " | ".join(str(r + 1) for r in range(REPEATS)) + " | p |",
        "|---|" + "---:|" * (REPEATS + 1),
    ]
    for name, r in models.items():
        f = r["fig14"]
        cells = " | ".join(f"{v:.2f}" for v in f["loss_per_presentation"])
        out.append(f"| {name} | {cells} | {f['loss_first_vs_last_wilcoxon_p']:.1e} |")
    out += [
        "",
        "Fig. 14b: memorising / repeating y density by rotary-frequency group (group 0"
        " turns fastest), per layer of the trained model:",
        "",
        "| layer | " + " | ".join(f"g{g}" for g in range(GROUPS)) + " |",
        "|---:|" + "---:|" * GROUPS,
    ]
    for l, e in enumerate(models["trained"]["fig14"]["layers"]):
        out.append(f"| {l} | " + " | ".join(f"{g['ratio']:.2f}" for g in e["groups"]) + " |")
    return "\n".join(out) + "\n"


def plot(payload: dict[str, Any], out: Path) -> dict[str, Path]:
    """fig14a.png: active y per layer over the 77 positions, and the loss; fig14b.png: the
    trained model's y by rotary-frequency group over time, and memorising/repeating ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = payload["models"]
    bounds = [WARMUP + r * WORD for r in range(REPEATS + 1)]
    fig, axes = plt.subplots(
        2, len(models), figsize=(6.5 * len(models), 6.5), squeeze=False, sharex=True
    )
    for c, (name, r) in enumerate(models.items()):
        f = r["fig14"]
        for l, curve in enumerate(f["y_over_time"]):
            axes[0, c].plot(np.asarray(curve) * 100, label=f"layer {l}")
        axes[1, c].plot(f["loss_over_time"], color="k")
        for ax in axes[:, c]:
            for b in bounds:
                ax.axvline(b - 0.5, color="grey", lw=0.5, ls=":")
        axes[0, c].set(title=f"{name}: active y (mean over {f['words']} words)", ylabel="% of n")
        axes[0, c].legend()
        axes[1, c].set(
            xlabel="position (13 warm-up letters, then 8 × an 8-letter word)", ylabel="loss (nats)"
        )
    paths = {"fig14a": save_figure(fig, out / "fig14a.png", dpi=110)}

    f = models["trained"]["fig14"]
    L = len(f["layers"])
    fig, axes = plt.subplots(2, L, figsize=(4.5 * L, 6.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    periods = payload["group_periods"]
    for l in range(L):
        for g, curve in enumerate(f["y_groups_over_time"][l]):
            axes[0, l].plot(
                np.asarray(curve) * 100,
                color=cmap(g / (GROUPS - 1)),
                label=f"g{g}: {periods[g][0]:.0f}–{periods[g][1]:.0f}",
            )
        for b in bounds:
            axes[0, l].axvline(b - 0.5, color="grey", lw=0.5, ls=":")
        axes[0, l].set(
            title=f"trained, layer {l}: active y by frequency group",
            xlabel="position",
            ylabel="% of the group",
        )
        ratios = [g["ratio"] for g in f["layers"][l]["groups"]]
        axes[1, l].bar(range(GROUPS), ratios, color=[cmap(g / (GROUPS - 1)) for g in range(GROUPS)])
        axes[1, l].axhline(1.0, color="k", lw=0.5)
        axes[1, l].set(
            xlabel="frequency group (0: fastest rotation)", ylabel="memorising / repeating"
        )
    axes[0, 0].legend(fontsize=6, title="period (positions)", title_fontsize=6)
    paths["fig14b"] = save_figure(fig, out / "fig14b.png", dpi=110)
    return paths


def run(args: argparse.Namespace, log: Any = print) -> dict[str, Path]:
    """`bdh experiment surprisal`: measure, then write JSON, the markdown tables and the plots."""
    from bdh.experiments import write_outputs

    cfg = config_from_args(args)
    payload = run_surprisal(cfg, log)
    out = Path(cfg.out)
    name = "surprisal" + ("-quick" if args.quick else "")
    table = table_markdown(payload)
    paths = write_outputs(out, name, payload, table)
    paths |= plot(payload, out)
    log("\n" + table)
    for path in paths.values():
        log(f"wrote {path}")
    return paths
