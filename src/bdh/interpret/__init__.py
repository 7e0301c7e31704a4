"""Looking inside BDH: named activation points, hooks on them, and caches of them.

    logits, cache = model.run_with_cache(idx)         # cache["x", 0], cache["layers.0.v"], ...
    logits = model.run_with_hooks(idx, hooks=[("layers.1.x", ablate)])
    with bdh.interpret.hooks(model, [...]): ...        # also model.step and model.generate
    with bdh.interpret.capture(model, ["layers.0.y"]) as cache: ...  # every call, joined along T
    sigma = bdh.interpret.synapses(model, idx, layer=1, head=0, pairs=[(i, j)])  # σ (Eq. 16)
    stats = bdh.interpret.measure_sparsity(model, tokens, block_size=64)  # firing, O(n·L)
    bdh.interpret.view(model, tokenizer, "text").save("report.html")  # the viewer page

The names and their shapes: the module `bdh.interpret.hooks` and the README. Observers change
nothing the model computes unless a hook returns a replacement.
"""

from bdh.interpret.concepts import (
    SearchResult,
    SeparationTest,
    Synapse,
    find_concept_synapses,
    separation,
    test_synapse,
)
from bdh.interpret.hooks import (
    ActivationCache,
    Names,
    capture,
    check_name,
    hook_names,
    hooks,
    run_with_cache,
    run_with_hooks,
    select_names,
)
from bdh.interpret.sparsity import SparsityStats, measure_sparsity
from bdh.interpret.synapses import synapse_matrices, synapse_trajectories, synapses
from bdh.interpret.view import ViewPage, view

__all__ = [
    "ActivationCache",
    "Names",
    "SearchResult",
    "SeparationTest",
    "SparsityStats",
    "Synapse",
    "ViewPage",
    "capture",
    "check_name",
    "find_concept_synapses",
    "hook_names",
    "hooks",
    "measure_sparsity",
    "run_with_cache",
    "run_with_hooks",
    "select_names",
    "separation",
    "synapse_matrices",
    "synapse_trajectories",
    "synapses",
    "test_synapse",
    "view",
]
