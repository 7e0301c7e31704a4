"""A neuron and synapse viewer: one self-contained HTML page per passage (`bdh view`).

    page = bdh.interpret.view(model, tokenizer, "To be, or not to be")
    page.save("report.html")        # one file: script, styles and data inline, no network
    page                            # in a notebook: the same page, in an isolated frame

What the page shows, and where each number comes from (all observed through the model's named
activation points, `bdh.interpret.capture`; nothing here recomputes a layer):
- tokens coloured by surprisal (−log p of the token given those before it, from the logits) or by
  the y-density of a layer; hovering shows the loss, the top next-token predictions and the
  active-neuron counts per layer;
- a token's most active neurons per layer, x and y, with their head and rotary frequency;
- a neuron's page: its firing rate (x > 0, y > 0) per layer over a corpus, its top-activating
  contexts (largest y over all layers, kept while streaming the corpus window by window with the
  state carried, so memory is bounded by the window), its direct logit effect (its `decoder` row
  E_i through `lm_head`, LayerNorms left out), its strongest neighbours in G_x = D_x E and
  G_y = D_y E (the neuron graph's convention: i → j is E_i · D[:, j]), its head and frequency
  bucket, and how inhibitory its out-edges look (the negative share of their weight, against its
  head's mean and the other heads');
- traces of chosen synapses σ(i, j) over the passage (`bdh.interpret.synapses`, when given);
- per-layer density of x and y over the passage.

Neuron ids are global: neuron k of head h is i = h·N + k, the row order of `decoder`.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bdh.interpret import neuron_graph
from bdh.interpret.hooks import ActivationCache, capture

TOP_TOKEN_NEURONS = 8  # a token's most active neurons listed per layer and path
TOP_CONTEXTS = 5  # contexts kept per neuron while streaming
TOP_PREDICTIONS = 5
TOP_LOGITS = 6  # tokens a neuron promotes / suppresses
TOP_NEIGHBOURS = 5
CONTEXT_TOKENS = 12  # tokens shown on each side of a top context
WINDOW = 256  # tokens per forward pass when streaming a corpus

# Opening the page in Debian's headless Chromium (as root in a container it needs --no-sandbox;
# the last four flags keep it from reaching for the network at start).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """The Chromium to open pages with: $BDH_CHROMIUM, else `chromium` on the PATH, or None."""
    for name in (os.environ.get("BDH_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


FREQ_BUCKETS = 4


# ---------------------------------------------------------------------------- streaming stats


@dataclass
class NeuronStats:
    """Per-neuron statistics of a corpus, accumulated window by window in bounded memory.

    fire_x, fire_y: (L, n) counts of tokens with x > 0 (y > 0); top_*: (n, K) the K largest y
    values of each neuron over all layers, with the layer and corpus position of each.
    """

    tokens: int
    fire_x: Tensor
    fire_y: Tensor
    top_value: Tensor
    top_layer: Tensor
    top_pos: Tensor


def walk(
    model: Any, ids: np.ndarray | Tensor, names: list[str], window: int = WINDOW
) -> Iterator[tuple[int, ActivationCache]]:
    """Feed one stream `window` tokens at a time, the model's state carried across windows,
    and yield (start, cache of `names`) per window: the numbers of one pass over the whole
    stream, with only one window's activations held at a time."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError("the stream to read is empty")
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    state = model.init_state(1)
    with torch.no_grad():
        for start in range(0, ids.numel(), window):
            with capture(model, names) as cache:
                model(ids[start : start + window][None], state=state)
            yield start, cache


class _StatsAccumulator:
    """Builds `NeuronStats` from the windows of `walk`."""

    def __init__(self, model: Any, k: int) -> None:
        c = model.config
        self.L, n = c.n_layer, c.n_head * c.N
        self.k, self.tokens = k, 0
        self.fire_x = torch.zeros(self.L, n, dtype=torch.int64)
        self.fire_y = torch.zeros(self.L, n, dtype=torch.int64)
        self.top_value = torch.full((n, k), -math.inf)
        self.top_layer = torch.zeros(n, k, dtype=torch.int64)
        self.top_pos = torch.zeros(n, k, dtype=torch.int64)

    def add(self, start: int, cache: Any) -> None:
        ys = []
        for l in range(self.L):
            x, y = _neurons(cache["x", l]), _neurons(cache["y", l])  # (W, n)
            self.fire_x[l] += (x > 0).sum(0)
            self.fire_y[l] += (y > 0).sum(0)
            ys.append(y.T)
        W = ys[0].shape[1]
        self.tokens += W
        values = torch.cat(ys, 1)  # (n, L·W): column l·W + t
        v, where = values.topk(min(self.k, values.shape[1]), dim=1)
        cand_v = torch.cat([self.top_value, v], 1)
        cand_l = torch.cat([self.top_layer, where // W], 1)
        cand_p = torch.cat([self.top_pos, start + where % W], 1)
        self.top_value, keep = cand_v.topk(self.k, dim=1)
        self.top_layer, self.top_pos = cand_l.gather(1, keep), cand_p.gather(1, keep)

    def result(self) -> NeuronStats:
        return NeuronStats(
            self.tokens, self.fire_x, self.fire_y, self.top_value, self.top_layer, self.top_pos
        )


def _point_names(model: Any, logits: bool = False) -> list[str]:
    L = model.config.n_layer
    return ["logits"] * logits + [f"layers.{l}.{p}" for l in range(L) for p in "xy"]


def stream_stats(
    model: Any, ids: np.ndarray | Tensor, window: int = WINDOW, k: int = TOP_CONTEXTS
) -> NeuronStats:
    """Firing counts and top-activating positions of every neuron over `ids` (one stream),
    read window by window (`walk`) in memory bounded by the window."""
    acc = _StatsAccumulator(model, k)
    for start, cache in walk(model, ids, _point_names(model), window):
        acc.add(start, cache)
    return acc.result()


def _neurons(t: Tensor) -> Tensor:
    """(1, nh, T, N) → (T, n): heads concatenated, head-major, as the rows of `decoder`."""
    return t[0].transpose(0, 1).flatten(1).float()


# ---------------------------------------------------------------------------- weights


@torch.no_grad()
def logit_effects(model: Any, k: int = TOP_LOGITS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each neuron's direct effect on the logits, E_i · lm_head (LayerNorms left out).

    → (promoted ids, their values, suppressed ids, their values), each (n, k).
    """
    effect = model.decoder.detach().float() @ model.lm_head.detach().float()  # (n, V)
    k = min(k, effect.shape[1])
    up, up_i = effect.topk(k, dim=1)
    down, down_i = effect.topk(k, dim=1, largest=False)
    return up_i, up, down_i, down


@torch.no_grad()
def graph_neighbours(
    model: Any, which: str, k: int = TOP_NEIGHBOURS, rows: int = 1024
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The strongest edges at each neuron in G_which = D_which E (which is "x" or "y").

    The entry i → j is E_i · D[:, j] over all heads (neuron j of head a is column a·N + j), self
    loops left out. → (out ids, out values, in ids, in values), each (n, k); computed in row
    tiles, so only rows × n entries exist at once.
    """
    E, Dm = neuron_graph.whole(model, which)  # (n, D), (D, n)
    n = E.shape[0]
    k = min(k, n - 1)
    out_v, out_i = [], []
    in_v = torch.full((n, k), -math.inf)
    in_i = torch.zeros(n, k, dtype=torch.int64)
    for r0, block in neuron_graph.tiles(E, Dm, rows):  # (r, n): sources r0.., every target
        r = block.shape[0]
        block[torch.arange(r), torch.arange(r0, r0 + r)] = -math.inf
        v, i = block.topk(k, dim=1)
        out_v.append(v)
        out_i.append(i)
        cv, ci = block.T.topk(min(k, r), dim=1)  # incoming to every target from these sources
        both_v, both_i = torch.cat([in_v, cv], 1), torch.cat([in_i, ci + r0], 1)
        in_v, keep = both_v.topk(k, dim=1)
        in_i = both_i.gather(1, keep)
    return torch.cat(out_i), torch.cat(out_v), in_i, in_v


@torch.no_grad()
def negative_share(model: Any, which: str, rows: int = 1024) -> Tensor:
    """(n,) for each neuron i, the inhibitory-looking part of its out-edges in G_which:
    Σ_j max(−G_ij, 0) / Σ_j |G_ij| (0: all excitatory, 1: all inhibitory), in row tiles."""
    shares = []
    for _, block in neuron_graph.tiles(*neuron_graph.whole(model, which), rows):
        shares.append((-block).clamp_min(0).sum(1) / block.abs().sum(1).clamp_min(1e-30))
    return torch.cat(shares)


# ---------------------------------------------------------------------------- the page data


@torch.no_grad()
def view_data(
    model: Any,
    tokenizer: Any,
    passage: str | Sequence[int] | np.ndarray,
    corpus: np.ndarray | None = None,
    corpus_name: str = "the passage",
    synapse_pairs: Iterable[tuple[int, int, int, int]] = (),
    title: str = "",
    window: int = WINDOW,
) -> dict[str, Any]:
    """Everything the page shows, as plain JSON-ready data (lists and numbers).

    `passage` is text or token ids; `corpus` (token ids) is what the neuron pages' rates and
    contexts are measured on (default: the passage). `synapse_pairs` are (layer, head, i, j)
    whose σ(i, j) is traced over the passage.
    """
    ids = _ids(tokenizer, passage)
    was_training = model.training
    model.eval()
    try:
        passage_acc = _PassageAccumulator(model)
        stats_acc = _StatsAccumulator(model, TOP_CONTEXTS)
        for start, cache in walk(model, ids, _point_names(model, logits=True), window):
            passage_acc.add(start, cache)
            if corpus is None:  # the passage is the corpus: one pass serves both
                stats_acc.add(start, cache)
        stream = ids if corpus is None else np.asarray(corpus, dtype=np.int64)
        if corpus is not None:
            for start, cache in walk(model, stream, _point_names(model), window):
                stats_acc.add(start, cache)
        stats = stats_acc.result()
        data = passage_acc.result(tokenizer, ids)
        data["neurons"] = _neuron_data(model, tokenizer, stats, stream)
        data["synapses"] = _synapse_data(model, ids, synapse_pairs)
    finally:
        model.train(was_training)
    c = model.config
    data["meta"] = {
        "title": title,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "N": c.N,
        "D": c.n_embd,
        "T": len(ids),
        "corpus": corpus_name,
        "corpus_tokens": int(stats.tokens),
        "residual": getattr(c, "residual", "reference"),
    }
    data["vocab"] = [_token_text(tokenizer, t) for t in range(c.vocab_size)]
    return data


def _ids(tokenizer: Any, passage: str | Sequence[int] | np.ndarray) -> np.ndarray:
    ids = tokenizer.encode(passage) if isinstance(passage, str) else np.asarray(passage)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("the passage is empty: give some text to view")
    return ids


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.token_bytes(int(token)).decode("utf-8", errors="backslashreplace")


class _PassageAccumulator:
    """The token views' numbers (logits' top predictions, active counts, each token's top
    neurons) from the windows of `walk` over the passage."""

    def __init__(self, model: Any) -> None:
        self.L = model.config.n_layer
        self.logits: list[Tensor] = []
        self.count = {p: [[] for _ in range(self.L)] for p in "xy"}
        self.top = {f"{p}{s}": [[] for _ in range(self.L)] for p in "xy" for s in ("", "_value")}

    def add(self, start: int, cache: Any) -> None:
        self.logits.append(cache["logits"][0])
        for l in range(self.L):
            for path in "xy":
                a = _neurons(cache[path, l])  # (W, n)
                self.count[path][l].append((a > 0).sum(1))
                v, i = a.topk(min(TOP_TOKEN_NEURONS, a.shape[1]), dim=1)
                self.top[path][l].append(i)
                self.top[path + "_value"][l].append(v)

    def result(self, tokenizer: Any, ids: np.ndarray) -> dict[str, Any]:
        logp = torch.log_softmax(torch.cat(self.logits).double(), dim=-1)  # (T, V)
        idx = torch.from_numpy(ids)
        surprisal = [None, *(-logp[:-1].gather(1, idx[1:, None])[:, 0]).tolist()]
        p, pred = logp.exp().topk(min(TOP_PREDICTIONS, logp.shape[1]), dim=1)
        cat = lambda ts: [torch.cat(t) for t in ts]  # noqa: E731
        return {
            "ids": ids.tolist(),
            "tokens": [_token_text(tokenizer, t) for t in ids],
            "surprisal": _round(surprisal),
            "pred_ids": pred.tolist(),
            "pred_p": _round(p),
            "x_count": [t.tolist() for t in cat(self.count["x"])],
            "y_count": [t.tolist() for t in cat(self.count["y"])],
            "top": {
                key: [t.tolist() if key in ("x", "y") else _round(t) for t in cat(value)]
                for key, value in self.top.items()
            },
        }


def _neuron_data(model: Any, tokenizer: Any, stats: NeuronStats, stream: np.ndarray) -> dict:
    c = model.config
    freqs = model.attn.freqs.reshape(-1).float()  # (N,), shared by the heads
    up_i, up_v, down_i, down_v = logit_effects(model)
    contexts = []
    for i in range(c.n_head * c.N):
        kept = []
        kept_v, kept_l = stats.top_value[i].tolist(), stats.top_layer[i].tolist()
        for v, l, pos in zip(kept_v, kept_l, stats.top_pos[i].tolist(), strict=True):
            if v > 0:  # y = 0: the neuron never wrote there
                kept.append([_round1(v), l, *_context(tokenizer, stream, pos)])
        contexts.append(kept)
    data = {
        "freqs": [float(f"{f:.6g}") for f in freqs.tolist()],
        "freq_bucket": _buckets(freqs).tolist(),
        "fire_x": stats.fire_x.tolist(),
        "fire_y": stats.fire_y.tolist(),
        "contexts": contexts,
        "promote": up_i.tolist(),
        "promote_value": _round(up_v),
        "suppress": down_i.tolist(),
        "suppress_value": _round(down_v),
    }
    for which in "xy":
        data[f"g{which}_negative"] = _round(negative_share(model, which))
        out_i, out_v, in_i, in_v = graph_neighbours(model, which)
        data[f"g{which}_out"], data[f"g{which}_out_value"] = out_i.tolist(), _round(out_v)
        data[f"g{which}_in"], data[f"g{which}_in_value"] = in_i.tolist(), _round(in_v)
    return data


def _buckets(freqs: Tensor) -> np.ndarray:
    """The frequency bucket (0 = slowest) of each of the N rotary frequencies, by quantile."""
    ranks = freqs.argsort().argsort().numpy()
    return (ranks * FREQ_BUCKETS) // len(ranks)


def _context(tokenizer: Any, stream: np.ndarray, pos: int) -> list[str]:
    """(before, the token, after) around corpus position pos."""
    lo, hi = max(0, pos - CONTEXT_TOKENS), min(len(stream), pos + CONTEXT_TOKENS + 1)
    text = lambda a, b: "".join(_token_text(tokenizer, t) for t in stream[a:b])  # noqa: E731
    return [text(lo, pos), text(pos, pos + 1), text(pos + 1, hi)]


def _synapse_data(
    model: Any, ids: np.ndarray, pairs: Iterable[tuple[int, int, int, int]]
) -> list[dict[str, Any]]:
    """σ(i, j) after every token of the passage, for each (layer, head, i, j)."""
    pairs = [tuple(int(v) for v in p) for p in pairs]
    if not pairs:
        return []
    try:
        from bdh.interpret.synapses import synapses
    except ImportError:  # the σ readout is not part of this build
        raise ValueError("synapse traces need bdh.interpret.synapses") from None
    idx = torch.from_numpy(ids)[None]
    out = []
    for l, h, i, j in pairs:
        trace = synapses(model, idx, l, h, [(i, j)])[0, :, 0]
        out.append({"layer": l, "head": h, "i": i, "j": j, "trace": _round(trace)})
    return out


def _round(t: Any) -> Any:
    """Nested lists of floats at 4 significant digits (the page's size budget), None kept."""
    if isinstance(t, Tensor):
        t = t.tolist()
    if isinstance(t, list):
        return [_round(v) for v in t]
    return None if t is None else _round1(t)


def _round1(v: float) -> float | None:
    return float(f"{v:.4g}") if math.isfinite(v) else None


# ---------------------------------------------------------------------------- the page


@dataclass
class ViewPage:
    """The page: `.html` is the whole self-contained document; notebooks show it in a frame."""

    data: dict[str, Any]
    html: str = field(repr=False, default="")

    def __post_init__(self) -> None:
        if not self.html:
            self.html = render_html(self.data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        # A frame keeps the page's script and styles away from the notebook's own.
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" '
            'style="width:100%;height:720px;border:1px solid #ccc"></iframe>'
        )


def _asset(name: str) -> str:
    return resources.files("bdh.interpret").joinpath(name).read_text(encoding="utf-8")


def render_html(data: dict[str, Any]) -> str:
    """The self-contained document: template, styles, script and the data inlined."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    # Inside <script>, "<" must never start a tag: the passage may hold "</script>".
    payload = payload.replace("<", "\\u003c")
    title = html.escape(data.get("meta", {}).get("title") or "BDH viewer")
    page = _asset("view.html").replace("{{TITLE}}", title)
    # One replacement each, in this order: what is inlined is never searched again.
    head, rest = page.split("/*STYLE*/", 1)
    middle, rest = rest.split("/*DATA*/", 1)
    data_end, script_rest = rest.split("/*SCRIPT*/", 1)
    return head + _asset("view.css") + middle + payload + data_end + _asset("view.js") + script_rest


def read_page_data(page: str) -> dict[str, Any]:
    """The data inlined in a page made by `render_html` (for tests and tools)."""
    tag = '<script id="bdh-data" type="application/json">'
    start = page.index(tag) + len(tag)
    return json.loads(page[start : page.index("</script>", start)])


def view(
    model: Any,
    tokenizer: Any,
    passage: str | Sequence[int] | np.ndarray,
    corpus: np.ndarray | None = None,
    corpus_name: str = "the passage",
    synapse_pairs: Iterable[tuple[int, int, int, int]] = (),
    title: str = "",
    window: int = WINDOW,
) -> ViewPage:
    """The viewer page of `passage` (see `view_data`); `.save(path)` writes it."""
    return ViewPage(
        view_data(model, tokenizer, passage, corpus, corpus_name, synapse_pairs, title, window)
    )


# ---------------------------------------------------------------------------- from a checkpoint

PASSAGE_TOKENS = 2000
CORPUS_TOKENS = 20_000
MAX_SYNAPSES = 8  # traces read from a synapse search result


def view_checkpoint(
    ckpt: str | Path,
    text: str | None = None,
    data: str | None = None,
    tokens: int = PASSAGE_TOKENS,
    corpus_tokens: int = CORPUS_TOKENS,
    synapse_pairs: Sequence[tuple[int, int, int, int]] = (),
    synapse_file: str | Path | None = None,
) -> ViewPage:
    """The page of a checkpoint (`bdh view`): the passage is `text`, or the first `tokens`
    tokens of `data`'s validation split, whose first `corpus_tokens` tokens are then the
    corpus of the neuron pages (with `text`, the passage is the corpus)."""
    from bdh.checkpoint import load_checkpoint
    from bdh.data import load_corpus

    if (text is None) == (data is None):
        raise ValueError("give the passage as either --text or --data, not both or neither")
    if tokens < 1 or corpus_tokens < 1:
        raise ValueError("--tokens and --corpus-tokens must be ≥ 1")
    pairs = list(synapse_pairs)
    if synapse_file is not None:
        pairs += read_synapse_file(synapse_file)
    loaded = load_checkpoint(ckpt)
    _check_pairs(pairs, loaded.model.config)
    tok = loaded.tokenizer
    corpus, name = None, "the passage"
    if data is not None:
        stream = np.asarray(tok.encode(load_corpus(data).val), dtype=np.int64)
        if stream.size == 0:
            raise ValueError(f"the validation split of {data} is empty")
        passage = stream[:tokens]
        corpus = stream[:corpus_tokens]
        name = f"the validation split of {data}"
    else:
        passage = _ids(tok, text or "")[:tokens]
    title = f"BDH viewer: {Path(ckpt).name}"
    return view(loaded.model, tok, passage, corpus, name, pairs, title)


def read_synapse_file(path: str | Path) -> list[tuple[int, int, int, int]]:
    """(layer, head, i, j) of the first synapses listed in a JSON file (a synapse search result:
    any list of objects with integer layer, head, i and j, at any depth), at most MAX_SYNAPSES."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e.msg} (line {e.lineno})") from None
    found: list[tuple[int, int, int, int]] = []
    stack = [obj]
    while stack and len(found) < MAX_SYNAPSES:
        o = stack.pop(0)
        if isinstance(o, dict):
            vals = [o.get(k) for k in ("layer", "head", "i", "j")]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
                found.append(tuple(vals))  # type: ignore[arg-type]
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    if not found:
        raise ValueError(f"{path} lists no synapse (objects with layer, head, i and j)")
    return found


def _check_pairs(pairs: Sequence[tuple[int, int, int, int]], c: Any) -> None:
    n = c.n_head * c.N
    for l, h, i, j in pairs:
        if not (1 <= l < c.n_layer and 0 <= h < c.n_head and 0 <= i < n and 0 <= j < c.N):
            raise ValueError(
                f"synapse ({l}, {h}, {i}, {j}) is outside the model: layer in 1..{c.n_layer - 1},"
                f" head < {c.n_head}, i < {n}, j < {c.N}"
            )


__all__ = [
    "NeuronStats",
    "ViewPage",
    "graph_neighbours",
    "logit_effects",
    "negative_share",
    "read_page_data",
    "render_html",
    "stream_stats",
    "view",
    "view_checkpoint",
    "view_data",
    "walk",
]
