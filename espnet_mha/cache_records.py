"""What a layer records about each decoding cache it made, and the check that a
cache handed back to it still holds the keys of the memory and weights it is used with
(the reuse rules are listed in :mod:`espnet_mha.cache`).

Per cache storage, a layer keeps :func:`record`: the memory's address, strides and
in-place write counter, and the address and write counter of the projection's
weight and bias (and, for projections the layer calls as modules, the write counters
of their buffers, and their hooks and plain attributes), and the number of optimizer
steps taken in the process, each with a weak reference to its storage (so a new
memory or new weights allocated where freed ones were do not match), a weak
reference to the cache's own storage, and the fp32 matmul precision
(``torch.set_float32_matmul_precision``). No tensor is kept alive.
"""

import weakref

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from espnet_mha import checks
from espnet_mha.cache import write_counter


# StorageWeakRef.expired() without its Python frame: every decoding step checks three.
_expired = torch.UntypedStorage._expired

# Per layer: the records of up to this many caches are kept (then forgotten at once; a
# forgotten cache is recomputed on its next step).
MAX_SOURCES = 1024


# Steps of any torch.optim optimizer in this process. Fused ones (Adam(fused=True), SGD...) and
# optimizers that write through ``.data`` update the weights without moving their write
# counters, so the weights keys hold this count too: a cache made before an optimizer step
# is recomputed after it (a reused one was 1.4 off after Adam(fused=True) on CPU, torch 2.11).
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs):
    _optimizer_steps[0] += 1


_OPTIMIZER_HOOK = register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps():
    """How many optimizer steps this process has taken (part of every weights key)."""
    return _optimizer_steps[0]


def storage_ref(tensor):
    """A weak reference to the storage holding ``tensor``'s elements: ``expired()`` once that
    storage is freed, ``cdata`` its identity while it is not. Shared by every view
    (``BatchBeamSearch`` passes ``x.expand(...)``, a new view of the same encoder output
    every step), also of inference tensors, whose views have no ``_base``; and it tells a
    freed tensor from a new one allocated at the same address, which its address and
    write counter cannot (``param.data = ...`` and ``.half()``/``.float()`` round trips
    free the old weights without a write)."""
    return StorageWeakRef(tensor.untyped_storage())


def weights_key(weight, bias):
    """Addresses, strides and write counters of a plain ``nn.Linear``'s weight and bias (the
    fused projection, or the stock ``linear_k``/``linear_v``; modules the layer calls:
    :func:`espnet_mha.module_keys.modules_key`)."""
    return (weight.data_ptr(), weight.stride(), write_counter(weight), bias.data_ptr(), write_counter(bias),
            _optimizer_steps[0])


def grad_flags(memory, weight_tensors):
    """What a cache made now would carry an autograd graph to, with gradients on (None with
    them off): the ``requires_grad`` flags of the memory and the projection weights, and
    the tensors themselves (the memory's base for a view: ``BatchBeamSearch`` passes a new
    ``expand`` of the encoder output every step). A ``detach().requires_grad_()`` copy has
    the flags, address and write counter of the original, but the graph reaches only the
    original."""
    if not torch.is_grad_enabled():
        return None
    base = memory._base
    # A view made under no_grad that requires grad has no grad_fn: a leaf of its own, which
    # the step's memory gradient reaches instead of its base.
    reached = memory if base is None or (memory.requires_grad and memory.grad_fn is None) else base
    return (memory.requires_grad, *(t.requires_grad for t in weight_tensors)), (reached, *weight_tensors)


def record(memory, key, weights, kv, weight_tensors, previous=None):
    """What a layer keeps about a cache ``kv`` it made or reused: ``key`` (:func:`memory_key`
    of the memory), a :func:`storage_ref` of the memory (so a freed memory never matches a
    new one allocated at the same address), the projection's ``weights`` key with a
    :func:`storage_ref` of each of its ``weight_tensors`` (the same for new weights at a
    freed one's address), the cache's own write counter (shared by every view of it, such
    as the states ``BatchBeamSearch`` splits off: an in-place change to a state is seen),
    its :func:`grad_flags` with the :func:`_identities` of the tensors its graph reaches (none if
    it was made without gradients, those of ``previous`` (its record before) if it is
    reused without gradients: it keeps the graph it had), and a :func:`storage_ref` and
    the :func:`view_of` of the cache itself (so a tensor allocated where a freed cache
    was, or a view of other items of a cache, is not taken for it), the memory's
    :func:`counter_owner`, and the :func:`checks.matmul_precision` the keys were projected at."""
    grads = grad_flags(memory, weight_tensors)
    if grads is not None:
        flags, reached = grads[0], _identities(grads[1])
    elif previous is not None:
        flags, reached = previous[5], previous[6]
    else:
        flags, reached = (False,) * (1 + len(weight_tensors)), ()
    return (key, storage_ref(memory), weights, write_counter(kv), tuple(storage_ref(t) for t in weight_tensors),
            flags, reached, storage_ref(kv), view_of(kv), counter_owner(memory), checks.matmul_precision())


def _identities(reached):
    """Who the tensors of :func:`grad_flags` are, keeping none alive: the memory (or its
    base) by a weak reference, the projection's weights by ``id``. Not weak references to
    the weights: ``torch.utils.swap_tensors`` refuses a weakly referenced tensor, and
    parametrizations and ``load_state_dict(assign=True)`` under
    ``torch.__future__.set_swap_module_params_on_conversion(True)`` swap parameters
    outside ``Module._apply``, where the layer forgets its records. An ``id`` cannot name
    two live tensors, and a freed weight is told by its storage reference (the weights'
    in :func:`record`) before :func:`_same_tensors` is asked."""
    return (weakref.ref(reached[0]), *map(id, reached[1:]))


