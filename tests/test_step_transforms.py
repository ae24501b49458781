"""Steps under torch.func transforms, forward-mode AD, torch.compile and tensor subclasses, as the stock step."""

import pytest
import torch

from cache_cases import FP64, seq
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


def test_torch_func_transforms_over_a_step_match_stock():
    """vmap and grad over step: their tensors have no address for the cache's records
    (it raised "Cannot access data pointer"); the step then computes as the stock one."""
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(4, 7, 16), seq(4, 16, seed=1)

    def one(layer):
        return lambda q, m: layer.step(q[None], None, memory=m[None])[0][0]

    torch.testing.assert_close(torch.func.vmap(one(ours))(query, memory), torch.func.vmap(one(stock))(query, memory),
                               **FP64)
    grad = [torch.func.grad(lambda m, layer=layer: layer.step(query, None, memory=m)[0].sum())(memory)
            for layer in (ours, stock)]
    torch.testing.assert_close(grad[0], grad[1], **FP64)


def test_forward_mode_ad_gets_the_stock_step_and_the_math_path():
    """A dual memory has its primal's address and write counter: a cache of the primal
    (or of another tangent) lost or misstated the tangent. Under a dual level the step is
    the stock step, and ``auto`` takes the math path (SDPA has no forward derivative)."""
    import torch.autograd.forward_ad as fwad

    stock, ours = stock_and_flash(16, 4)
    query, memory = seq(2, 16), seq(2, 5, 16, seed=1)
    _, state = ours.step(query, None, memory=memory)
    for seed in (2, 3):
        with fwad.dual_level():
            dual = fwad.make_dual(memory, seq(2, 5, 16, seed=seed))
            got, new_state = ours.step(query, state, memory=dual)
            expected, _ = stock.step(query, None, memory=dual)
            assert ours.last_cache is None and new_state is state
            assert ours.last_backend == "math" and "forward-mode AD" in ours.last_fallback
            torch.testing.assert_close(fwad.unpack_dual(got).tangent, fwad.unpack_dual(expected).tangent, **FP64)
            torch.testing.assert_close(got, expected, **FP64)
    tangent = seq(2, 5, 16, seed=4)
    got = torch.func.jvp(lambda m: ours(query.unsqueeze(1), m)[0], (memory,), (tangent,))[1]
    expected = torch.func.jvp(lambda m: stock(query.unsqueeze(1), m)[0], (memory,), (tangent,))[1]
    torch.testing.assert_close(got, expected, **FP64)


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"),
                    reason="torch < 2.7 cannot tell torch.export from torch.compile: both get the stock step")
def test_a_step_compiled_by_the_user_checks_where_its_state_came_from():
    """torch.compile around the layer's step (as a user compiling the decoder's batch_score
    does): a state made from one memory, given with another of the same length (a
    streaming window that slid), is recomputed as in eager. The check was skipped while
    tracing, so the compiled step silently reused the old keys."""
    torch._dynamo.reset()
    stock, ours = stock_and_flash(16, 2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randn(1, 6, 16, generator=gen), torch.randn(1, 6, 16, generator=gen)
    query = torch.randn(3, 16, generator=gen)
    step = torch.compile(ours.step, backend="eager")
    with torch.no_grad():
        _, state = step(query[:1], None, memory=first)
        for memory, cache_use in ((second, "recomputed: the state was made from another memory"), (second, "reused")):
            got, state = step(query, state[:1], memory=memory.expand(3, -1, -1))
            torch.testing.assert_close(got, stock.step(query, None, memory=memory.expand(3, -1, -1))[0],
                                       rtol=1e-5, atol=1e-5)
            assert ours.last_cache == cache_use


def test_a_wrapper_subclass_memory_gets_the_stock_step():
    """A tensor subclass without a storage of its own (TwoTensor) has nothing for the
    cache's records (it raised "invalid python storage"): the stock step serves it."""
    from torch.testing._internal.two_tensor import TwoTensor

    stock, ours = stock_and_flash(16, 4)
    a, query = seq(2, 7, 16), seq(2, 16, seed=1)
    memory = TwoTensor(a, a.clone())
    with torch.no_grad():
        got, state = ours.step(query, None, memory=memory)
        torch.testing.assert_close(got.a, stock.step(query, None, memory=a)[0], **FP64)
    assert state is None and ours.last_cache is None
