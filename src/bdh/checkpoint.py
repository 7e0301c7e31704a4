"""Checkpoints: a directory with `config.json`, `model.safetensors`, the tokenizer if not bytes, and
the training state (`trainer_state.json` + `trainer_state.safetensors`) when saved by the trainer.

Nothing is unpickled on load: tensors come from safetensors, everything else from JSON. A checkpoint
is written to a hidden temporary directory next to its destination and renamed into place, so a
crash at any moment leaves either the previous checkpoint or the new one, never a mix. If the crash
falls between the two renames of the swap, the previous checkpoint waits in `.<name>.old` and
`resolve_checkpoint` finds it there.

`config.json` names the model kind (`"model": "bdh"`); kinds live in `MODEL_KINDS`, so another
architecture (the GPT baseline) trains, saves and loads through the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bdh.baseline.gpt import GPT, GPTConfig
from bdh.config import BDHConfig, ConfigError
from bdh.model import BDH
from bdh.tokenizer import Tokenizer, TokenizerError, load_tokenizer

FORMAT = "bdh-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
RUN_SUBDIR = "checkpoint"  # `bdh train --out RUN` keeps its latest checkpoint in RUN/checkpoint


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or inconsistent; the message names the file."""


# ---------------------------------------------------------------------------- model kinds


@dataclass(frozen=True)
class ModelKind:
    """How to build one architecture: its config class (with presets) and its module."""

    name: str
    config_class: Any  # has from_name, from_dict, to_dict
    build: Callable[[Any], nn.Module]


# The architectures a checkpoint can hold, listed here (not registered from elsewhere): adding one
# is one line, and which kinds load never depends on which modules happen to be imported.
MODEL_KINDS: dict[str, ModelKind] = {
    "bdh": ModelKind("bdh", BDHConfig, BDH),
    "gpt": ModelKind("gpt", GPTConfig, GPT),
}


def model_kind(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[name]


# ---------------------------------------------------------------------------- saving


@dataclass
class Checkpoint:
    path: Path
    kind: str
    config: Any
    model: nn.Module
    tokenizer: Tokenizer
    meta: dict[str, Any] = field(default_factory=dict)  # training settings, data source, step
    training: dict[str, Any] | None = None  # optimizer, RNG and data position (resume only)


# Called with a stage name as a checkpoint is written; a no-op except in the crash tests.
_on_write: Callable[[str], None] = lambda stage: None  # noqa: E731


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    kind: str,
    tokenizer: Tokenizer,
    meta: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; `training` may nest tensors, dicts and lists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_weights(tmp / WEIGHTS_FILE, model)
    _on_write(WEIGHTS_FILE)
    tokenizer.save(tmp)
    if training is not None:
        obj, tensors = _split_tensors(training)
        save_file(tensors, str(tmp / STATE_TENSORS))
        _write_text(tmp / STATE_JSON, json.dumps(obj))
        _on_write(STATE_TENSORS)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": kind,
        "config": model.config.to_dict(),
        "tokenizer": tokenizer.kind,
        "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
        "meta": meta or {},
    }
    _write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2))
    _fsync_tree(tmp)
    _swap_into_place(tmp, path)
    return path


def _write_weights(path: Path, model: nn.Module) -> None:
    # Tied weights (the GPT's embedding and head) share storage; safetensors stores each once and
    # the aliases are recorded in the metadata.
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def _fsync_tree(directory: Path) -> None:
    """Flush every file and the directory itself, so a rename cannot outrun the data."""
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, path: Path) -> None:
    old = path.parent / f".{path.name}.old"
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    _on_write("swap")  # the previous checkpoint now waits at `old`
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- loading


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory meant by `path`: itself, RUN/checkpoint, or a swap's leftover."""
    path = Path(path).expanduser()
    for candidate in (path, path / RUN_SUBDIR):
        for where in (candidate, candidate.parent / f".{candidate.name}.old"):
            if (where / CONFIG_FILE).is_file():
                return where
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    raise CheckpointError(f"{path} is not a checkpoint (no {CONFIG_FILE} in it)")


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory, checked for the fields we need."""
    file = Path(path) / CONFIG_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} config")
    for key in ("model", "config", "tokenizer"):
        if key not in data:
            raise CheckpointError(f"{file} has no {key!r} field")
    return data


def load_checkpoint(
    path: str | Path, training: bool = False, map_location: str = "cpu"
) -> Checkpoint:
    """Rebuild the model (and tokenizer, and training state if asked) from a checkpoint."""
    path = resolve_checkpoint(path)
    data = read_config(path)
    kind = model_kind(data["model"])
    try:
        config = kind.config_class.from_dict(data["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    try:
        tokenizer = load_tokenizer(data["tokenizer"], path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    model = kind.build(config)
    _load_weights(path, model, data.get("weights_sha256"), map_location)
    state = _read_training(path) if training else None
    return Checkpoint(path, kind.name, config, model, tokenizer, data.get("meta", {}), state)


def _load_weights(path: Path, model: nn.Module, sha256: str | None, map_location: str) -> None:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    if sha256 is not None and _sha256(file) != sha256:
        raise CheckpointError(f"{file} is corrupt or truncated (its checksum does not match)")
    try:
        with safe_open(str(file), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        tensors = load_file(str(file), device=map_location)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    _check_shapes(path, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)


def _check_shapes(path: Path, expected: dict[str, Tensor], found: dict[str, Tensor]) -> None:
    where = f"{path / CONFIG_FILE} does not match {WEIGHTS_FILE}"
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in expected.items():
        if tuple(found[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(found[name].shape)} in the weights"
                f" but {tuple(t.shape)} from the config"
            )


def _read_training(path: Path) -> dict[str, Any]:
    json_file, tensor_file = path / STATE_JSON, path / STATE_TENSORS
    if not json_file.is_file() or not tensor_file.is_file():
        raise CheckpointError(f"{path} holds no training state (saved without the trainer?)")
    try:
        obj = json.loads(json_file.read_text())
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"training state in {path} is unreadable: {e}") from None
    return _join_tensors(obj, tensors)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- nested state <-> JSON


def _split_tensors(obj: Any, tensors: dict[str, Tensor] | None = None) -> tuple[Any, dict]:
    """Replace each tensor in a nested structure by {"__tensor__": key}; JSON-safe dict keys.

    An optimizer's state_dict has integer keys, which JSON would turn into strings, so a dict with
    any non-string key is stored as {"__items__": [[key, value], ...]}.
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}, tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _split_tensors(v, tensors)[0] for k, v in obj.items()}, tensors
        return {"__items__": [[k, _split_tensors(v, tensors)[0]] for k, v in obj.items()]}, tensors
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors)[0] for v in obj], tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    raise CheckpointError(f"cannot store a {type(obj).__name__} in the training state")


def _join_tensors(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _join_tensors(v, tensors) for k, v in obj["__items__"]}
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj
