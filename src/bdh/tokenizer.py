"""Tokenizers: raw bytes (vocabulary 256, as in the paper) or a byte-level BPE.

Both map every token id to a fixed byte string (`token_bytes`), which is what bits per byte and
streaming decoding need: the bytes of a prediction are known whatever the tokenizer, and text is
decoded incrementally so a UTF-8 character split across tokens is printed once it is complete.

The BPE is trained with the `tokenizers` library on the training split only (the validation split
must stay unseen) and saved with the checkpoint as `tokenizer.json`.
"""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
KINDS = ("bytes", "bpe")


class TokenizerError(ValueError):
    """A tokenizer cannot be built or read; the message names the file or setting."""


class ByteTokenizer:
    """Each byte is a token: ids 0..255, no training, nothing to save."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, data: bytes | str) -> np.ndarray:
        """Token ids (uint16) of `data`; a str is encoded as UTF-8 first."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def token_bytes(self, token: int) -> bytes:
        return bytes((token,))

    @cached_property
    def bytes_per_token(self) -> np.ndarray:
        """(V,) number of bytes each token stands for."""
        return np.ones(self.vocab_size, dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        """Identifies the id mapping, so cached token arrays are never mixed up."""
        return "bytes"

    def save(self, directory: Path) -> None:
        """Bytes need no file."""


class BPETokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenisation) from the `tokenizers` library.

    Its alphabet holds all 256 bytes, so any input encodes without an unknown token.
    """

    kind = "bpe"

    def __init__(self, tokenizer: object) -> None:
        self._tok = tokenizer  # a tokenizers.Tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges on `texts` (the training split) up to `vocab_size` tokens."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size <= 256:
            raise TokenizerError(
                f"BPE vocab_size must be > 256 (the byte alphabet), got {vocab_size}"
            )
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the library raises a bare Exception for bad files
            raise TokenizerError(f"cannot read tokenizer {path}: {_first_line(e)}") from None

    def save(self, directory: Path) -> None:
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, data: bytes | str) -> np.ndarray:
        if isinstance(data, bytes):
            data = data.decode("utf-8", errors="replace")
        ids = self._tok.encode(data).ids
        return np.asarray(ids, dtype=np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def token_bytes(self, token: int) -> bytes:
        return self._table[token]

    @cached_property
    def _table(self) -> list[bytes]:
        """Bytes of every token: byte-level tokens are bytes spelled in a printable alphabet."""
        decode = {ch: b for b, ch in _bytes_to_unicode().items()}
        table = [b""] * self.vocab_size
        for piece, token in self._tok.get_vocab().items():
            table[token] = bytes(decode[ch] for ch in piece)
        return table

    @cached_property
    def bytes_per_token(self) -> np.ndarray:
        return np.array([len(b) for b in self._table], dtype=np.int64)

    @cached_property
    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]


Tokenizer = ByteTokenizer | BPETokenizer


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of `kind` ("bytes" or "bpe"); BPE learns from `texts`."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size or 1024)
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")


def load_tokenizer(kind: str, directory: Path) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"{path} is missing (the checkpoint uses a BPE tokenizer)")
        return BPETokenizer.load(path)
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")


def decode_stream(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; bytes of an unfinished UTF-8 character wait for the next."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        piece = decoder.decode(tokenizer.token_bytes(int(token)))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def decode(tokenizer: Tokenizer, tokens: Iterable[int]) -> str:
    return "".join(decode_stream(tokenizer, tokens))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (used by ByteLevel)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