def _same_tensors(kept, reached):
    """Whether :func:`_identities` ``kept`` names the tensors ``reached``."""
    return len(kept) == len(reached) and kept[0]() is reached[0] and kept[1:] == tuple(map(id, reached[1:]))


def _counter_tensor(memory):
    """The tensor whose write counter ``memory`` reads: its base for a view, else itself."""
    base = memory._base
    return memory if base is None else base


def counter_owner(memory):
    """A weak reference to the tensor whose write counter ``memory`` reads (its base for a
    view; ``BatchBeamSearch`` passes a new ``expand`` of the encoder output every step), or
    None for an inference tensor, which has no counter. Another tensor over the same
    storage (``.data``, ``set_``, a ``torch.multiprocessing`` queue's rebuild in the same
    process, a new ``detach()``) has a counter of its own, which may read the same after
    a write through the original."""
    return None if memory.is_inference() else weakref.ref(_counter_tensor(memory))


def view_of(kv):
    """Where a cache ``(b, 2, H, T2, d_k)`` starts in its storage and how it steps through it."""
    return kv.data_ptr(), kv.stride(), kv.size(0)


def _views_the_cache(view, state):
    """Whether ``state`` reads the elements of the cache whose :func:`view_of` is ``view``,
    each item as the cache's item (or, for a cache of batch 1, its one item for all): the
    cache itself, the states ``BatchBeamSearch`` splits off (``state[b].unsqueeze(0)``)
    and the expanded state a step returns. Any other view is recomputed."""
    ptr, strides, batch = view
    given = state.stride()
    if state.data_ptr() != ptr or given[1:] != strides[1:]:
        return False
    shared = batch == 1 or strides[0] == 0  # one item for the whole batch
    return state.size(0) == 1 or (shared and given[0] == 0) or (state.size(0) == batch and given[0] == strides[0])


def provenance_problem(sources, state, key, memory, weights, grads=None):
    """Why the cache ``state`` cannot serve ``memory`` (whose :func:`memory_key` is ``key``)
    with the projection's current ``weights`` key and, with gradients on, the current
    :func:`grad_flags` ``grads``, by the layer's ``sources`` (its :func:`record` per
    :func:`source_slot`); "" if it can."""
    storage = state.untyped_storage()
    kept = sources.get(storage.data_ptr())  # source_slot(state)
    if kept is None:
        return "this layer has no record of the state (not made by it, or forgotten)"
    own = kept[7]
    if _expired(own.cdata) or own.cdata != storage._cdata:
        # The cache that record is about was freed; this tensor was allocated where it was.
        return "this layer has no record of the state (not made by it, or forgotten)"
    if not _views_the_cache(kept[8], state):
        return "the state is a view of other items of the cache this layer made"
    # The storage itself (not only its address): two tensors over one numpy buffer share
    # an address but not a storage, and a rewrite of the buffer moves neither write counter.
    memory_ref = kept[1]
    if kept[0] != key or _expired(memory_ref.cdata) or memory_ref.cdata != memory.untyped_storage()._cdata:
        return "the state was made from another memory"
    owner = kept[9]
    if owner is not None and owner() is not _counter_tensor(memory):
        # An alias of the memory or a new detach(): its counter cannot vouch for the keys.
        return "the memory is another tensor over the storage the state was made from (its writes are not seen)"
    if kept[2] != weights:
        return "the key/value weights changed since the state was made"
    for ref in kept[4]:
        if _expired(ref.cdata):
            return "the key/value weights changed since the state was made"
    if kept[3] != write_counter(state):
        return "the state was changed in place since it was made"
    if kept[10] != checks.matmul_precision():
        return "the fp32 matmul precision (torch.set_float32_matmul_precision) changed since the state was made"
    if grads is not None:
        # Made without gradients, or its graph reaches other tensors than those that need
        # gradients now (memory.detach(), frozen or swapped weights): other gradients than
        # the stock step's.
        flags, reached = grads
        if any(flags) and _graph_ends_at_a_leaf(state):
            # Detached (state.detach(), the habit after a backward through the steps),
            # returned by a step without gradients, or a view of either (the state
            # BatchBeamSearch splits off such a state): its keys would give the memory and
            # the key/value weights no gradient (0.4-4.7 off against the stock step's).
            return "the state carries no graph, and the memory or the key/value weights need gradients"
        if kept[5] != flags or (any(flags) and not _same_tensors(kept[6], reached)):
            return "the state's graph does not reach the memory and weights that now need gradients"
    return ""


def _graph_ends_at_a_leaf(state):
    """Whether the autograd graph of ``state`` reaches no projection: it has none, or it runs
    through single-input nodes (views such as ``state[b].unsqueeze(0)``, made with gradients
    on) to a leaf, a tensor made without gradients or detached. A cache's graph ends at the
    GEMM that projected it, whose node has an input per operand."""
    fn = state.grad_fn
    while fn is not None and len(fn.next_functions) == 1:
        fn = fn.next_functions[0][0]
    return fn is None or not fn.next_functions


def source_slot(state):
    """The key under which a layer remembers a cache's memory: its storage (views share it)."""
    return state.untyped_storage().data_ptr()
