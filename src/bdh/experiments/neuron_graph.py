"""`bdh experiment neuron-graph --ckpt C`: the emergent neuron graph of a checkpoint (Figs. 9–10).

For G_x = D_x E and G_y = D_y E of the checkpoint and of its initialisation (same config, same
seed: the trainer seeds torch and then builds the model, so the untrained weights are rebuilt
exactly), block by block (`bdh.interpret.neuron_graph`):

- Fig. 9a: the entries' histogram, its symmetric part min(f(x), f(−x)), the skew, and β from the
  stated tail rule (`tail_threshold`) on each matrix's pooled histogram; per encoder head the
  positive-tail mass beyond the mirror image, and a flag when the rule finds no tail (the
  "inhibitory-looking" head of the paper).
- Per head pair at β: modularity (best of `runs` seeded Louvain runs) of G_{≥β}, of G(n, m) with
  the same edge count on the same node sets, of (P₁P₂ᵀ)_{≥β'} (P ~ N(0, 1)^{N×D}) thresholded to
  the same edge count, of the untrained block thresholded to the same edge count, and of the
  inhibitory part |G_{≤−β}|.
- Fig. 9b: for the block with the largest positive tail, modularity against the edge count along
  a β sweep (bounded by `max_edges`), for the same four graphs and the inhibitory part.
- Fig. 10: in- and out-degrees of the whole G_x graph on nh·N neurons at β (and of the untrained
  graph at matched edges), power-law fits compared with a log-normal, and a k-core drawing.

Thresholds are compared in units of each matrix's rms entry, so trained and untrained weights of
different scales are read on one axis; β is also given in the weights' own units.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdh.checkpoint import CheckpointError, load_checkpoint
from bdh.config import ConfigError
from bdh.interpret import neuron_graph as ng

DEFAULT_SEED = 1337  # the trainer's default, used only when a checkpoint does not record its seed


@dataclass
class NeuronGraphConfig:
    ckpt: str
    out: str = "benchmarks/results"
    name: str | None = None  # file stem: neuron-graph-<name>; default the run's directory name
    max_edges: int = 262_144  # edges kept per block and sign: bounds memory and the β sweep
    runs: int = 5  # Louvain runs per graph (the best is reported, as in the paper)
    sweep_points: int = 6  # edge counts of the Fig. 9b sweep, geometric up to max_edges
    ratio: float = 2.0  # the tail rule: #{w ≥ β} ≥ ratio · #{w ≤ −β} from β on
    min_count: int = 100  # ... at every edge with at least this many entries above it
    rows: int = 1024  # rows per tile of a block
    seed: int = 0  # seed of the Louvain runs and of the random baselines
    init_seed: int | None = None  # the untrained model's seed (default: the checkpoint's)
    backend: str | None = None  # Louvain backend (default: the fastest installed)
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("max_edges", "runs", "sweep_points", "min_count", "rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ratio <= 1.0:
            raise ConfigError(f"ratio must be > 1, got {self.ratio}")
        if self.backend is not None and self.backend not in ng.backends():
            raise ConfigError(f"backend must be one of {ng.backends()}, got {self.backend!r}")


# ---------------------------------------------------------------------------- the two models


def load_models(cfg: NeuronGraphConfig) -> tuple[Any, ng.Factors, ng.Factors, int, str]:
    """(checkpoint, trained factors, untrained factors, init seed, where the seed came from)."""
    ckpt = load_checkpoint(cfg.ckpt)
    if ckpt.kind != "bdh":
        raise CheckpointError(f"{ckpt.path} holds a {ckpt.kind!r} model; the neuron graph is BDH's")
    seed, source = init_seed(ckpt.meta, cfg.init_seed)
    return (
        ckpt,
        ng.factors_of(ckpt.model),
        ng.factors_of(untrained(ckpt.config, seed)),
        seed,
        source,
    )


def init_seed(meta: dict[str, Any], given: int | None) -> tuple[int, str]:
    if given is not None:
        return given, "given"
    train = meta.get("train")
    if isinstance(train, dict) and isinstance(train.get("seed"), int):
        return train["seed"], "checkpoint"
    return DEFAULT_SEED, "default (the checkpoint records none)"


def untrained(config: Any, seed: int) -> torch.nn.Module:
    """The model as `bdh train` initialised it: torch seeded with the run's seed, then built."""
    from bdh.model import BDH

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return BDH(config)
    finally:
        torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------- scanning


