"""Decoding caches carried in the per-layer state (never on the module), and the
rules for reusing one.

ESPnet's ``S4Decoder.batch_score`` splits every layer state per hypothesis with
``state[b].unsqueeze(0)`` and hands the first hypothesis' states back for the
whole beam on the next step, and ``S4Decoder.init_state`` calls
``default_state`` (None for us) at the start of every utterance. So a cache is
one batch-first tensor, keys and values heads-first (the layout attention
reads without a copy):

- cross-attention: ``(b, 2, H, T2, d_k)``, the memory projected to keys and
  values, made on the first step of an utterance (``state=None``) and reused;
- causal self-attention: ``(b, 2, H, t, d_k)``, keys/values of the ``t``
  previous positions, grown by one position per step.

``b`` is 1 (shared by the whole beam, served without copying) or the query's
batch size. A step returns a state with the query's batch size (an expanded
view when ``b = 1``). Because the cache lives in the state, a new utterance,
``load_state_dict`` or a new model never see a stale one (the bug class of the
closed ESPnet PR #6624).

A cross-attention state is reused only for the memory and the weights it was
projected from. The stock layer attends to whatever memory a step gets with
whatever weights it has, and ESPnet's streaming search
(``BatchBeamSearchOnline``) keeps the decoder states while the encoder output
grows block by block (or slides, with ``encoded_feat_length_limit``). So a
state that is well formed but cannot be shown to hold this memory's keys with
these weights is *recomputed* from the memory given (the layer's
``last_cache`` says why). Checked here (:func:`stale_reason`):

- its length, dtype or device differs from the memory's;
- its batch is neither 1 nor the query's (a batch of utterances decoded together
  that dropped or added some, handing back the last state: the stock step ignores it);
- it has batch 1 and the memory holds B > 1 distinct items (not stride 0);
- it was made under ``torch.inference_mode`` and the step records gradients.

Checked against what the layer recorded when it made the cache
(:mod:`espnet_mha.cache_records`, which lists what a record holds):

- gradients are on, and it carries no graph (detached, made without gradients, or a
  view of such a tensor) or its graph does not reach the memory and weights that now
  need gradients (a memory view made under ``no_grad`` is a leaf of its own);
- the layer has no record of it (a copy, another layer's, a loaded one, a
  tensor allocated where a freed cache was, or forgotten: each layer keeps
  records of up to 1024 caches, then starts over, and forgets them all when
  its parameters are moved or cast, or a state dict is loaded into it);
- it is a view of other items of a cache (any view but the cache itself, the
  states ``BatchBeamSearch`` splits off and the expanded state a step returns);
- the memory is another tensor over the storage it was made from (an alias: ``.data``,
  ``set_``, a queue's rebuild, a new ``detach()``), whose write counter is its own;
- its record names another memory or other weights, the cache was written in
  place, or the fp32 matmul precision changed.

No tensor is kept alive by a record: this can force a recomputation, never change a result.

A malformed state (not a tensor, wrong rank, heads or head size) raises
``TypeError``/``ValueError``; so does a causal self-attention cache whose batch
is neither 1 nor the query's (its history cannot be recomputed). What cannot
be seen: writes into the memory or the weights that bypass the write counter
(through ``.data`` or ``untyped_storage()``, from numpy, from another process
through shared memory or ``torch.distributed``, or on tensors made under
``torch.inference_mode``, which have no counter). And after a backward through
a step, the state's graph is freed as for any tensor: the next step with
gradients needs ``retain_graph=True`` on that backward, or ``state=None``.
Start each utterance with ``default_state()`` (``state=None``), as ESPnet
does.
"""

import torch

from espnet_mha import checks


def memory_key(memory):
    """What tells apart memories ``(B, T2, D)`` of the same shape, dtype and device: the
    address, the strides and the in-place write counter. The batch stride counts only
    for B > 1 distinct items (batch 1 and stride 0 both mean one memory shared by the
    batch, as ``BatchBeamSearch`` passes it), so the key's second entry is nonzero
    exactly for distinct items. The negative bit too: ``z.conj().imag`` (or
    ``torch._neg_view``) reads the storage of ``z.imag`` negated, at the same address with
    the same strides and counter (an audit found its cache reused). About 0.5 us: it runs
    on every decoding step."""
    s0, s1, s2 = memory.stride()
    return (memory.data_ptr(), 0 if memory.size(0) == 1 else s0, s1, s2, write_counter(memory), memory.is_neg())


def write_counter(tensor):
    """``tensor._version``, the in-place write counter its views share; -1 for an
    inference tensor, which has none."""
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no counter
        return -1


def batch1_meets_distinct(state, key):
    """Whether a batch-1 ``state`` arrives with B > 1 distinct memories (``key`` is their
    :func:`memory_key`): one item's keys cannot serve them all."""
    return state.size(0) == 1 and key[1] != 0


def stale_reason(state, memory, key, *, batch, n_head, dtype):
    """Check a cross-attention state ``(b, 2, H, T2, d_k)`` against ``memory`` (where it
    came from is checked by :func:`espnet_mha.cache_records.provenance_problem`).

    Args:
        state: the state a previous step returned.
        memory: ``(B, T2, D)``.
        key: :func:`memory_key` of ``memory``.
        batch: the query's batch size B.
        n_head: H.
        dtype: dtype the projection of ``memory`` would have.

    Returns:
        "" if ``state`` is the cache of ``memory``, else why not (it is then recomputed).

    Raises:
        TypeError: state is not a tensor.
        ValueError: state is malformed: its rank, heads or head size does not fit.
    """
    checks.check_cache(state, "is not a cross-attention cache for this query", batch=None, n_head=n_head,
                       d_k=memory.size(2) // n_head)
    if state.size(0) != 1 and state.size(0) != batch:
        return f"state batch {state.size(0)} is neither 1 nor the query batch {batch}"
    if state.size(3) != memory.size(1):
        return f"state length {state.size(3)} != memory length {memory.size(1)}"
    if state.dtype != dtype or state.device != memory.device:
        return f"state {state.dtype} on {state.device} != memory {dtype} on {memory.device}"
    if batch1_meets_distinct(state, key):
        return f"a batch-1 state cannot serve {memory.size(0)} distinct memories"
    if state.is_inference() and torch.is_grad_enabled():
        return "a state made under torch.inference_mode cannot be saved for backward"
    return ""


def own_batch(state, batch):
    """``state[:1]`` for a cache expanded with stride 0 over another number of hypotheses
    than ``batch`` (a search that shrank or grew its beam and handed back the state a step
    returned: it is its batch-1 self, as the stock step passes any state), else ``state``."""
    if type(state) is torch.Tensor and state.dim() == 5 and state.size(0) != 1 and state.size(0) != batch \
            and state.stride(0) == 0:
        return state[:1]
    return state


def batch_state(kv, batch):
    """The state a step returns: ``kv`` with the query's batch size (a view if shared)."""
    return kv if kv.size(0) == batch else kv.expand(batch, -1, -1, -1, -1)
