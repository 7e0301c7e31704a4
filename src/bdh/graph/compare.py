"""Does a converted graph model predict what the trained tensor model does?

The paper's BDH is BDH-GPU with the neuron-space residual (Eq. 8), no RoPE and no LayerNorm
(BDH-Normfree, Eq. 7). A model trained with the reference's options (d-space residual, RoPE,
LayerNorm) is a different function of the same weights. `compare` measures each step of that gap
on one passage of token ids, in the tensor form and in the graph form:

    ladder: the trained model as it is → residual="neuron" → rope=False → layernorm=False
    graphs: the graph with the model's own options (exact: RoPE and the d-space residual as local
            rules, LayerNorms as global gains) against the first rung, and the paper's BDH
            against the last rung (`rungs="all"`: a graph for every rung)

For every row: top-1 agreement with the trained model's next-token predictions, the next-token
loss and accuracy on the passage, and for graphs the agreement and largest logit difference with
their tensor twin (which must be 100% and float round-off).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from bdh.graph.convert import from_tensor


@dataclass
class Row:
    name: str
    top1_vs_trained: float  # fraction of positions whose argmax equals the trained model's
    nll: float  # nats per token on the passage's next tokens
    accuracy: float  # top-1 accuracy on the passage's next tokens
    top1_vs_twin: float | None = None  # graphs only: agreement with their tensor twin
    max_rel_diff_vs_twin: float | None = None  # graphs only: max |Δ logit| / max |logit|
    seconds: float | None = None


def tensor_logits(model: Any, config: Any, ids: np.ndarray) -> np.ndarray:
    """(T, V) logits of `model`'s weights run under `config`, in float64, no dropout."""
    from bdh.model import BDH

    twin = BDH(config.replace(dropout=0.0)).to(torch.float64).eval()
    twin.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    with torch.no_grad():
        return twin(torch.as_tensor(ids)[None].long())[0][0].numpy()


def ladder(config: Any) -> list[tuple[str, Any]]:
    """The trained config, then one change at a time towards the graph model's twin."""
    steps = [("tensor: as trained", config)]
    for name, change in (
        ("tensor: + neuron residual (Eq. 8)", {"residual": "neuron"}),
        ("tensor: + no RoPE", {"rope": False}),
        ("tensor: + Normfree (Eq. 7)", {"layernorm": False}),
    ):
        nxt = steps[-1][1].replace(**change)
        if nxt != steps[-1][1]:
            steps.append((name, nxt))
    return steps


def _score(logits: np.ndarray, ids: np.ndarray, reference: np.ndarray) -> tuple[float, ...]:
    """Agreement with the reference argmax, next-token NLL and accuracy (T - 1 targets)."""
    pred = logits.argmax(-1)
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    return (pred == reference).mean(), float(nll), float((pred[:-1] == ids[1:]).mean())


def compare(model: Any, ids: np.ndarray, rungs: str = "ends", dtype: Any = np.float64) -> list[Row]:
    """The ladder and graph models on one passage `ids` (T,).

    rungs: "ends" (a graph with the model's own options and the paper's BDH), "all" (a graph for
    every rung of the ladder) or "none" (tensor rows only).
    """
    ids = np.asarray(ids, dtype=np.int64)
    steps = ladder(model.config)
    twins = [tensor_logits(model, config, ids) for _, config in steps]
    trained_pred = twins[0].argmax(-1)
    rows = [
        Row(name, *_score(z, ids, trained_pred)) for (name, _), z in zip(steps, twins, strict=True)
    ]
    chosen = {"ends": sorted({0, len(steps) - 1}), "all": range(len(steps)), "none": []}[rungs]
    for k in chosen:
        rows.append(_graph_row(model, steps[k], twins[k], ids, trained_pred, dtype))
    return rows


def _graph_row(
    model: Any, step: tuple[str, Any], twin: np.ndarray, ids: np.ndarray, trained: np.ndarray,
    dtype: Any,
) -> Row:  # fmt: skip
    """Convert with the options of one rung, run the passage, score against the rung's logits."""
    name, config = step
    start = time.perf_counter()
    graph = from_tensor(
        model, layernorm=config.layernorm, rope=config.rope, residual=config.residual, dtype=dtype
    )
    logits = graph.run(ids.tolist(), sigma="none").logits.astype(np.float64)
    seconds = time.perf_counter() - start
    label = "graph: BDH (paper)" if graph.is_bdh else "graph: " + name.removeprefix("tensor: ")
    row = Row(label, *_score(logits, ids, trained), seconds=seconds)
    row.top1_vs_twin = float((logits.argmax(-1) == twin.argmax(-1)).mean())
    row.max_rel_diff_vs_twin = float(np.abs(logits - twin).max() / np.abs(twin).max())
    return row


def table(rows: list[Row]) -> str:
    """A plain-text table of the rows."""
    head = f"{'model':38s} {'top1=trained':>12s} {'nll':>7s} {'acc':>6s} {'top1=twin':>9s}"
    lines = [head + f" {'max|Δ|/max|z|':>13s} {'seconds':>8s}"]
    for r in rows:
        twin = "" if r.top1_vs_twin is None else f"{r.top1_vs_twin:.4f}"
        diff = "" if r.max_rel_diff_vs_twin is None else f"{r.max_rel_diff_vs_twin:.1e}"
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(
            f"{r.name:38s} {r.top1_vs_trained:12.4f} {r.nll:7.3f} {r.accuracy:6.3f} "
            f"{twin:>9s} {diff:>13s} {secs:>8s}"
        )
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