@dataclass
class MatrixScan:
    """All nh² blocks of one matrix (G_x or G_y) of one model, on one histogram grid."""

    grid: ng.Grid
    scale: float  # the matrix's rms entry
    blocks: dict[tuple[int, int], ng.BlockScan]

    def pooled(self, heads: list[int] | None = None) -> np.ndarray:
        """Summed histogram of the blocks whose target head is in `heads` (all by default)."""
        return sum(s.counts for (a, _), s in self.blocks.items() if heads is None or a in heads)


def scan_matrix(
    f: ng.Factors, which: str, keep: int, negatives: bool, rows: int, log: Any
) -> MatrixScan:
    nh = f.n_head
    pairs = [(a, b) for a in range(nh) for b in range(nh)]
    sq = [ng.rms(*f.block(which, a, b)) ** 2 for a, b in pairs]
    scale = math.sqrt(sum(sq) / len(sq))
    bound = max(ng.entry_bound(*f.block(which, a, b)) for a, b in pairs)
    grid = ng.make_grid(scale, bound)
    blocks = {}
    for a, b in pairs:
        blocks[a, b] = ng.scan(*f.block(which, a, b), grid, keep, a == b, negatives, rows)
        log(f"  G_{which}[{a},{b}] scanned")
    return MatrixScan(grid, scale, blocks)


# ---------------------------------------------------------------------------- per-head-pair numbers


