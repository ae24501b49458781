"""A state follows the weights: changed, reallocated, swapped or optimized weights and the matmul precision."""

import copy

import pytest
import torch
import torch.nn.utils.parametrize

from cache_cases import FP64, StepOf, kv_weight_name, seq
from espnet_mha.checkpoint import to_stock
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")


def qkv_parameters(layer):
    """Our layer's q/k/v parameters: the fused ones, or the stock linear_q/k/v's."""
    return [p for name, p in layer.named_parameters() if not name.startswith("linear_out")]


def test_a_state_is_recomputed_when_the_weights_change_within_an_utterance():
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 7, 16).expand(3, -1, -1), seq(3, 16, seed=1)
    with torch.no_grad():
        _, state = ours.step(query, None, memory=memory)
        for _ in range(2):  # the second step takes the remembered signature
            _, state = ours.step(query, state[:1], memory=memory)
        for p in stock.parameters():
            p.add_(0.1)
        ours.load_state_dict(stock.state_dict())  # in place
        for _ in range(2):
            got, state = ours.step(query, state[:1], memory=memory)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
        assert ours.last_cache == "reused"  # the recomputed state is kept again


@pytest.mark.parametrize("change", ["data_assignment", "dtype_round_trip"])
def test_a_state_is_recomputed_when_new_weights_land_where_the_old_ones_were(change):
    """``param.data = ...`` and ``.half().float()`` free the old weights without a write, and
    the allocator often hands their address to the new ones (the write counters match
    too): the record's storage reference tells them apart (reused before: up to 0.97 off)."""
    stock, ours = stock_and_flash(64, 4, dtype=torch.float32)
    memory, query = seq(1, 9, 64, dtype=torch.float32).expand(3, -1, -1), seq(3, 64, seed=1, dtype=torch.float32)
    with torch.no_grad():
        for attempt in range(12):
            _, state = ours.step(query, None, memory=memory)  # a filled cache (no query views kept)
            if change == "data_assignment":
                for scale in (0.5, 4.0 if attempt % 2 else 1.0):  # the second lands where the first was
                    for p in qkv_parameters(ours):
                        p.data = p.data * scale
            else:
                ours.half().float()
            stock.load_state_dict(to_stock(ours.state_dict()))
            got, _ = ours.step(query, state[:1], memory=memory)
            torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], rtol=1e-5, atol=1e-5)
            assert ours.last_cache.startswith("recomputed")


def test_a_weight_at_the_same_address_with_other_strides_is_another_weight():
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 7, 16), seq(3, 16, seed=1)
    with torch.no_grad():
        _, state = ours.step(query[:1], None, memory=memory)
        name = kv_weight_name(ours)
        weight = ours.get_parameter(name)
        rows = weight.size(0)
        transposed = weight.as_strided((rows, 16), (1, rows))  # same storage and address, other layout
        wrapper = StepOf(ours)
        got = torch.func.functional_call(wrapper, {f"layer.{name}": transposed},
                                         (query, state[:1], memory.expand(3, -1, -1)))
        assert ours.last_cache.startswith("recomputed")
        stock_params = ({name: transposed} if rows == 16 else
                        {f"linear_{x}.weight": w for x, w in zip("qkv", transposed.chunk(3))})
        expected = torch.func.functional_call(StepOf(stock), {f"layer.{k}": v for k, v in stock_params.items()},
                                              (query, None, memory.expand(3, -1, -1)))
    torch.testing.assert_close(got, expected, **FP64)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_parameters_can_be_swapped_after_a_step(grad):
    """With ``swap_module_params_on_conversion``, ``.to()`` and ``load_state_dict`` swap the
    parameter objects' contents (``torch.utils.swap_tensors``), which refuses a tensor held
    elsewhere (the remembered query views) or weakly referenced (the cache records): both
    failed after one step. The layer forgets them first; the next step recomputes."""
    stock, ours = stock_and_flash(16, 4, dtype=torch.float32)
    memory, query = seq(1, 9, 16, dtype=torch.float32).expand(3, -1, -1), seq(3, 16, seed=1, dtype=torch.float32)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.set_grad_enabled(grad):
            state = ours.step(query, None, memory=memory)[1]
            # Detached: a state's graph holds the weights, as any output's graph does.
            state = ours.step(query, state, memory=memory)[1].detach()
            ours.double()
            stock.double()
            got, _ = ours.step(query.double(), state.double(), memory=memory.double())
            assert ours.last_cache.startswith("recomputed")
            torch.testing.assert_close(got, stock.step(query.double(), None, memory=memory.double())[0], **FP64)
            del got  # (its graph holds the output weights)
            ours.load_state_dict(stock.state_dict())
            ours.step(query.double(), None, memory=memory.double())
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


