"""Decoding caches carried in the per-layer state (never on the module).

ESPnet's ``S4Decoder.batch_score`` splits every layer state per hypothesis with
``state[b].unsqueeze(0)`` and hands the first hypothesis' states back for the
whole beam on the next step, and ``S4Decoder.init_state`` calls
``default_state`` (None for us) at the start of every utterance. So a cache is
one batch-first tensor:

- cross-attention: ``(b, T2, 2D)``, the memory projected to keys then values,
  made on the first step of an utterance (``state=None``) and reused after;
- causal self-attention: ``(b, t, 2D)``, keys/values of the ``t`` previous
  positions, grown by one row per step.

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


def check_cross_state(state, memory, *, batch, n_feat, dtype):
    """Check that a cross-attention cache fits ``memory``.

    Args:
        state: the cache ``(b, T2, 2D)``.
        memory: ``(B, T2, D)``.
        batch: the query's batch size B.
        n_feat: D.
        dtype: dtype the projection of ``memory`` would have.

    Raises:
        TypeError: state is not a tensor.
        ValueError: its batch, length, width, dtype or device does not match.
    """
    if not isinstance(state, torch.Tensor):
        raise TypeError(
            f"state must be None or the (b, T2, 2*n_feat) tensor a previous step "
            f"returned, got {type(state).__name__}"
        )
    t2 = memory.size(1)
    problems = []
    if state.dim() != 3 or state.size(1) != t2 or state.size(2) != 2 * n_feat:
        problems.append(
            f"shape {_shape(state)} does not fit memory {_shape(memory)} "
            f"(expected (1 or {batch}, {t2}, {2 * n_feat}))"
        )
    elif state.size(0) not in (1, batch):
        problems.append(f"batch {state.size(0)} is neither 1 nor the query batch {batch}")
    if state.dtype != dtype:
        problems.append(f"dtype {state.dtype} != {dtype}")
    if state.device != memory.device:
        problems.append(f"device {state.device} != memory device {memory.device}")
    if problems:
        raise ValueError(
            "state does not belong to this memory: " + "; ".join(problems)
            + ". Pass state=None (default_state()) at the start of each utterance."
        )


def check_self_cache(state, *, batch, n_feat, dtype, device):
    """Check a causal self-attention cache ``(b, t, 2D)``.

    Raises:
        TypeError: state is not a tensor.
        ValueError: its shape, batch, dtype or device does not match the query.
    """
    if not isinstance(state, torch.Tensor):
        raise TypeError(
            f"state must be None or the (b, t, 2*n_feat) cache a previous step "
            f"returned, got {type(state).__name__}"
        )
    problems = []
    if state.dim() != 3 or state.size(2) != 2 * n_feat:
        problems.append(f"shape {_shape(state)} is not (b, t, {2 * n_feat})")
    elif state.size(0) not in (1, batch):
        problems.append(f"batch {state.size(0)} is neither 1 nor the query batch {batch}")
    if state.dtype != dtype:
        problems.append(f"dtype {state.dtype} != {dtype}")
    if state.device != device:
        problems.append(f"device {state.device} != query device {device}")
    if problems:
        raise ValueError("state is not a self-attention cache for this query: " + "; ".join(problems))


def batch_state(kv, batch):
    """The state a step returns: ``kv`` with the query's batch size (a view if shared)."""
    return kv if kv.size(0) == batch else kv.expand(batch, -1, -1)
