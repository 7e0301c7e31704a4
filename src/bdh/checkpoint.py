"""Checkpoints: a directory with `config.json`, `model.safetensors`, the tokenizer if not bytes, and
the training state (`trainer_state.json` + `trainer_state.safetensors`) when saved by the trainer.

Nothing is unpickled on load: tensors come from safetensors, everything else from JSON. A checkpoint
is written to a hidden temporary directory next to its destination and renamed into place, so a
crash at any moment leaves either the previous checkpoint or the new one, never a mix. If the crash
falls between the two renames of the swap, the previous checkpoint waits in `.<name>.old` and
`resolve_checkpoint` finds it there. A write that fails (a full disk) removes its temporary
directory and keeps the previous checkpoint.

A checkpoint may come from a stranger: every file is read as a regular file inside the checkpoint
(no symlink or device leads out of it), JSON files are bounded in size, and the sizes in
`config.json` are checked against the machine's memory before any tensor is allocated. A reader
that races a writer replacing the checkpoint retries, so it always loads one whole checkpoint.

`config.json` names the model kind (`"model": "bdh"`); kinds live in `MODEL_KINDS`, so another
architecture (the GPT baseline) trains, saves and loads through the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bdh.baseline.gpt import GPT, GPTConfig
from bdh.config import BDHConfig, ConfigError
from bdh.model import BDH
from bdh.tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError, load_tokenizer

FORMAT = "bdh-checkpoint"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
RUN_SUBDIR = "checkpoint"  # `bdh train --out RUN` keeps its latest checkpoint in RUN/checkpoint
MAX_JSON_BYTES = 64 * 2**20  # config.json and trainer_state.json are kilobytes when we write them
LOAD_ATTEMPTS = 20  # reads that race a writer's swap start again (see load_checkpoint)


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
    try:
        _write_tree(tmp, model, kind, tokenizer, meta, training)
        _swap_into_place(tmp, path)
    except (OSError, SafetensorError) as e:
        # A full disk or a failing device: free what was written, keep the previous checkpoint
        # (in place, or in `.<name>.old` if the swap had begun) and say so.
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(
            f"could not write the checkpoint {path}: {reason}; the previous checkpoint is kept"
        ) from None
    return path


def _write_tree(
    tmp: Path,
    model: nn.Module,
    kind: str,
    tokenizer: Tokenizer,
    meta: dict[str, Any] | None,
    training: dict[str, Any] | None,
) -> None:
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
    file = checked_file(path, CONFIG_FILE)
    try:
        data = json.loads(_read_bounded(file))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} config")
    for key in ("model", "config", "tokenizer"):
        if key not in data:
            raise CheckpointError(f"{file} has no {key!r} field")
    if not isinstance(data["model"], str) or not isinstance(data["tokenizer"], str):
        raise CheckpointError(f"{file}: 'model' and 'tokenizer' must be names (strings)")
    if not isinstance(data.get("meta", {}), dict):
        raise CheckpointError(f"{file}: 'meta' must be a JSON object")
    return data


def checked_file(directory: str | Path, name: str) -> Path:
    """`directory/name` if it is a regular file inside the directory (no symlink out of it, no
    device or pipe that would hang a reader); a CheckpointError otherwise."""
    file = Path(directory) / name
    if not os.path.lexists(file):
        raise CheckpointError(f"{file} is missing")
    try:
        mode = os.lstat(file).st_mode
    except FileNotFoundError:  # removed since: the checkpoint is being replaced
        raise CheckpointError(f"{file} is missing") from None
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        raise CheckpointError(f"{file} is not a regular file inside the checkpoint; refusing it")
    return file


def _read_bounded(file: Path) -> str:
    limit = MAX_JSON_BYTES
    with open(file, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{file} is larger than {limit // 2**20} MiB; refusing it")
    return data.decode("utf-8")


def machine_memory() -> int | None:
    """Physical memory of the machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(config: Any, what: str, copies: int = 2) -> None:
    """Refuse a model whose `copies` float32 copies of the weights exceed the machine's memory,
    before anything is allocated (a hostile config.json must not exhaust memory). Loading holds
    two copies (the file's tensors and the model); training four (weights, gradients, AdamW)."""
    params, total = getattr(config, "num_params", None), machine_memory()
    if params is None or total is None:
        return
    need = copies * 4 * params
    if need > total:
        raise CheckpointError(
            f"{what}: the model has {params:,} parameters and needs about {need / 2**30:,.1f} GiB,"
            f" more than this machine's {total / 2**30:.1f} GiB; refusing to allocate it"
        )