class StoredHalved(torch.nn.Module):
    """A parametrization that stores half the weight and gives back the weight itself."""

    def forward(self, weight):
        return weight * 2

    def right_inverse(self, weight):
        return weight / 2


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_parameters_the_user_swaps_after_a_step(grad):
    """``torch.utils.swap_tensors`` on a parameter, and a parametrization registered under
    ``swap_module_params_on_conversion``, swap outside ``Module._apply``, so the layer cannot
    forget its records first: those must not hold the parameters (views of them, or weak
    references, were refused after one step, where the stock layer swapped). The state made
    before the swap is recomputed, and the steps follow the new weights."""
    stock, ours = stock_and_flash(16, 4)
    memory, query = seq(1, 9, 16).expand(3, -1, -1), seq(3, 16, seed=1)
    with torch.set_grad_enabled(grad):
        state = ours.step(query, None, memory=memory)[1]
        # The remembered signature's path; detached, and no output kept: an output's graph
        # holds the weights (the stock layer's too).
        state = ours.step(query, state[:1], memory=memory)[1].detach()
        with torch.no_grad():
            for p in stock.parameters():
                p.add_(0.1)
        moved = copy.deepcopy(ours)
        moved.load_state_dict(stock.state_dict())
        for p, new in zip(ours.parameters(), moved.parameters()):
            torch.utils.swap_tensors(p, new)
        got, _ = ours.step(query, state, memory=memory)
        assert ours.last_cache.startswith("recomputed")
        torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.set_grad_enabled(grad):
            ours.step(query, None, memory=memory)
            linear = ours.linear_qkv if "linear_qkv" in ours._modules else ours.linear_k
            torch.nn.utils.parametrize.register_parametrization(linear, "weight", StoredHalved())
            got, _ = ours.step(query, None, memory=memory)
            torch.nn.utils.parametrize.remove_parametrizations(linear, "weight")
        torch.testing.assert_close(got, stock.step(query, None, memory=memory)[0], **FP64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


class DataWriter(torch.optim.Optimizer):
    """An optimizer that writes through ``.data``, which moves no write counter."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad, alpha=-0.5)


@pytest.mark.parametrize("make", ["adam_fused", "sgd_fused", "data_writer"])
def test_an_optimizer_step_within_an_utterance_recomputes_the_cache(make):
    """Fused optimizers update the weights without moving their write counters (torch 2.11,
    CPU), as does one writing through ``.data``: a cache made before the step was reused
    (1.4 off with Adam(fused=True))."""
    stock, ours = stock_and_flash(16, 4)
    params = list(ours.parameters())
    optimizer = {"adam_fused": lambda: torch.optim.Adam(params, lr=0.1, fused=True),
                 "sgd_fused": lambda: torch.optim.SGD(params, lr=0.5, fused=True),
                 "data_writer": lambda: DataWriter(params)}[make]()
    query, memory = seq(3, 16), seq(1, 5, 16, seed=1).expand(3, -1, -1)
    out, state = ours.step(query, None, memory=memory)
    out.pow(2).sum().backward()
    versions = [p._version for p in params]
    optimizer.step()
    if make != "data_writer":
        assert [p._version for p in params] == versions  # the fused update moved no counter
    stock.load_state_dict(to_stock(ours.state_dict()))
    with torch.no_grad():
        got, _ = ours.step(query, state[:1], memory=memory)
        expected, _ = stock.step(query, None, memory=memory)
    assert ours.last_cache == "recomputed: the key/value weights changed since the state was made"
    torch.testing.assert_close(got, expected, **FP64)


def test_a_state_is_recomputed_when_the_fp32_matmul_precision_changes():
    """``torch.set_float32_matmul_precision("medium")`` runs the CPU's fp32 batched matmuls in
    bf16 (oneDNN, on CPUs with bf16 units) and CUDA's in tf32: keys projected under it and
    reused after "highest" was set again were 3.7e-4 off the stock step (a probe's case).
    The step after the change projects the memory again, as the stock step does."""
    stock, ours = stock_and_flash(32, 4)
    stock, ours = stock.float(), ours.float()
    query, memory = seq(3, 32, dtype=torch.float32), seq(1, 7, 32, seed=1, dtype=torch.float32).expand(3, -1, -1)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        _, state = ours.step(query[:1], None, memory=memory[:1])
        torch.set_float32_matmul_precision("highest")
        with torch.no_grad():
            got, _ = ours.step(query, state[:1], memory=memory)
            assert ours.last_cache == ("recomputed: the fp32 matmul precision (torch.set_float32_matmul_precision) "
                                       "changed since the state was made")
            fresh, _ = ours.step(query, None, memory=memory)
            expected, _ = stock.step(query, None, memory=memory)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got, fresh)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
