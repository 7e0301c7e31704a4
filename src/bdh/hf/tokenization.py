"""Tokenizers for transformers: our byte tokenizer and our BPE, as `tokenizers` fast tokenizers.

The byte tokenizer maps each byte to its own id (0..255, as `bdh.tokenizer.ByteTokenizer`), with
no special tokens and no offset, so ids written by this project are read unchanged. It is a
byte-level BPE without merges: `AutoTokenizer` loads it from `tokenizer.json` with no custom code.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bdh.tokenizer import (
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    _bytes_to_unicode,
    load_tokenizer,
)
from bdh.tokenizer import Tokenizer as BDHTokenizer


def byte_tokenizer() -> Tokenizer:
    """A `tokenizers.Tokenizer` whose ids are the UTF-8 bytes of the text."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: the text is one piece of bytes, each its own token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _as_tokenizers(tokenizer: BDHTokenizer) -> Tokenizer:
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokenizer()
    if isinstance(tokenizer, BPETokenizer):
        return Tokenizer.from_str(tokenizer._tok.to_str())
    raise TypeError(f"no transformers form for a {type(tokenizer).__name__}")


def to_transformers(tokenizer: BDHTokenizer) -> PreTrainedTokenizerFast:
    """Our tokenizer (bytes or BPE) as a transformers fast tokenizer with the same ids."""
    tok = _as_tokenizers(tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def save(tokenizer: BDHTokenizer, directory: Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` for `AutoTokenizer`.

    transformers writes its own `tokenizer.json` with a no-op post-processor added; ours replaces
    it, so importing the folder gives back the very tokenizer (same fingerprint) it came from.
    """
    to_transformers(tokenizer).save_pretrained(directory)
    (Path(directory) / TOKENIZER_FILE).write_text(_as_tokenizers(tokenizer).to_str())


def from_folder(directory: Path) -> BDHTokenizer:
    """Our tokenizer from an exported folder's `tokenizer.json`: bytes, or the BPE it holds."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        return ByteTokenizer()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if _is_byte_tokenizer(data):
        return ByteTokenizer()
    return load_tokenizer("bpe", Path(directory))


def _is_byte_tokenizer(data: object) -> bool:
    """True for the tokenizer `byte_tokenizer()` writes: 256 byte tokens, no merges."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return False
    model = data["model"]
    expected = {char: byte for byte, char in _bytes_to_unicode().items()}
    return model.get("vocab") == expected and not model.get("merges")
