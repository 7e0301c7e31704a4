"""The figures of `bdh experiment neuron-graph`: Fig. 9a (histograms), 9b (modularity vs edges),
10 (degree distributions with power-law fits, and a k-core drawing of the graph)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bdh.figures import save_figure
from bdh.interpret import neuron_graph as ng

COLORS = {
    "trained": "C3", "gnm": "C0", "lowrank": "C2", "untrained": "0.5", "inhibitory": "C4",
}  # fmt: skip
LABELS = {
    "trained": "trained G≥β", "gnm": "G(n, m)", "lowrank": "(P₁P₂ᵀ)≥β′",
    "untrained": "untrained, same m", "inhibitory": "inhibitory |G≤−β|",
}  # fmt: skip


def plot_all(result: dict[str, Any], out: Path, stem: str) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    payload, plots = result["payload"], result["plots"]
    paths = {
        "fig9a": fig9a(payload, plots, out / f"{stem}-fig9a.png"),
        "fig9b": fig9b(payload, out / f"{stem}-fig9b.png"),
        "fig10": fig10(payload, plots, out / f"{stem}-fig10.png"),
    }
    return paths


def _hist_line(ax: Any, grid: ng.Grid, counts: np.ndarray, scale: float, **kw: Any) -> None:
    centres = (grid.edges[:-1] + grid.h / 2) / scale
    density = counts / counts.sum() / (grid.h / scale)
    ax.plot(centres, np.where(density > 0, density, np.nan), **kw)


def fig9a(payload: dict[str, Any], plots: dict[str, Any], path: Path) -> Path:
    """Per matrix and encoder head: entries' density, its symmetric part, the excess, β."""
    import matplotlib.pyplot as plt

    nh = payload["model"]["n_head"]
    fig, axes = plt.subplots(2, nh, figsize=(3.2 * nh, 6), squeeze=False)
    for r, which in enumerate(ng.MATRICES):
        p, res = plots[which], payload["matrices"][which]
        for a in range(nh):
            ax = axes[r][a]
            counts = p["head_counts"][a]
            _hist_line(ax, p["grid"], counts, p["scale"], color="C3", lw=1, label="trained f(x)")
            sym = ng.symmetric_part(counts)
            _hist_line(ax, p["grid"], sym, p["scale"], color="k", lw=0.8, ls="--",
                       label="min(f(x), f(−x))")  # fmt: skip
            _hist_line(ax, p["u_grid"], p["u_counts"], p["u_scale"], color="0.6", lw=0.8,
                       label="untrained (all heads)")  # fmt: skip
            ax.axvline(res["beta_units"], color="C3", ls=":", lw=1)
            head = res["heads"][a]
            flag = " (no tail: flagged)" if head["flagged"] else ""
            ax.set_title(f"G_{which}, head {a}{flag}\ntail mass {head['positive_tail_mass']:.2e}",
                         fontsize=8)  # fmt: skip
            ax.set_yscale("log")
            ax.set_xlabel("entry / rms", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[r][0].set_ylabel(f"density (β = {res['beta_units']:.2f} rms)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"Fig. 9a: entries of G per encoder head — {payload['checkpoint']}", fontsize=9)
    return save_figure(fig, path, dpi=110)


def fig9b(payload: dict[str, Any], path: Path) -> Path:
    """Modularity against edge count along the β sweep, for every graph kind."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, which in zip(axes[0], ng.MATRICES, strict=True):
        sw = payload["matrices"][which]["sweep"]
        for kind in COLORS:
            pts = [(p[kind]["edges"], p[kind]["q"]) for p in sw["points"] if p[kind]["edges"]]
            if pts:
                x, y = zip(*sorted(pts), strict=True)
                ax.plot(x, y, "o-", color=COLORS[kind], label=LABELS[kind], ms=3)
        ax.axvline(sw["edges_at_beta"], color="C3", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("edges")
        ax.set_ylabel(f"modularity (best of {payload['config']['runs']} Louvain runs)")
        a, b = sw["block"]
        ax.set_title(f"G_{which} block [{a},{b}] (head {b} → head {a})", fontsize=9)
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Fig. 9b: modularity vs edges (dotted: the chosen β)", fontsize=9)
    return save_figure(fig, path, dpi=110)


def fig10(payload: dict[str, Any], plots: dict[str, Any], path: Path) -> Path:
    """In/out-degree CCDFs of the whole G_x graph with power-law fits; a k-core drawing."""
    import matplotlib.pyplot as plt

    p, res = plots["x"], payload["matrices"]["x"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    for ax, side in zip(axes[:2], ("in", "out"), strict=True):
        for deg, color, label in ((p[f"d{side}"], "C3", "trained"),
                                  (p[f"u_d{side}"], "0.5", "untrained, same m")):  # fmt: skip
            d = np.sort(deg[deg > 0])
            if d.size:
                ccdf = 1.0 - np.arange(d.size) / d.size
                ax.loglog(d, ccdf, ".", color=color, ms=2, label=label)
        fit = res["degrees"]["trained"][side]["fit"]
        if fit.get("alpha"):
            _fit_line(ax, p[f"d{side}"], fit)
        ax.set_xlabel(f"{side}-degree")
        ax.set_ylabel("P(degree ≥ k)")
        ax.legend(fontsize=7)
        ax.set_title(_fit_title(side, fit), fontsize=8)
    _core_drawing(axes[2], p, res)
    fig.suptitle(f"Fig. 10: the whole G_x graph at β = {res['beta_units']:.2f} rms", fontsize=9)
    return save_figure(fig, path, dpi=110)


def _fit_line(ax: Any, deg: np.ndarray, fit: dict[str, Any]) -> None:
    d = deg[deg > 0]
    xmin, alpha = fit["xmin"], fit["alpha"]
    share = (d >= xmin).mean()
    x = np.geomspace(xmin, max(d.max(), xmin + 1), 50)
    ax.loglog(x, share * (x / xmin) ** (1 - alpha), "k--", lw=1, label=f"α = {alpha:.2f}")


def _fit_title(side: str, fit: dict[str, Any]) -> str:
    if not fit.get("alpha"):
        return f"{side}-degree: no fit ({fit.get('reason')})"
    ln = fit["vs_lognormal"]
    return (
        f"{side}: α={fit['alpha']:.2f}, x_min={fit['xmin']:.0f}; vs log-normal"
        f" R={ln['R']:.2f} (p={ln['p']:.2g})"
    )


def _core_drawing(ax: Any, p: dict[str, Any], res: dict[str, Any]) -> None:
    """Nodes on rings by k-core number (innermost core at the centre), coloured by head; a sample
    of edges behind them."""
    core, N = p["core"], p["N"]
    if not core:
        ax.set_axis_off()
        return
    nodes = np.fromiter(core.keys(), np.int64)
    k = np.fromiter(core.values(), np.int64)
    rng = np.random.default_rng(0)
    radius = 1.0 - (k - k.min()) / max(k.max() - k.min(), 1) + 0.05 * rng.random(k.size)
    angle = 2 * np.pi * rng.random(k.size)
    pos = {
        int(n): (r * np.cos(t), r * np.sin(t)) for n, r, t in zip(nodes, radius, angle, strict=True)
    }
    sample = rng.choice(p["u"].size, size=min(3000, p["u"].size), replace=False)
    for e in sample:
        s, t = pos.get(int(p["u"][e])), pos.get(int(p["v"][e]))
        if s and t:
            ax.plot([s[0], t[0]], [s[1], t[1]], color="0.8", lw=0.2, zorder=1)
    xy = np.array([pos[int(n)] for n in nodes])
    ax.scatter(xy[:, 0], xy[:, 1], c=nodes // N, cmap="tab10", s=2, zorder=2)
    c = res["core"]["trained"]
    ax.set_title(
        f"k-cores: max core {c['max_core']} holds {c['core_node_share']:.1%} of nodes,\n"
        f"{c['core_edge_end_share']:.1%} of edge ends (G(n,m): max core"
        f" {res['core']['gnm']['max_core']})",
        fontsize=8,
    )
    ax.set_aspect("equal")
    ax.set_axis_off()
