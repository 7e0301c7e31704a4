"""Does the compiled Louvain (scikit-network) pay for the neuron graph, with the same results?

    python benchmarks/neuron_graph_louvain.py [--rounds 3]

On graphs the analysis meets (G(n, m) with n = 8,192 nodes, the `reference` block size, at three
edge counts, and a planted 8-group partition), both backends run one seeded Louvain per round,
interleaved in rotating order; reported: median seconds per run, the median per-round ratio
networkx / scikit-network, and the modularity each finds. Writes
benchmarks/results/neuron_graph_louvain.json.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from bdh.interpret import neuron_graph as ng
from common import (
    RESULTS,
    interleaved,
    machine_info,
    machine_line,
    median,
    median_ratio,
    write_json,
)


def graphs(n: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {f"gnm_m{m}": ng.gnm_pairs(n, m, True, rng) for m in (20_000, 60_000, 200_000)}
    group = rng.integers(0, 8, n)
    i, j = ng.gnm_pairs(n, 400_000, True, rng)
    keep = (group[i] == group[j]) | (rng.random(i.size) < 0.1)  # mostly edges inside groups
    out["planted8"] = (i[keep][:60_000], j[keep][:60_000])
    return out


def compare(i: np.ndarray, j: np.ndarray, rounds: int) -> dict[str, Any]:
    """Both backends, one Louvain run per round each (seed = round), interleaved."""
    q: dict[str, list[float]] = {b: [] for b in ng.backends()}

    def case(backend: str) -> Any:
        def one() -> None:
            res = ng.modularity(i, j, runs=1, seed=len(q[backend]), backend=backend)
            q[backend].append(res.q)

        return one

    times = interleaved({b: case(b) for b in ng.backends()}, rounds=rounds, warmup=0)
    row: dict[str, Any] = {b: {"seconds": median(times[b]), "q": q[b]} for b in ng.backends()}
    if len(ng.backends()) == 2:
        row["networkx_over_sknetwork"] = median_ratio(times["networkx"], times["sknetwork"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=8192)
    args = p.parse_args()
    info = machine_info()
    print(machine_line(info))
    print(f"config: nodes={args.nodes} rounds={args.rounds} backends={ng.backends()}")
    rows = {}
    for name, (i, j) in graphs(args.nodes, 0).items():
        rows[name] = compare(i, j, args.rounds)
        print(name, json.dumps(rows[name]))
    payload = {"machine": info, "args": vars(args), "rows": rows}
    write_json(RESULTS / "neuron_graph_louvain.json", payload)


if __name__ == "__main__":
    main()
