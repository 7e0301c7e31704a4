"""The decoding state of BDH-GPU: per layer and head, the Hebbian state S (ρ transposed).

Its size is constant in the context length: L · B · nh · N · D floats, kept in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


@dataclass
class BDHState:
    """S for every layer, (B, nh, N, D) each, and the absolute position of the next token."""

    layers: list[Tensor] = field(default_factory=list)
    pos: int = 0

    @classmethod
    def zeros(
        cls,
        n_layer: int,
        batch_size: int,
        n_head: int,
        N: int,
        D: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> BDHState:
        shape = (batch_size, n_head, N, D)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)], 0)

    @property
    def batch_size(self) -> int:
        return self.layers[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (independent of how many tokens were read)."""
        return sum(S.numel() * S.element_size() for S in self.layers)

    def clone(self) -> BDHState:
        """An independent copy, e.g. to branch two continuations from one prefix."""
        return BDHState([S.clone() for S in self.layers], self.pos)

    def detach(self) -> BDHState:
        """The same values cut from the autograd graph (truncated BPTT at batch boundaries)."""
        return BDHState([S.detach() for S in self.layers], self.pos)

    def to(self, device: torch.device | str) -> BDHState:
        return BDHState([S.to(device) for S in self.layers], self.pos)

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file (position in its metadata)."""
        tensors = {f"layer.{i}": S.detach().contiguous() for i, S in enumerate(self.layers)}
        save_file(tensors, str(path), metadata={"bdh_state": json.dumps({"pos": self.pos})})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> BDHState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("bdh_state", "{}"))
        tensors = load_file(str(path), device=str(device))
        layers = [tensors[f"layer.{i}"] for i in range(len(tensors))]
        return cls(layers, int(meta.get("pos", 0)))
