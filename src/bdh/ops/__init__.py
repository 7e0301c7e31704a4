"""The linear attention of BDH-GPU (SPEC §3) in several exact forms with one signature.

    out, state = form(x, v, freqs=None, state=None, offset=0, damping=None, *, detach_kv=False, ...)

x (B, nh, T, N) are the sparse neurons *before* rotation (queries = keys = rope(x)),
v (B, 1|nh, T, D) the values, freqs (N,) the per-neuron rotary frequencies (None: no rotation),
state (B, nh, N, D) the carried state S (float32; None: zeros), offset the absolute position
of x[:, :, 0], damping (nh,) the per-head λ. out is (B, nh, T, D) and state the state after the
last token; the position after the call is offset + T.

- naive:     the token loop over an explicit state — the spec.
- parallel:  the masked T×T form — fastest for short T.
- chunked:   masked inside chunks, state across them — long T in bounded memory.
- recurrent: one token at a time — decoding.
"""

from bdh.ops.chunked import chunked
from bdh.ops.naive import naive
from bdh.ops.parallel import parallel
from bdh.ops.recurrent import recurrent
from bdh.ops.rope import cos_sin, frequencies, rope, rotate

FORMS = {"naive": naive, "parallel": parallel, "chunked": chunked, "recurrent": recurrent}

__all__ = [
    "FORMS",
    "chunked",
    "cos_sin",
    "frequencies",
    "naive",
    "parallel",
    "recurrent",
    "rope",
    "rotate",
]
