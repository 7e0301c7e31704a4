"""Our checkpoints to transformers folders and back.

`export_hf` writes a folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline: `config.json`, `model.safetensors` (BDH's
weights under `bdh.`, the rotary frequencies included, so merged or grown models keep every
neuron's own frequency), the tokenizer, and two small loading modules for
`trust_remote_code=True`. A GPT baseline checkpoint becomes
transformers' own GPT-2 (`GPT2LMHeadModel`) where its configuration maps (see `gpt2_config`).

`import_hf` reads such a BDH folder back into our checkpoint format, with identical weights; it
reads JSON and safetensors only and executes nothing from the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from bdh.baseline.gpt import GPT, GPTConfig
from bdh.checkpoint import load_checkpoint, save_checkpoint
from bdh.config import ConfigError
from bdh.hf import tokenization
from bdh.hf.configuration import BDHHFConfig
from bdh.hf.modeling import BDHForCausalLM
from bdh.model import BDH

WEIGHTS = "model.safetensors"
PREFIX = "bdh."

# The folder's own loading code for trust_remote_code=True: it imports the installed `bdh`
# package (the model's math is not copied into the folder).
REMOTE_CODE = {
    "configuration_bdh.py": "from bdh.hf.configuration import BDHHFConfig\n\n"
    '__all__ = ["BDHHFConfig"]\n',
    "modeling_bdh.py": "from bdh.hf.modeling import BDHCache, BDHForCausalLM\n\n"
    '__all__ = ["BDHCache", "BDHForCausalLM"]\n',
}
AUTO_MAP = {
    "AutoConfig": "configuration_bdh.BDHHFConfig",
    "AutoModelForCausalLM": "modeling_bdh.BDHForCausalLM",
}


class ConversionError(ValueError):
    """A checkpoint or folder cannot be converted; the message says why."""


def to_hf(model: BDH) -> BDHForCausalLM:
    """A `BDHForCausalLM` holding a copy of `model`'s weights and buffers."""
    hf = BDHForCausalLM(BDHHFConfig.from_bdh(model.config))
    hf.bdh.load_state_dict(model.state_dict(), strict=True)
    return hf.train(model.training)


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write the checkpoint `ckpt` (BDH or GPT) as a transformers folder `out`."""
    loaded = load_checkpoint(ckpt)
    out = Path(out)
    if loaded.kind == "gpt":
        model = to_gpt2(loaded.model)
        model.save_pretrained(out)
    elif loaded.kind == "bdh":
        model = to_hf(loaded.model)
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(out)
        for name, text in REMOTE_CODE.items():
            (out / name).write_text(text)
    else:
        raise ConversionError(f"no transformers form for a {loaded.kind!r} checkpoint")
    tokenization.save(loaded.tokenizer, out)
    return out


def import_hf(folder: str | Path, out: str | Path) -> Path:
    """Read a BDH transformers folder (as `export_hf` writes) into our checkpoint `out`."""
    folder = Path(folder)
    config = _read_config(folder)
    tensors = _read_weights(folder)
    model = BDH(config)
    weights = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    expected = model.state_dict()
    if set(weights) != set(expected) or len(weights) != len(tensors):
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(tensors) - {PREFIX + k for k in expected})
        raise ConversionError(
            f"{folder / WEIGHTS} does not hold BDH's weights: missing {missing[:3]},"
            f" unexpected {extra[:3]}"
        )
    for name, t in expected.items():
        if weights[name].shape != t.shape:
            raise ConversionError(
                f"{folder / WEIGHTS}: {PREFIX}{name} has shape {tuple(weights[name].shape)},"
                f" the config gives {tuple(t.shape)}"
            )
    model.load_state_dict(weights, strict=True)
    return save_checkpoint(
        out, model, "bdh", tokenization.from_folder(folder), meta={"imported_from": str(folder)}
    )


def _read_config(folder: Path):  # -> BDHConfig
    file = folder / "config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{file} not found: not a transformers folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict) or data.get("model_type") != BDHHFConfig.model_type:
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise ConversionError(f"{file} describes a {kind!r} model, not a BDH ('bdh') one")
    try:
        return BDHHFConfig.from_dict(data).to_bdh()
    except (ConfigError, TypeError, ValueError) as e:
        raise ConversionError(f"{file}: {e}") from None


def _read_weights(folder: Path) -> dict[str, Tensor]:
    file = folder / WEIGHTS
    if not file.is_file():
        raise ConversionError(f"{file} is missing (sharded or .bin weights are not read)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{file} is corrupt or truncated: {e}") from None


# ---------------------------------------------------------------------------- GPT baseline


def gpt2_config(config: GPTConfig):  # -> transformers.GPT2Config
    """transformers' GPT-2 configuration of our GPT baseline.

    Maps: learned positions (GPT-2 has no ALiBi: `position="alibi"` does not map), biases or none
    (`bias=False` becomes zero biases), exact-erf GELU ("gelu", not GPT-2's default tanh form),
    LayerNorm ε = 1e-5, dropout on embeddings, attention weights and residual branches, and the
    output head tied to the token embedding.
    """
    from transformers import GPT2Config

    if config.position != "learned":
        raise ConversionError(
            f"a GPT with position={config.position!r} has no GPT-2 form (GPT-2 learns positions)"
        )
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        activation_function="gelu",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )


def to_gpt2(model: GPT):  # -> transformers.GPT2LMHeadModel
    """A `GPT2LMHeadModel` computing what our GPT computes (same weights; Conv1D is x @ W)."""
    from transformers import GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(gpt2_config(c))
    ours = model.state_dict()
    weights: dict[str, Tensor] = {
        "transformer.wte.weight": ours["wte.weight"],
        "transformer.wpe.weight": ours["wpe.weight"],
    }
    for name in ("weight", "bias"):
        weights[f"transformer.ln_f.{name}"] = _or_zeros(ours, f"ln_f.{name}", c.n_embd)
    for i in range(c.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            weights[dst + f"{ln}.weight"] = ours[src + f"{ln}.weight"]
            weights[dst + f"{ln}.bias"] = _or_zeros(ours, src + f"{ln}.bias", c.n_embd)
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = ours[src + f"{lin}.weight"]  # nn.Linear (out, in); GPT-2's Conv1D is (in, out)
            weights[dst + f"{lin}.weight"] = w.t().contiguous()
            weights[dst + f"{lin}.bias"] = _or_zeros(ours, src + f"{lin}.bias", w.shape[0])
    result = hf.load_state_dict(weights, strict=False)
    left = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to wte
    if left or result.unexpected_keys:
        raise ConversionError(
            f"GPT-2 weights do not match: {left[:3]} {result.unexpected_keys[:3]}"
        )
    hf.tie_weights()
    return hf.train(model.training)


def _or_zeros(weights: dict[str, Tensor], name: str, size: int) -> Tensor:
    """A bias, or zeros for a model built with bias=False (adding zero changes nothing)."""
    return weights[name] if name in weights else torch.zeros(size)
