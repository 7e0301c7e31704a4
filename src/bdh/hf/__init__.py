"""BDH in the Hugging Face `transformers` ecosystem (the optional extra `hf`).

`import bdh.hf` registers the model with `AutoConfig` and `AutoModelForCausalLM` (model type
"bdh"); exported folders also carry their own loading code for `trust_remote_code=True`.

    bdh export hf --ckpt runs/bdh --out hf/bdh      # our checkpoint → a transformers folder
    bdh import hf hf/bdh --out runs/bdh-back         # and back, with identical weights
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("bdh.hf needs the `transformers` package: pip install 'bdh[hf]'") from e

from transformers import AutoConfig, AutoModelForCausalLM

from bdh.hf.configuration import BDHHFConfig
from bdh.hf.modeling import BDHCache, BDHForCausalLM, BDHPreTrainedModel

AutoConfig.register(BDHHFConfig.model_type, BDHHFConfig, exist_ok=True)
AutoModelForCausalLM.register(BDHHFConfig, BDHForCausalLM, exist_ok=True)

__all__ = ["BDHCache", "BDHForCausalLM", "BDHHFConfig", "BDHPreTrainedModel"]