def load_checkpoint(
    path: str | Path, training: bool = False, map_location: str = "cpu"
) -> Checkpoint:
    """Rebuild the model (and tokenizer, and training state if asked) from a checkpoint.

    A writer may replace the checkpoint while it is read (`bdh sample` during training). The
    config.json read before and after loading must then be the same bytes (it names the step and
    the weights' checksum); otherwise the files may come from two checkpoints and loading starts
    again, so the caller always gets one whole checkpoint.
    """
    for attempt in range(LOAD_ATTEMPTS):
        where = resolve_checkpoint(path)
        before = _config_bytes(where)
        try:
            ckpt = _load(where, training, map_location)
        except (CheckpointError, OSError) as e:  # a file may vanish as the writer swaps
            replaced = before is None or _config_bytes(where) != before
            if not replaced or attempt + 1 == LOAD_ATTEMPTS:
                if isinstance(e, CheckpointError):
                    raise  # damaged, not replaced while we read it
                raise CheckpointError(f"cannot read the checkpoint {where}: {e}") from None
            time.sleep(0.005 * attempt)
            continue
        if before is not None and _config_bytes(where) == before:
            return ckpt
        time.sleep(0.005 * attempt)  # back off: a slow reader still finds a quiet moment
    raise CheckpointError(f"{path} kept being replaced while it was read; try again")


def _config_bytes(where: Path) -> bytes | None:
    try:
        with open(where / CONFIG_FILE, "rb") as f:
            return f.read(MAX_JSON_BYTES + 1)
    except OSError:
        return None


def _load(path: Path, training: bool, map_location: str) -> Checkpoint:
    data = read_config(path)
    kind = model_kind(data["model"])
    try:
        config = kind.config_class.from_dict(data["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None
    check_fits_in_memory(config, str(path / CONFIG_FILE))
    if os.path.lexists(path / TOKENIZER_FILE):
        checked_file(path, TOKENIZER_FILE)
    try:
        tokenizer = load_tokenizer(data["tokenizer"], path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    model = kind.build(config)
    _load_weights(path, model, data.get("weights_sha256"), map_location)
    state = _read_training(path) if training else None
    return Checkpoint(path, kind.name, config, model, tokenizer, data.get("meta", {}), state)


def _load_weights(path: Path, model: nn.Module, sha256: str | None, map_location: str) -> None:
    file = checked_file(path, WEIGHTS_FILE)
    if sha256 is not None and _sha256(file) != sha256:
        raise CheckpointError(f"{file} is corrupt or truncated (its checksum does not match)")
    corrupt = (SafetensorError, OSError, ValueError, RuntimeError)  # RuntimeError: vanished
    try:
        with safe_open(str(file), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except corrupt as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    if not isinstance(aliases, dict) or not all(
        isinstance(target, str) and target in shapes for target in aliases.values()
    ):
        raise CheckpointError(f"{file} has malformed aliases in its metadata")
    shapes |= {name: shapes[target] for name, target in aliases.items()}
    # From the header alone: a file holding more than its config says is refused, not read.
    _check_shapes(path, model.state_dict(), shapes)
    try:
        tensors = load_file(str(file), device=map_location)
    except corrupt as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    for name, t in tensors.items():  # a flipped exponent bit must not reach the sampler
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{file} holds non-finite values (NaN or inf) in {name}")
    model.load_state_dict(tensors, strict=True)


def _check_shapes(
    path: Path, expected: dict[str, Tensor], found: dict[str, tuple[int, ...]]
) -> None:
    where = f"{path / CONFIG_FILE} does not match {WEIGHTS_FILE}"
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in expected.items():
        if found[name] != tuple(t.shape):
            raise CheckpointError(
                f"{where}: {name} has shape {found[name]} in the weights"
                f" but {tuple(t.shape)} from the config"
            )


def _read_training(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path / STATE_JSON) or not os.path.lexists(path / STATE_TENSORS):
        raise CheckpointError(f"{path} holds no training state (saved without the trainer?)")
    json_file, tensor_file = checked_file(path, STATE_JSON), checked_file(path, STATE_TENSORS)
    try:
        obj = json.loads(_read_bounded(json_file))
        tensors = load_file(str(tensor_file))
        return _join_tensors(obj, tensors)
    except (SafetensorError, OSError, ValueError, RecursionError, LookupError, TypeError) as e:
        raise CheckpointError(f"training state in {path} is unreadable: {e!r}") from None


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
