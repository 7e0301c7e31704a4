"""Translation as language modelling over bytes (paper App. B): data, greedy decoding, BLEU/chrF.

The paper trains on one interleaved byte stream of sentence pairs, each written as

    <F:en>source sentence<T:fr>target sentence

with the direction chosen at random per pair. We end every example with a newline, so a stream reads

    <F:en>I am cold.<T:fr>J'ai froid.\\n<F:fr>Il pleut.<T:en>It is raining.\\n...

The newline is the end-of-translation delimiter: sentences never contain one, and the model learns
to emit it after the target. Decoding stops at the newline, or, if the model skips it, at the next
`<F:`/`<T:` marker.

Splits are made over groups of pairs that share a sentence on either side (connected components of
the English-French pair graph): the same English sentence has several French translations and one
French sentence can translate several English ones, so splitting by pair, or by one side only, would
put test sources into the training stream for one of the two directions.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bdh.generate import sample_next

Pair = tuple[str, str]  # (sentence in the first language, its translation in the second)

END = "\n"
STOP_MARKERS = (END.encode(), b"<F:", b"<T:")


# -------------------------------------------------------------------- reading and splitting
def read_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """Read `source<TAB>target` lines (UTF-8); a malformed line raises a one-line ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"translation pairs file not found: {path}")
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ValueError(
                    f"{path}:{number}: expected 'source<TAB>target' with both sides non-empty"
                )
            pairs.append((fields[0].strip(), fields[1].strip()))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise ValueError(f"no sentence pairs in {path}")
    return pairs


def group_pairs(pairs: list[Pair]) -> list[list[Pair]]:
    """Connected components of the bipartite sentence graph, in first-appearance order."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in pairs:  # prefixes keep an English and a French sentence of equal text apart
        ra, rb = find("0" + a), find("1" + b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        groups[find("0" + pair[0])].append(pair)
    return list(groups.values())


@dataclass
class Splits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]


def split_pairs(
    pairs: list[Pair], valid_fraction: float = 0.02, test_fraction: float = 0.02, seed: int = 0
) -> Splits:
    """Shuffle the groups (seeded) and fill test, then valid, then train with whole groups."""
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError("valid_fraction + test_fraction must leave pairs for training")
    groups = group_pairs(pairs)
    random.Random(seed).shuffle(groups)
    quota = {"test": test_fraction * len(pairs), "valid": valid_fraction * len(pairs)}
    out: dict[str, list[Pair]] = {"test": [], "valid": [], "train": []}
    for group in groups:
        name = next((k for k in ("test", "valid") if len(out[k]) < quota[k]), "train")
        out[name].extend(group)
    return Splits(train=out["train"], valid=out["valid"], test=out["test"])


# -------------------------------------------------------------------- the byte stream
def format_example(source: str, target: str, src_lang: str, tgt_lang: str) -> str:
    """One example of the stream: `<F:src>source<T:tgt>target` and the newline delimiter."""
    return f"<F:{src_lang}>{source}<T:{tgt_lang}>{target}{END}"


def prompt(text: str, src_lang: str, tgt_lang: str) -> str:
    """What the model reads before translating `text`: the newline that ends the previous example
    (so the prompt looks like any position of the training stream), then the source and the tag."""
    return f"{END}<F:{src_lang}>{text}<T:{tgt_lang}>"


def build_stream(
    pairs: list[Pair], langs: tuple[str, str] = ("en", "fr"), seed: int = 0, both: bool = True
) -> str:
    """The interleaved training text: pairs in a seeded random order, each in a seeded random
    direction (or always langs[0] -> langs[1] when both=False)."""
    rng = random.Random(seed)
    order = list(pairs)
    rng.shuffle(order)  # the file is sorted by length; a block should mix lengths
    examples = []
    for a, b in order:
        if both and rng.random() < 0.5:
            examples.append(format_example(b, a, langs[1], langs[0]))
        else:
            examples.append(format_example(a, b, langs[0], langs[1]))
    return "".join(examples)


def write_dataset(
    pairs: list[Pair],
    out_dir: str | Path,
    langs: tuple[str, str] = ("en", "fr"),
    seed: int = 0,
    valid_fraction: float = 0.02,
    test_fraction: float = 0.02,
) -> dict[str, Any]:
    """Write train.txt and valid.txt (streams) and test.tsv (held-out pairs) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = split_pairs(pairs, valid_fraction, test_fraction, seed)
    (out / "train.txt").write_text(build_stream(splits.train, langs, seed), encoding="utf-8")
    (out / "valid.txt").write_text(build_stream(splits.valid, langs, seed + 1), encoding="utf-8")
    tsv = "".join(f"{a}\t{b}\n" for a, b in splits.test)
    (out / "test.tsv").write_text(tsv, encoding="utf-8")
    return {name: len(getattr(splits, name)) for name in ("train", "valid", "test")}


