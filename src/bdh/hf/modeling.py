"""`BDHForCausalLM`: our `bdh.BDH` inside a `transformers` `PreTrainedModel`.

The wrapper holds a `bdh.BDH` (its weights are named `bdh.*`) and calls only its public API:
`model(idx)`, `model.init_state(B)` and `model.step(idx, state)`. No layer math lives here.

Decoding goes through the constant-size state: `BDHCache` holds a `bdh.BDHState`, and each call
with a cache feeds only the new tokens, continuing the state.

Padding. BDH has no attention mask to hide a token: every token read is written into the state.
A token whose `attention_mask` is 0 is therefore not read at all. Each row is the stream of its
unmasked tokens, at positions 0, 1, ... of its own, so a left-padded row gives exactly what the
unpadded row gives alone (masked positions get zero logits). Rows with padding are computed one
at a time; unpadded batches take the batched path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from bdh.hf.configuration import BDHHFConfig
from bdh.model import BDH
from bdh.state import BDHState

# transformers 5.24 calls the cache `cache`; earlier releases `past_key_values`.
_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class BDHCache(Cache):
    """The decoding state of BDH for `generate`: one `BDHState`, whose size is constant.

    It has no per-layer key-value tensors, so transformers sees no layers; `state` is None until
    the first forward. Beam search reorders it (`reorder_cache`); it cannot be cropped (a state
    cannot forget tokens), so assisted decoding is not supported.
    """

    def __init__(self, state: BDHState | None = None) -> None:
        super().__init__(layers=[])
        self.state = state

    def __repr__(self) -> str:
        where = "empty" if self.state is None else f"{self.state.batch_size} streams"
        return f"BDHCache({where}, position {self.get_seq_length()})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far (the furthest stream when rows sit at different positions)."""
        return 0 if self.state is None else self.state.pos

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no maximum: the state does not grow with the context

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.select(beam_idx.cpu())

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.state is not None:
            self.state = self.state.select(torch.as_tensor(indices).cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch_size).repeat_interleave(repeats)
            self.state = self.state.select(rows)

    def reset(self) -> None:
        self.state = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("a BDH state cannot forget tokens, so the cache cannot be cropped")


class BDHPreTrainedModel(PreTrainedModel):
    config_class = BDHHFConfig
    base_model_prefix = "bdh"
    main_input_name = "input_ids"
    _no_split_modules = ["BDH"]  # noqa: RUF012
    _is_stateful = True  # generation cannot roll the state back (no assisted decoding)

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights read from a checkpoint are never re-initialised; new ones follow the reference.
        if isinstance(module, BDH):
            with torch.no_grad():
                module.reset_parameters()


class BDHForCausalLM(BDHPreTrainedModel, GenerationMixin):
    """BDH as a transformers causal language model: logits, loss, generate, Trainer, pipeline."""

    def __init__(self, config: BDHHFConfig) -> None:
        super().__init__(config)
        self.bdh = BDH(config.to_bdh())
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model._rebuild_derived_buffers()
        return loaded

    def _rebuild_derived_buffers(self) -> None:
        """Recompute the buffers that are not saved (they derive from the configuration).

        transformers builds the model without data and fills in what the checkpoint holds, so a
        non-persistent buffer (e.g. the damping λ_h) is left unset; a fresh module of the same
        class, built from the configuration, supplies its value.
        """
        config = self.config.to_bdh()
        for module in self.bdh.modules():
            names = [
                n for n in module._non_persistent_buffers_set if module._buffers[n] is not None
            ]
            if not names:
                continue
            fresh = type(module)(config)
            for name in names:
                module._buffers[name] = fresh._buffers[name].to(module._buffers[name].device)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a BDHCache, made in forward

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.bdh.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.bdh.embed = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        cache: BDHCache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        past_key_values: BDHCache | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of input_ids (B, T); with labels, transformers' shifted LM loss.

        With a cache, input_ids continue the streams it holds (an empty cache starts them).
        `attention_mask` (B, T) or, with a cache, (B, past + T): tokens marked 0 are not read.
        """
        if inputs_embeds is not None:
            raise ValueError("BDH reads token ids: inputs_embeds is not supported")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is None and use_cache:
            cache = BDHCache()
        if cache is not None and not isinstance(cache, BDHCache):
            raise TypeError(f"BDH decodes through a BDHCache, got {type(cache).__name__}")
        keep = _kept(attention_mask, input_ids.shape[1])
        if cache is None:
            logits = self._full(input_ids, keep)
        else:
            logits = self._continue(input_ids, keep, cache)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _full(self, idx: Tensor, keep: Tensor | None) -> Tensor:
        """The parallel forward pass; rows with masked tokens run alone on their kept tokens."""
        if keep is None:
            return self.bdh(idx)[0]
        logits = self._zeros(idx)
        whole = keep.all(dim=1)
        if bool(whole.any()):
            logits[whole] = self.bdh(idx[whole])[0]
        for b in (~whole).nonzero().flatten().tolist():
            if bool(keep[b].any()):
                logits[b, keep[b]] = self.bdh(idx[b : b + 1, keep[b]])[0][0]
        return logits

    def _continue(self, idx: Tensor, keep: Tensor | None, cache: BDHCache) -> Tensor:
        """Feed idx through the cache's state (started here when empty), advancing it."""
        if cache.state is None:
            cache.state = self.bdh.init_state(idx.shape[0])
        if keep is None or bool(keep.all()):
            return self.bdh.step(idx, cache.state)[0]
        # Rows with masked tokens: each continues its own state with its kept tokens only.
        logits, states = self._zeros(idx), []
        for b in range(idx.shape[0]):
            row = cache.state.select([b])
            if bool(keep[b].any()):
                logits[b, keep[b]] = self.bdh.step(idx[b : b + 1, keep[b]], row)[0][0]
            states.append(row)
        cache.state = BDHState.stack(states)
        return logits

    def _zeros(self, idx: Tensor) -> Tensor:
        V = self.config.vocab_size
        return torch.zeros(*idx.shape, V, dtype=self.bdh.lm_head.dtype, device=idx.device)


def _kept(attention_mask: Tensor | None, T: int) -> Tensor | None:
    """(B, T) bool of the tokens to read, or None when every token is read."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be (batch, length) 0/1, got shape {tuple(attention_mask.shape)}"
        )
    keep = attention_mask[:, -T:].bool()
    return None if bool(keep.all()) else keep
