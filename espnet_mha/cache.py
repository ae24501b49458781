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
closed ESPnet PR #6624). A state that cannot belong to the memory it arrives
with raises ``ValueError``; it is never silently reused or recomputed. A state
made from another memory of identical shape, dtype and device cannot be told
apart: start each utterance with ``default_state()`` (``state=None``).
"""

import torch


def _shape(x):
    return tuple(x.shape)


def _check_cache(state, what, *, length, batch, n_head, d_k, dtype, device, device_name):
    if not isinstance(state, torch.Tensor):
        raise TypeError(
            f"state must be None or the (b, 2, n_head, T, d_k) cache a previous step returned, "
            f"got {type(state).__name__}"
        )
    expected = (2, n_head, length if length is not None else "t", d_k)
    problems = []
    if (state.dim() != 5 or state.size(1) != 2 or state.size(2) != n_head or state.size(4) != d_k
            or (length is not None and state.size(3) != length)):
        problems.append(f"shape {_shape(state)} is not (1 or {batch}, {', '.join(map(str, expected))})")
    elif state.size(0) not in (1, batch):
        problems.append(f"batch {state.size(0)} is neither 1 nor the query batch {batch}")
    if state.dtype != dtype:
        problems.append(f"dtype {state.dtype} != {dtype}")
    if state.device != device:
        problems.append(f"device {state.device} != {device_name} {device}")
    if problems:
        what = what() if callable(what) else what
        raise ValueError(f"state {what}: " + "; ".join(problems) + (
            ". Pass state=None (default_state()) at the start of each utterance." if length is not None else ""))


def check_cross_state(state, memory, *, batch, n_head, dtype):
    """Check that a cross-attention cache ``(b, 2, H, T2, d_k)`` fits ``memory``.

    Args:
        state: the cache.
        memory: ``(B, T2, D)``.
        batch: the query's batch size B.
        n_head: H.
        dtype: dtype the projection of ``memory`` would have.

    Raises:
        TypeError: state is not a tensor.
        ValueError: its batch, length, heads, head size, dtype or device does not match.
    """
    _check_cache(state, lambda: f"does not belong to this memory {_shape(memory)}", length=memory.size(1), batch=batch,
                 n_head=n_head, d_k=memory.size(2) // n_head, dtype=dtype, device=memory.device,
                 device_name="memory device")


def check_self_cache(state, *, batch, n_head, d_k, dtype, device):
    """Check a causal self-attention cache ``(b, 2, H, t, d_k)``.

    Raises:
        TypeError: state is not a tensor.
        ValueError: its shape, batch, dtype or device does not match the query.
    """
    _check_cache(state, "is not a self-attention cache for this query", length=None, batch=batch,
                 n_head=n_head, d_k=d_k, dtype=dtype, device=device, device_name="query device")


def batch_state(kv, batch):
    """The state a step returns: ``kv`` with the query's batch size (a view if shared)."""
    return kv if kv.size(0) == batch else kv.expand(batch, -1, -1, -1, -1)
