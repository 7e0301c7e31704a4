"""The GPT-2-style Transformer baseline the paper compares BDH against (Fig. 7, App. B).

Notation: B batch, T tokens in a forward call, t tokens in a decoding step, S = pos + t keys held by
the cache, D = n_embd, nh = n_head, hs = D / nh head size, L = n_layer, V = vocab_size.

A decoder-only Transformer in GPT-2's shape: token embedding (+ learned positions), L blocks of
pre-LayerNorm causal self-attention and a 4·D GELU MLP, a final LayerNorm, and an output head tied
to the token embedding. Positions are either a learned table (GPT-2; a hard maximum context) or
ALiBi (the paper's baseline: a per-head linear distance penalty on the attention scores, no
maximum).

It has BDH's interface so the same trainer, sampler, benchmarks and translation code drive both:
`logits, loss = model(idx, targets)`, `state = model.init_state(B)`, `logits, state =
model.step(idx, state)` and `model.generate(...)`. Its decoding state is a KV cache, which grows by
one key and one value per token per layer, where BDH's state has a fixed size.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdh import generate as _generate
from bdh.config import ConfigError

POSITIONS = ("learned", "alibi")


@dataclass
class GPTConfig:
    n_layer: int = 6
    n_embd: int = 384  # D
    n_head: int = 6
    # Maximum context of the learned position table; ignored by ALiBi, which has no maximum.
    block_size: int = 256
    vocab_size: int = 256
    dropout: float = 0.1
    # Biases in the linear layers and LayerNorms, as in GPT-2.
    bias: bool = True
    # "learned": GPT-2's position table; "alibi": linear distance penalty (the paper's baseline).
    position: str = "learned"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "block_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be true or false, got {self.bias!r}")
        if self.position not in POSITIONS:
            raise ConfigError(f"position must be one of {POSITIONS}, got {self.position!r}")

    @property
    def max_context(self) -> int | None:
        """Longest sequence the model accepts: block_size with learned positions, else None."""
        return self.block_size if self.position == "learned" else None

    @property
    def num_params(self) -> int:
        """All trainable parameters, counting the tied embedding/output matrix once."""
        D, L, b = self.n_embd, self.n_layer, int(self.bias)
        ln = D * (1 + b)  # LayerNorm scale (+ bias)
        block = 2 * ln + (3 * D * D + 3 * D * b) + (D * D + D * b) + (8 * D * D + 5 * D * b)
        positions = self.block_size * D if self.position == "learned" else 0
        return self.vocab_size * D + positions + L * block + ln

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown GPT config field(s): {', '.join(unknown)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> GPTConfig:
        """Parse a JSON string, or read a JSON file when given a path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (see GPT_PRESETS), with any field overridden."""
        if name not in GPT_PRESETS:
            raise ConfigError(
                f"unknown GPT preset {name!r}; choose one of {', '.join(GPT_PRESETS)}"
            )
        return cls(**{**GPT_PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)


# `small` and `tiny` mirror the BDH presets of the same names in role (a few CPU minutes; tests).
# The parameter-matched ladder used by the scaling experiment lives in bdh.baseline.presets.
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "small": {"n_layer": 4, "n_embd": 192, "n_head": 6, "dropout": 0.0},
    "tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 64, "dropout": 0.0},
}


# -------------------------------------------------------------------- decoding state
@dataclass
class GPTState:
    """KV cache: per layer the keys and values of every position seen so far, (B, nh, pos, hs)."""

    layers: list[tuple[Tensor, Tensor]]
    pos: int = 0

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def clone(self) -> GPTState:
        return GPTState([(k.clone(), v.clone()) for k, v in self.layers], self.pos)

    def detach(self) -> GPTState:
        return GPTState([(k.detach(), v.detach()) for k, v in self.layers], self.pos)


def alibi_slopes(n_head: int) -> Tensor:
    """Per-head slopes m_h = 2^(−8(h+1)/nh): a geometric sequence from 2^(−8/nh) down to 2^(−8).

    Steep heads look only at recent tokens, shallow heads far back; for a power-of-two head count
    this is ALiBi's published choice, and the same formula serves any other head count.
    """
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)])


# -------------------------------------------------------------------- modules
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, bias: Tensor | None, cache: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, t, D); bias (nh or 1, t, S) additive mask, or None for plain causal from 0."""
        B, t, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (z.view(B, t, self.n_head, D // self.n_head).transpose(1, 2) for z in (q, k, v))
        if cache is not None:  # keys and values of positions 0..pos-1 come first
            k = torch.cat([cache[0], k], dim=2)  # (B, nh, S, hs)
            v = torch.cat([cache[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, bias, p, is_causal=bias is None
        )  # (B, nh, t, hs)
        y = y.transpose(1, 2).contiguous().view(B, t, D)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, bias: Tensor | None, cache: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.ln_1(x), bias, cache)
        x = x + a  # pre-LN: the residual stream itself is never normalised
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.max_context else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # Not persistent: derived from n_head, so checkpoints hold parameters only.
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2L), so its
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:  # a method, as BDH.num_params()
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- forward
    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the next-token loss if targets given."""
        self._check_ids(idx, "idx")
        logits, _ = self._run(idx, pos=0, caches=None)
        if targets is None:
            return logits, None
        self._check_ids(targets, "targets", allow_ignore=True)
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    def _run(
        self, idx: Tensor, pos: int, caches: list[tuple[Tensor, Tensor]] | None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Tokens at absolute positions pos..pos+t-1, attending to `caches` (positions 0..pos-1)."""
        t = idx.shape[1]
        self._check_context(pos + t)
        x = self.wte(idx)  # (B, t, D)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos, pos + t, device=idx.device))
        x = self.drop(x)
        bias = self._attention_bias(t, pos, x.dtype, x.device)
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, bias, None if caches is None else caches[i])
            new_caches.append(kv)
        logits = self.ln_f(x) @ self.wte.weight.T  # tied output head, (B, t, V)
        return logits, new_caches

    def _attention_bias(
        self, t: int, pos: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """Additive score bias (nh or 1, t, pos + t): −inf above the causal diagonal, −m_h·distance
        below it with ALiBi. None when plain `is_causal` attention computes the same thing."""
        alibi = self.config.position == "alibi"
        if pos == 0 and not alibi:
            return None
        q_pos = torch.arange(pos, pos + t, device=device)[:, None]  # (t, 1)
        k_pos = torch.arange(pos + t, device=device)[None, :]  # (1, S)
        distance = (q_pos - k_pos).to(dtype)  # (t, S), >= 0 where attention is allowed
        bias = torch.zeros_like(distance)[None]  # (1, t, S)
        if alibi:
            bias = -self.slopes.to(dtype)[:, None, None] * distance  # (nh, t, S)
        return bias.masked_fill(distance < 0, float("-inf"))

    # ---------------------------------------------------------------- decoding with a KV cache
    def init_state(self, batch_size: int) -> GPTState:
        """An empty KV cache for `batch_size` sequences, on the model's device and dtype."""
        c = self.config
        w = self.wte.weight
        empty = w.new_zeros(batch_size, c.n_head, 0, c.n_embd // c.n_head)
        return GPTState([(empty, empty) for _ in range(c.n_layer)], pos=0)

    def step(self, idx: Tensor, state: GPTState) -> tuple[Tensor, GPTState]:
        """Feed idx (B, t) continuing at state.pos; the cache is advanced in place and returned."""
        self._check_ids(idx, "idx")
        if idx.shape[0] != state.batch_size:
            raise ValueError(
                f"idx has batch size {idx.shape[0]} but the state was made for {state.batch_size}"
            )
        logits, state.layers = self._run(idx, state.pos, state.layers)
        state.pos += idx.shape[1]
        return logits, state

    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        callback: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """Prefill idx (B, T) once, then decode from the cache; returns (B, T + max_new_tokens)."""
        return _generate.generate(
            self, idx, max_new_tokens, temperature, top_k, top_p, generator, callback
        )

    # ---------------------------------------------------------------- input checks
    def _check_ids(self, ids: Tensor, name: str, allow_ignore: bool = False) -> None:
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 2:
            raise ValueError(f"{name} must be a (B, T) tensor of integer token ids")
        if ids.numel() == 0:
            raise ValueError(f"{name} must hold at least one token")
        low, V = (-1 if allow_ignore else 0), self.config.vocab_size
        bad = ids[(ids < low) | (ids >= V)]
        if bad.numel():
            allowed = f"[0, {V}) or -1 (ignored)" if allow_ignore else f"[0, {V})"
            raise ValueError(f"{name} holds token id {int(bad[0])} outside {allowed}")

    def _check_context(self, length: int) -> None:
        limit = self.config.max_context
        if limit is not None and length > limit:
            raise ValueError(
                f"sequence position {length} exceeds block_size={limit} of the learned position"
                " table; use a shorter context or position='alibi'"
            )
