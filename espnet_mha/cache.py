"""Decoding caches carried in the per-layer state (never on the module).

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

A cross-attention state is reused only for the memory it was projected from.
The stock layer attends to whatever memory a step gets, and ESPnet's streaming
search (``BatchBeamSearchOnline``) keeps the decoder states while the encoder
output grows block by block (or slides, with ``encoded_feat_length_limit``).
So a state that is well formed but was made from another memory is
*recomputed* from the memory given (the layer's ``last_cache`` says so):

- its length, dtype or device differs from the memory's;
- the layer made it from a different memory: each layer remembers, per cache
  storage, :func:`memory_key` of the memory it projected (where the rows live,
  their strides, the in-place write counter), for up to 64 caches (then it
  starts over). Only integers, no tensors: this can force a
  recomputation, never change a result;
- it has batch 1 and the memory holds B > 1 distinct items (not stride 0).

A malformed state (not a tensor, wrong rank, heads, head size, or a batch that
is neither 1 nor the query's) raises ``TypeError``/``ValueError``. A state the
layer did not make itself (a copy, a loaded one) and another memory of the same
shape at the same address (memory freed and reused) cannot be told apart from
the right one: start each utterance with ``default_state()`` (``state=None``),
as ESPnet does.
"""

import torch

# Per layer: the memory keys of up to this many caches are remembered (then forgotten at once).
MAX_SOURCES = 64


def _shape(x):
    return tuple(x.shape)


def _check_cache(state, what, *, batch, n_head, d_k, dtype=None, device=None, device_name=""):
    """Raise unless ``state`` is a ``(1 or batch, 2, n_head, t, d_k)`` tensor (and, where
    given, of ``dtype`` on ``device``)."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(
            f"state must be None or the (b, 2, n_head, T, d_k) cache a previous step returned, "
            f"got {type(state).__name__}"
        )
    problems = []
    if state.dim() != 5 or state.size(1) != 2 or state.size(2) != n_head or state.size(4) != d_k:
        problems.append(f"shape {_shape(state)} is not (1 or {batch}, 2, {n_head}, t, {d_k})")
    elif state.size(0) not in (1, batch):
        problems.append(f"batch {state.size(0)} is neither 1 nor the query batch {batch}")
    if dtype is not None and state.dtype != dtype:
        problems.append(f"dtype {state.dtype} != {dtype}")
    if device is not None and state.device != device:
        problems.append(f"device {state.device} != {device_name} {device}")
    if problems:
        raise ValueError(f"state {what}: " + "; ".join(problems))


def memory_key(memory):
    """What tells apart memories ``(B, T2, D)`` of the same shape, dtype and device: the
    address, the strides and the in-place write counter. The batch stride counts only
    for B > 1 distinct items (batch 1 and stride 0 both mean one memory shared by the
    batch, as ``BatchBeamSearch`` passes it), so the key's second entry is nonzero
    exactly for distinct items. About 0.5 us: it runs on every decoding step."""
    s0, s1, s2 = memory.stride()
    try:
        version = memory._version
    except RuntimeError:  # inference tensors have no counter
        version = -1
    return (memory.data_ptr(), 0 if memory.size(0) == 1 else s0, s1, s2, version)


def batch1_meets_distinct(state, key):
    """Whether a batch-1 ``state`` arrives with B > 1 distinct memories (``key`` is their
    :func:`memory_key`): one item's keys cannot serve them all."""
    return state.size(0) == 1 and key[1] != 0


def source_slot(state):
    """The key under which a layer remembers a cache's memory: its storage (views share it)."""
    return state.untyped_storage().data_ptr()


def stale_reason(state, memory, source, *, batch, n_head, dtype):
    """Check a cross-attention state ``(b, 2, H, T2, d_k)`` against ``memory``.

    Args:
        state: the state a previous step returned.
        memory: ``(B, T2, D)``.
        source: :func:`memory_key` of the memory the layer made ``state`` from, or None if unknown.
        batch: the query's batch size B.
        n_head: H.
        dtype: dtype the projection of ``memory`` would have.

    Returns:
        "" if ``state`` is the cache of ``memory``, else why not (it is then recomputed).

    Raises:
        TypeError: state is not a tensor.
        ValueError: state is malformed: its rank, heads, head size or batch does not fit.
    """
    _check_cache(state, "is not a cross-attention cache for this query", batch=batch, n_head=n_head,
                 d_k=memory.size(2) // n_head)
    if state.size(3) != memory.size(1):
        return f"state length {state.size(3)} != memory length {memory.size(1)}"
    if state.dtype != dtype or state.device != memory.device:
        return f"state {state.dtype} on {state.device} != memory {dtype} on {memory.device}"
    key = memory_key(memory)
    if batch1_meets_distinct(state, key):
        return f"a batch-1 state cannot serve {memory.size(0)} distinct memories"
    if source is not None and source != key:
        return "the state was made from another memory"
    return ""


def check_self_cache(state, *, batch, n_head, d_k, dtype, device):
    """Check a causal self-attention cache ``(b, 2, H, t, d_k)``.

    Raises:
        TypeError: state is not a tensor.
        ValueError: its shape, batch, dtype or device does not match the query.
    """
    _check_cache(state, "is not a self-attention cache for this query", batch=batch,
                 n_head=n_head, d_k=d_k, dtype=dtype, device=device, device_name="query device")


def batch_state(kv, batch):
    """The state a step returns: ``kv`` with the query's batch size (a view if shared)."""
    return kv if kv.size(0) == batch else kv.expand(batch, -1, -1, -1, -1)