# -------------------------------------------------------------------- greedy translation
@torch.no_grad()
def translate(
    model: Any,
    texts: str | list[str],
    src_lang: str = "en",
    tgt_lang: str = "fr",
    max_new_bytes: int | None = None,
    batch_size: int = 64,
) -> list[str]:
    """Greedy translation with the model's decoding state (BDH state or GPT KV cache).

    Prompts are batched by byte length, so no row needs padding and every row of a batch is the
    exact computation a batch of one would do. Each output stops at the newline delimiter.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    encoded = [prompt(t, src_lang, tgt_lang).encode("utf-8") for t in texts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(encoded):
        by_length[len(p)].append(i)
    results: list[str] = [""] * len(texts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            budget = max_new_bytes or 2 * len(encoded[chunk[0]]) + 16
            outputs = _greedy_bytes(model, [encoded[i] for i in chunk], budget)
            for i, out in zip(chunk, outputs, strict=True):
                results[i] = out.decode("utf-8", errors="replace").strip()
    return results


def translate_checkpoint(
    path: str | Path,
    texts: list[str],
    src_lang: str = "en",
    tgt_lang: str = "fr",
    max_new_bytes: int | None = None,
) -> list[str]:
    """Load a checkpoint trained on translation streams and translate `texts` greedily."""
    from bdh.checkpoint import load_checkpoint  # the checkpoint module imports the models

    for name, lang in (("--from", src_lang), ("--to", tgt_lang)):
        if not lang or any(c in lang for c in "<>\n"):
            raise ValueError(f"{name} must be a language tag like en or fr, got {lang!r}")
    if max_new_bytes is not None and max_new_bytes < 1:
        raise ValueError(f"max_new_bytes must be >= 1, got {max_new_bytes}")
    ckpt = load_checkpoint(path)
    # The prompt is fed as raw UTF-8 bytes: a BPE model would read different token ids.
    if ckpt.tokenizer.kind != "bytes" or ckpt.config.vocab_size < 256:
        raise ValueError(
            f"{ckpt.path} was not trained on bytes (tokenizer {ckpt.tokenizer.kind},"
            f" vocab {ckpt.config.vocab_size}); translation needs a byte-level model"
        )
    return translate(ckpt.model.eval(), texts, src_lang, tgt_lang, max_new_bytes)


def _greedy_bytes(model: Any, prompts: list[bytes], max_new: int) -> list[bytes]:
    """Decode greedily from equal-length byte prompts until every row hit a stop marker."""
    device = next(model.parameters()).device
    idx = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)  # (B, T)
    limit = getattr(model.config, "max_context", None)  # a learned position table ends somewhere
    if limit is not None:
        max_new = min(max_new, limit - idx.shape[1])
    state = model.init_state(idx.shape[0])
    logits, state = model.step(idx, state)
    rows = [bytearray() for _ in prompts]
    for _ in range(max(max_new, 0)):
        token = sample_next(logits[:, -1], top_k=1)  # (B, 1), argmax
        for row, byte in zip(rows, token[:, 0].tolist(), strict=True):
            row.append(byte)
        if all(_stop(row) is not None for row in rows):
            break
        logits, state = model.step(token, state)
    return [bytes(row[: _stop(row)]) for row in rows]


def _stop(row: bytearray) -> int | None:
    """Index of the first stop marker in row, or None."""
    hits = [i for i in (row.find(m) for m in STOP_MARKERS) if i >= 0]
    return min(hits) if hits else None


# -------------------------------------------------------------------- scoring
def references_by_source(pairs: list[Pair], reverse: bool = False) -> dict[str, list[str]]:
    """Every accepted translation of each source sentence (reverse: the second column is the
    source), in first-appearance order."""
    refs: dict[str, list[str]] = defaultdict(list)
    for a, b in pairs:
        src, tgt = (b, a) if reverse else (a, b)
        if tgt not in refs[src]:
            refs[src].append(tgt)
    return dict(refs)


def score(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults); each hypothesis may have several references."""
    import sacrebleu  # an optional dependency, only needed for scoring

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError("score needs one non-empty reference list per hypothesis")
    depth = max(len(r) for r in references)
    # sacrebleu wants reference *streams*; a missing reference is None (variable count allowed).
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(depth)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams)
    chrf = sacrebleu.corpus_chrf(hypotheses, streams)
    return {"bleu": round(bleu.score, 2), "chrf": round(chrf.score, 2)}


def evaluate(
    model: Any,
    test_pairs: list[Pair],
    langs: tuple[str, str] = ("en", "fr"),
    reverse: bool = False,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """BLEU/chrF of greedy translations of the held-out sources (first `limit` of a seeded shuffle).

    reverse=False translates langs[0] -> langs[1] (the first column is the source).
    """
    refs = references_by_source(test_pairs, reverse)
    sources = sorted(refs)
    random.Random(seed).shuffle(sources)
    sources = sources[:limit] if limit else sources
    src_lang, tgt_lang = (langs[1], langs[0]) if reverse else langs
    hyps = translate(model, sources, src_lang, tgt_lang)
    result: dict[str, Any] = score(hyps, [refs[s] for s in sources])
    examples = [
        {"source": s, "hypothesis": h, "references": refs[s]}
        for s, h in zip(sources[:5], hyps[:5], strict=True)
    ]
    return {
        **result,
        "direction": f"{src_lang}->{tgt_lang}",
        "sentences": len(sources),
        "examples": examples,
    }
