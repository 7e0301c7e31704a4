"""`BDHHFConfig`: a `transformers` configuration carrying every field of `bdh.BDHConfig`.

The fields keep their `BDHConfig` names and defaults, so `to_bdh()` rebuilds the exact model
configuration; `BDHConfig` (not this class) validates the values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from bdh.config import BDHConfig

_DEFAULTS = BDHConfig()


class BDHHFConfig(PretrainedConfig):
    """The configuration of `BDHForCausalLM` (`model_type = "bdh"`)."""

    model_type = "bdh"
    # The names transformers' utilities look for (e.g. `hidden_size` for the pipeline's dtype).
    attribute_map = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
    }

    n_layer: int = _DEFAULTS.n_layer
    n_embd: int = _DEFAULTS.n_embd
    n_head: int = _DEFAULTS.n_head
    mlp_internal_dim_multiplier: int = _DEFAULTS.mlp_internal_dim_multiplier
    dropout: float | int = _DEFAULTS.dropout
    vocab_size: int = _DEFAULTS.vocab_size
    attention: str = _DEFAULTS.attention
    chunk_size: int = _DEFAULTS.chunk_size
    damping: float | int | list[float] | None = _DEFAULTS.damping
    no_bptt: bool = _DEFAULTS.no_bptt
    residual: str = _DEFAULTS.residual
    layernorm: bool = _DEFAULTS.layernorm
    rope: bool = _DEFAULTS.rope
    meta: dict | None = None
    use_cache: bool = True
    # The output head is its own matrix, not the token embedding.
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.to_bdh()  # a one-line ConfigError for any value BDH does not accept

    @classmethod
    def from_bdh(cls, config: BDHConfig, **kwargs: Any) -> BDHHFConfig:
        """The transformers form of a `BDHConfig` (kwargs: e.g. token ids for generation)."""
        return cls(**config.to_dict(), **kwargs)

    def to_bdh(self) -> BDHConfig:
        """The `BDHConfig` these fields describe."""
        names = [f.name for f in dataclasses.fields(BDHConfig)]
        fields = {name: getattr(self, name) for name in names}
        fields["meta"] = dict(fields["meta"] or {})
        return BDHConfig.from_dict(fields)