def edges_at(top: tuple[np.ndarray, ...], beta: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """The kept entries ≥ β as (i, j), and whether the cap may have cut some off."""
    i, j, w = top
    k = int(np.searchsorted(-w, -beta, side="right"))
    return i[:k], j[:k], k == w.size


def top_m(top: tuple[np.ndarray, ...], m: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The m largest kept entries as (i, j) and the threshold β' they imply."""
    i, j, w = top
    m = min(m, w.size)
    return i[:m], j[:m], float(w[m - 1]) if m else math.inf


def compare_block(
    ctx: dict[str, Any], a: int, b: int, beta: float, trained: ng.BlockScan, init: ng.BlockScan
) -> dict[str, Any]:
    """Modularity at β of the trained block, its three baselines and its inhibitory part."""
    N, runs, seed, backend = ctx["N"], ctx["runs"], ctx["seed"], ctx["backend"]
    diag = a == b
    i, j, cut = edges_at(trained.top, beta)
    m = int(i.size)

    def q(u: np.ndarray, v: np.ndarray) -> dict[str, Any]:
        res = ng.modularity(*ng.node_ids(u, v, N, diag), runs=runs, seed=seed, backend=backend)
        return {"q": res.q, "communities": res.communities, "edges": res.edges}

    rng = np.random.default_rng([seed, a, b])
    li, lj, lbeta = top_m(ctx["lowrank_diag" if diag else "lowrank_off"], m)
    ui, uj, ubeta = top_m(init.top, m)
    ii, ij, icut = edges_at(trained.bottom, beta) if trained.bottom else (i[:0], j[:0], False)
    return {
        "a": a,
        "b": b,
        "edges": m,
        "capped": cut,
        "trained": q(i, j),
        "gnm": q(*ng.gnm_pairs(N, m, diag, rng)),
        "lowrank": {**q(li, lj), "beta_units": lbeta / ctx["lowrank_scale"]},
        "untrained": {**q(ui, uj), "beta_units": ubeta / ctx["init_scale"]},
        "inhibitory": {**q(ii, ij), "capped": icut},
    }


# ---------------------------------------------------------------------------- the sweep (Fig. 9b)


def sweep(
    ctx: dict[str, Any], a: int, b: int, trained: ng.BlockScan, init: ng.BlockScan, beta: float
) -> list[dict[str, Any]]:
    """Modularity against edges for one block, at geometric edge counts and at β's count."""
    N, keep = ctx["N"], ctx["max_edges"]
    # From a quarter of an edge per neuron up to the cap, or a quarter of the block's pairs: a
    # graph with most pairs connected has no communities left to find.
    lo, hi = max(N // 4, 16), min(keep, N * N // 4)
    counts = np.unique(np.geomspace(lo, hi, ctx["sweep_points"]).astype(np.int64))
    at_beta = int(edges_at(trained.top, beta)[0].size)
    counts = sorted({*counts.tolist(), at_beta} - {0})
    points = []
    for m in counts:
        ti, tj, tbeta = top_m(trained.top, m)
        point = compare_block({**ctx}, a, b, tbeta, trained, init)
        point["beta"] = tbeta
        point["beta_units"] = tbeta / ctx["scale"]
        points.append(point)
        ctx["log"](
            f"  sweep m={point['edges']}: trained {point['trained']['q']:.3f}"
            f" G(n,m) {point['gnm']['q']:.3f} low-rank {point['lowrank']['q']:.3f}"
            f" untrained {point['untrained']['q']:.3f}"
            f" inhibitory {point['inhibitory']['q']:.3f} ({point['inhibitory']['edges']} edges)"
        )
        del ti, tj
    return points


# ---------------------------------------------------------------------------- degrees (Fig. 10)


def whole_graph_edges(
    blocks: dict[tuple[int, int], ng.BlockScan], beta: float | None, m_of: dict | None = None
) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """Per-block edges of the whole graph: entries ≥ β, or each block's m_of[a, b] largest."""
    out = []
    for (a, b), s in blocks.items():
        if m_of is None:
            i, j, _ = edges_at(s.top, beta)
        else:
            i, j, _ = top_m(s.top, m_of[a, b])
        out.append((a, b, i.astype(np.int64), j.astype(np.int64)))
    return out


def degree_report(edges: list, nh: int, N: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    din, dout = ng.degrees(edges, nh, N)
    report = {
        "edges": int(din.sum()),
        "in": {"max": int(din.max()), "mean": float(din.mean()), "fit": ng.powerlaw_fit(din)},
        "out": {"max": int(dout.max()), "mean": float(dout.mean()), "fit": ng.powerlaw_fit(dout)},
    }
    return report, din, dout


def flat_ids(edges: list, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-graph node numbers h·N + i of every edge (source, target)."""
    u = np.concatenate([b * N + i for a, b, i, j in edges]) if edges else np.zeros(0, np.int64)
    v = np.concatenate([a * N + j for a, b, i, j in edges]) if edges else np.zeros(0, np.int64)
    return u, v


# ---------------------------------------------------------------------------- the whole analysis


def run_neuron_graph(cfg: NeuronGraphConfig, log: Any = print) -> dict[str, Any]:
    """Everything above for one checkpoint; returns the JSON payload (and the data to plot)."""
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ckpt, trained, init, seed, seed_source = load_models(cfg)
    nh, N, D = trained.n_head, trained.N, trained.D
    backend = cfg.backend or ng.backends()[0]
    log(f"[neuron-graph] {ckpt.path}: nh={nh} N={N} D={D}, {nh * nh} blocks of {N * N:,} entries")
    log(f"[neuron-graph] untrained twin: seed {seed} ({seed_source}); Louvain: {backend}")
    P1, P2 = ng.lowrank_factors(N, D, cfg.seed)
    ctx: dict[str, Any] = {
        "N": N, "runs": cfg.runs, "seed": cfg.seed, "backend": backend, "log": log,
        "max_edges": cfg.max_edges, "sweep_points": cfg.sweep_points,
    }  # fmt: skip
    lr_grid = ng.make_grid(ng.rms(P1, P2), ng.entry_bound(P1, P2))
    ctx["lowrank_scale"] = ng.rms(P1, P2)
    ctx["lowrank_diag"] = ng.scan(P1, P2, lr_grid, cfg.max_edges, True, rows=cfg.rows).top
    ctx["lowrank_off"] = ng.scan(P1, P2, lr_grid, cfg.max_edges, False, rows=cfg.rows).top
    payload: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "config": {**dataclasses.asdict(cfg), "backend": backend},
        "model": {"n_head": nh, "N": N, "D": D, "step": ckpt.meta.get("step")},
        "init_seed": seed,
        "init_seed_source": seed_source,
        "matrices": {},
    }
    plots: dict[str, Any] = {}
    for which in ng.MATRICES:
        log(f"[neuron-graph] G_{which}: scanning the trained blocks")
        t_scan = scan_matrix(trained, which, cfg.max_edges, True, cfg.rows, log)
        log(f"[neuron-graph] G_{which}: scanning the untrained blocks")
        u_scan = scan_matrix(init, which, cfg.max_edges, False, cfg.rows, log)
        result, plot = analyse_matrix(cfg, ctx, which, t_scan, u_scan, nh, N)
        payload["matrices"][which] = result
        plots[which] = plot
        del t_scan, u_scan
    payload["seconds"] = time.perf_counter() - start
    payload["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    payload["load_average"] = os.getloadavg()[0]
    return {"payload": payload, "plots": plots}


def analyse_matrix(
    cfg: NeuronGraphConfig,
    ctx: dict[str, Any],
    which: str,
    t_scan: MatrixScan,
    u_scan: MatrixScan,
    nh: int,
    N: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    log = ctx["log"]
    rule = {"ratio": cfg.ratio, "min_count": cfg.min_count}
    beta = ng.tail_threshold(t_scan.pooled(), t_scan.grid, **rule)
    u_beta = ng.tail_threshold(u_scan.pooled(), u_scan.grid, **rule)
    chosen, how = beta, "tail rule"
    if beta is None:  # no tail: an edge count like the paper's (about 6 per neuron and block)
        chosen = float(
            np.median([s.top[2][min(6 * N, s.top[2].size) - 1] for s in t_scan.blocks.values()])
        )
        how = "no tail: the median threshold giving 6N edges per block"
    log(f"[neuron-graph] G_{which}: β = {chosen:.4g} ({chosen / t_scan.scale:.2f} rms; {how})")
    ctx = {**ctx, "scale": t_scan.scale, "init_scale": u_scan.scale}
    heads = [head_report(t_scan, u_scan, a, chosen, rule) for a in range(nh)]
    blocks = []
    for (a, b), s in t_scan.blocks.items():
        row = compare_block(ctx, a, b, chosen, s, u_scan.blocks[a, b])
        row |= block_shape(s, t_scan.grid, rule, t_scan.scale)
        row["untrained_shape"] = block_shape(u_scan.blocks[a, b], u_scan.grid, rule, u_scan.scale)
        blocks.append(row)
        log(
            f"  [{a},{b}] m={row['edges']}: Q trained {row['trained']['q']:.3f},"
            f" G(n,m) {row['gnm']['q']:.3f}, low-rank {row['lowrank']['q']:.3f},"
            f" untrained {row['untrained']['q']:.3f}, inhibitory {row['inhibitory']['q']:.3f}"
        )
    main = max(blocks, key=lambda r: r["excess"])
    a, b = main["a"], main["b"]
    log(f"[neuron-graph] G_{which}: sweep of block [{a},{b}] (largest positive tail)")
    points = sweep(ctx, a, b, t_scan.blocks[a, b], u_scan.blocks[a, b], chosen)
    edges = whole_graph_edges(t_scan.blocks, chosen)
    m_of = {(r["a"], r["b"]): r["edges"] for r in blocks}
    u_edges = whole_graph_edges(u_scan.blocks, None, m_of)
    deg, din, dout = degree_report(edges, nh, N)
    u_deg, u_din, u_dout = degree_report(u_edges, nh, N)
    u, v = flat_ids(edges, N)
    core = ng.core_numbers(u, v)
    gu, gv = flat_ids(gnm_whole(edges, N, cfg.seed), N)
    result = {
        "beta": chosen,
        "beta_units": chosen / t_scan.scale,
        "beta_rule": how,
        "rms": t_scan.scale,
        "untrained_rms": u_scan.scale,
        "untrained_beta_units": None if u_beta is None else u_beta / u_scan.scale,
        "skew": pooled_skew(t_scan),
        "untrained_skew": pooled_skew(u_scan),
        "heads": heads,
        "flagged_heads": [h["head"] for h in heads if h["flagged"]],
        "blocks": blocks,
        "summary": summarise(blocks),
        "sweep": {"block": [a, b], "edges_at_beta": main["edges"], "points": points},
        "degrees": {"trained": deg, "untrained_matched": u_deg},
        "core": {
            "trained": ng.core_summary(u, v, core),
            "gnm": ng.core_summary(gu, gv, ng.core_numbers(gu, gv)),
        },
    }
    plot = {
        "grid": t_scan.grid, "counts": t_scan.pooled(), "scale": t_scan.scale,
        "head_counts": [t_scan.pooled([h]) for h in range(nh)],
        "u_grid": u_scan.grid, "u_counts": u_scan.pooled(), "u_scale": u_scan.scale,
        "din": din, "dout": dout, "u_din": u_din, "u_dout": u_dout,
        "u": u, "v": v, "core": core, "N": N, "nh": nh,
    }  # fmt: skip
    return result, plot


def gnm_whole(edges: list, N: int, seed: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """G(n, m) per block with each block's edge count: the whole-graph control for the cores."""
    rng = np.random.default_rng([seed, 1])
    return [(a, b, *ng.gnm_pairs(N, i.size, a == b, rng)) for a, b, i, _ in edges]


def block_shape(s: ng.BlockScan, grid: ng.Grid, rule: dict, scale: float) -> dict[str, Any]:
    """The block's own tail: its β by the rule (None: no tail), skew and excess mass."""
    beta = ng.tail_threshold(s.counts, grid, **rule)
    total = int(s.counts.sum())
    return {
        "block_beta_units": None if beta is None else beta / scale,
        "skew": s.skew,
        "excess": ng.excess_above(s.counts, grid, beta) / total if beta is not None else 0.0,
    }


def head_report(t: MatrixScan, u: MatrixScan, a: int, beta: float, rule: dict) -> dict[str, Any]:
    """Encoder head a (the target of its blocks): its tail by the rule, pooled over sources."""
    counts = t.pooled([a])
    own = ng.tail_threshold(counts, t.grid, **rule)
    total = int(counts.sum())
    up, down = ng.survival(counts)
    k = min(round(beta / t.grid.h), t.grid.K)
    u_counts = u.pooled([a])
    u_k = min(round(beta / t.scale * u.scale / u.grid.h), u.grid.K)  # same β in rms units
    u_up, u_down = ng.survival(u_counts)
    return {
        "head": a,
        "beta_units": None if own is None else own / t.scale,
        "flagged": own is None,
        "positive_tail_mass": float((up[k] - down[k]) / total),
        "positive_over_negative": float(up[k] / max(down[k], 1)),
        "untrained_positive_tail_mass": float((u_up[u_k] - u_down[u_k]) / int(u_counts.sum())),
    }


def pooled_skew(scan_: MatrixScan) -> float:
    moments = sum(s.moments for s in scan_.blocks.values())
    return ng.BlockScan(np.zeros(0), moments, scan_.blocks[0, 0].top).skew


def summarise(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over head pairs, and in how many the trained graph beats every baseline."""
    kinds = ("trained", "gnm", "lowrank", "untrained", "inhibitory")
    med = {k: float(np.median([r[k]["q"] for r in blocks])) for k in kinds}
    wins = sum(
        r["trained"]["q"] > max(r["gnm"]["q"], r["lowrank"]["q"], r["untrained"]["q"])
        for r in blocks
    )
    tails = sum(r["block_beta_units"] is not None for r in blocks)
    return {
        "median_q": med,
        "trained_beats_all_baselines": int(wins),
        "blocks_with_tail": int(tails),
        "blocks": len(blocks),
        "median_edges": float(np.median([r["edges"] for r in blocks])),
    }


def default_name(ckpt: str) -> str:
    """The run's directory name: runs/quickstart/checkpoint → quickstart."""
    path = Path(ckpt).resolve()
    return path.parent.name if path.name == "checkpoint" else path.name


def table_markdown(payload: dict[str, Any]) -> str:
    """The numbers of the README: per matrix its tail, flagged heads, per-head-pair modularity
    against the baselines, and the degree fits."""
    m = payload["model"]
    lines = [
        f"Neuron graph of `{payload['checkpoint']}` (step {m['step']}; nh={m['n_head']},"
        f" N={m['N']}, D={m['D']}); untrained twin: seed {payload['init_seed']}."
        f" {payload['seconds']:.0f} s, peak RSS {payload['peak_rss_mib']:.0f} MiB.",
        "",
    ]
    for which, res in payload["matrices"].items():
        lines += _matrix_lines(which, res)
    return "\n".join(lines) + "\n"


def _matrix_lines(which: str, res: dict[str, Any]) -> list[str]:
    ub = res["untrained_beta_units"]
    flagged = ", ".join(map(str, res["flagged_heads"])) or "none"
    mass = ", ".join(f"{h['positive_tail_mass']:.2e}" for h in res["heads"])
    u_mass = ", ".join(f"{h['untrained_positive_tail_mass']:.2e}" for h in res["heads"])
    untrained_tail = "no tail" if ub is None else f"tail at {ub:.2f} rms"
    lines = [
        f"**G_{which}**: β = {res['beta_units']:.2f} rms ({res['beta_rule']}); untrained:"
        f" {untrained_tail}. Skew {res['skew']:.3f} (untrained {res['untrained_skew']:.3f})."
        f" Positive-tail mass per encoder head at β: {mass} (untrained: {u_mass});"
        f" flagged (no tail): {flagged}.",
        "",
        "| head pair b→a | edges | trained Q | G(n,m) | low-rank | untrained | inhibitory Q (m) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["blocks"]:
        lines.append(
            f"| {r['b']}→{r['a']} | {r['edges']:,} | {r['trained']['q']:.3f} | {r['gnm']['q']:.3f}"
            f" | {r['lowrank']['q']:.3f} | {r['untrained']['q']:.3f}"
            f" | {r['inhibitory']['q']:.3f} ({r['inhibitory']['edges']:,}) |"
        )
    s = res["summary"]
    med = s["median_q"]
    lines += [
        f"| median | {s['median_edges']:,.0f} | {med['trained']:.3f} | {med['gnm']:.3f}"
        f" | {med['lowrank']:.3f} | {med['untrained']:.3f} | {med['inhibitory']:.3f} |",
        "",
        f"Trained above all three baselines in {s['trained_beats_all_baselines']} of"
        f" {s['blocks']} head pairs; {s['blocks_with_tail']} blocks have their own tail.",
        "",
    ]
    for kind, d in res["degrees"].items():
        for side in ("in", "out"):
            lines.append(_fit_line(kind, side, d[side]))
    c, g = res["core"]["trained"], res["core"]["gnm"]
    if c.get("max_core"):
        lines.append(
            f"- k-cores: the innermost ({c['max_core']}-core) holds {c['core_node_share']:.1%} of"
            f" the nodes and {c['core_edge_end_share']:.1%} of the edge ends; G(n,m) per block:"
            f" {g['max_core']}-core, {g['core_node_share']:.1%} / {g['core_edge_end_share']:.1%}"
        )
    return [*lines, ""]


def _fit_line(kind: str, side: str, d: dict[str, Any]) -> str:
    f = d["fit"]
    if f.get("alpha") is None:
        return f"- {kind} {side}-degree: no fit ({f.get('reason')})"
    ln = f["vs_lognormal"]
    return (
        f"- {kind} {side}-degree (max {d['max']}, mean {d['mean']:.1f}): power law"
        f" α = {f['alpha']:.2f} ± {f['sigma']:.2f} above x_min = {f['xmin']:.0f}"
        f" ({f['n_tail']} nodes); vs log-normal R = {ln['R']:.2f}, p = {ln['p']:.2g}"
    )


def write_outputs(
    result: dict[str, Any], out: Path, name: str, log: Any = print
) -> dict[str, Path]:
    from bdh.experiments import neuron_graph_plots as plots

    out.mkdir(parents=True, exist_ok=True)
    stem = f"neuron-graph-{name}"
    paths = {"json": out / f"{stem}.json"}
    paths["json"].write_text(json.dumps(result["payload"], indent=2, default=_jsonable) + "\n")
    paths["md"] = out / f"{stem}.md"
    paths["md"].write_text(table_markdown(result["payload"]))
    paths |= plots.plot_all(result, out, stem)
    for p in paths.values():
        log(f"wrote {p}")
    return paths


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON: {type(o).__name__}")
