"""Bad inputs to forward and step raise before any kernel runs, naming the argument and what it got."""

import pytest
import torch

from espnet_mha import FlashMultiHeadedAttention

pytestmark = pytest.mark.usefixtures("layout")


@pytest.fixture
def layer():
    return FlashMultiHeadedAttention(8, 2).eval()


@pytest.mark.parametrize(
    "query,memory,mask,error,match",
    [
        ([1.0], None, None, TypeError, r"query must be a torch.Tensor, got list"),
        # (A (B, D) query or memory is one position, as in the stock layer: test_input_shapes.py.)
        (torch.randn(2, 3, 1, 8), None, None, ValueError, r"query must be 3-D \(B, T1, D\), got shape \(2, 3, 1, 8\)"),
        (torch.randn(2, 3, 7), None, None, ValueError, r"query has feature size 7 \(shape \(2, 3, 7\), \(B, T1, D\)\), expected n_feat=8"),
        (torch.ones(2, 3, 8, dtype=torch.long), None, None, TypeError, r"query must be floating point, got torch.int64"),
        (torch.randn(2, 3, 8), torch.randn(8), None, ValueError, r"memory must be 3-D \(B, T2, D\), got shape \(8,\)"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 6), None, ValueError, r"memory has feature size 6"),
        (torch.randn(2, 3, 8), torch.randn(3, 5, 8), None, ValueError, r"memory batch 3 \(shape \(3, 5, 8\)\) != query batch 2"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 8, dtype=torch.float64), None, TypeError, r"memory dtype torch.float64 != the layer.s parameter dtype torch.float32"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), ValueError, r"mask of shape \(2, 5\): a 2-D mask \(h, T2\) with h > 1 is a per-head mask to the stock layer"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(2, 1, 1, 5, dtype=torch.bool), ValueError, r"mask must be 3-D, \(B, 1, T2\) or \(B, T1, T2\) \(or \(1, T2\), or \(T1,\)\), got shape \(2, 1, 1, 5\)"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(4, dtype=torch.bool), ValueError, r"mask of shape \(4,\) does not broadcast to \(B, T1, T2\) = \(2, 3, 5\)"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(2, 1, 4, dtype=torch.bool), ValueError, r"mask of shape \(2, 1, 4\) does not broadcast to \(B, T1, T2\) = \(2, 3, 5\)"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(3, 1, 5, dtype=torch.bool), ValueError, r"mask of shape \(3, 1, 5\) does not broadcast"),
        (torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(2, 2, 5, dtype=torch.bool), ValueError, r"mask of shape \(2, 2, 5\) does not broadcast"),
        (torch.randn(2, 3, 8), None, torch.ones(2, 1, 5, dtype=torch.bool), ValueError, r"mask of shape \(2, 1, 5\) does not broadcast to \(B, T1, T2\) = \(2, 3, 3\)"),
        (torch.randn(2, 3, 8), None, [[1]], TypeError, r"mask must be a torch.Tensor or None, got list"),
    ],
)
def test_forward_errors(layer, query, memory, mask, error, match):
    with pytest.raises(error, match=match):
        layer(query, memory, mask)


def test_memory_and_mask_devices_are_checked(layer):
    query = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match=r"memory is on meta but the layer's parameters are on cpu"):
        layer(query, torch.empty(1, 3, 8, device="meta"))
    with pytest.raises(ValueError, match=r"query is on meta but the layer's parameters are on cpu"):
        layer(torch.empty(1, 3, 8, device="meta"))
    with pytest.raises(ValueError, match=r"query is on meta but the layer's parameters are on cpu"):
        layer.step(torch.empty(1, 8, device="meta"), None, memory=torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"mask is on meta but query is on cpu"):
        layer(query, torch.randn(1, 3, 8), torch.ones(1, 1, 3, dtype=torch.bool, device="meta"))


def test_query_dtype_must_match_the_parameters_outside_autocast(layer):
    with pytest.raises(TypeError, match=r"query dtype torch.float64 != the layer's parameter dtype torch.float32"):
        layer(torch.randn(1, 3, 8, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(torch.randn(1, 3, 8), torch.randn(1, 4, 8, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"query dtype torch.float64 != .*torch.autocast casts float32/16 but never float64"):
            layer(torch.randn(1, 3, 8, dtype=torch.float64))


@pytest.mark.parametrize(
    "query,memory,error,match",
    [
        (torch.randn(2, 3, 1, 8), torch.randn(2, 5, 8), ValueError,
         r"query of a step must be \(B, D\), \(B, 1, D\) or \(B, T1, D\), got shape \(2, 3, 1, 8\)"),
        (torch.randn(2, 6), torch.randn(2, 5, 8), ValueError, r"query has feature size 6"),
        # Checked before the squeeze: the shape given, not the (2, 6) read from it.
        (torch.randn(2, 1, 6), torch.randn(2, 5, 8), ValueError,
         r"query has feature size 6 \(shape \(2, 1, 6\), \(B, 1, D\)\)"),
        (torch.randn(2, 8), torch.randn(1, 5, 8), ValueError, r"memory batch 1 \(shape \(1, 5, 8\)\) != query batch 2"),
        # A 2-D memory's shape as given (it named the (2, 2, 6) it would have been read as).
        (torch.randn(2, 8), torch.randn(4, 6), ValueError, r"memory has feature size 6 \(shape \(4, 6\), \(N, D\)\)"),
    ],
)
def test_step_errors(layer, query, memory, error, match):
    with pytest.raises(error, match=match):
        layer.step(query, None, memory=memory)


def test_a_transposed_layer_names_the_transposed_layout():
    layer = FlashMultiHeadedAttention(8, 2, transposed=True)
    with pytest.raises(ValueError, match=r"query has feature size 3 \(shape \(2, 3, 8\), \(B, D, T1\) \(transposed\)\), expected n_feat=8"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"query must be 3-D \(B, D, T1\) \(transposed\), got shape \(2, 8\)"):
        layer(torch.randn(2, 8))


def test_step_takes_a_query_of_one_position_as_the_stock_step_does():
    from espnet_mha.testing import stock_and_flash

    stock, ours = stock_and_flash(8, 2)
    query, memory = torch.randn(2, 1, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    for memory_ in (memory, None):
        got, _ = ours.step(query, None, memory=memory_)
        expected, _ = stock.step(query, None, memory=memory_)
        assert got.shape == expected.shape == (2, 8)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_a_sparse_one_position_query_is_taken_as_the_stock_layer_takes_it():
    """The stock layer's linears take a sparse (B, D) query (dense projections out)."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    torch.manual_seed(0)
    stock = MultiHeadedAttention(8, 2).double().eval()
    layer = FlashMultiHeadedAttention(8, 2).double().eval()
    layer.load_state_dict(stock.state_dict())
    query, memory = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 5, 8, dtype=torch.float64)
    sparse = query.to_sparse()
    with torch.no_grad():
        for args in ((sparse, None), (sparse, memory)):
            torch.testing.assert_close(layer(*args)[0], stock(*args)[0], rtol=1e-10, atol=1e-10)
        state = None
        for _ in range(2):
            got, state = layer.step(sparse, state, memory)
            torch.testing.assert_close(got, stock.step(sparse, None, memory)[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.step(sparse, None)[0], stock.step(sparse, None)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("where", ["query", "memory", "mask", "step query"])
def test_a_sparse_input_is_named(where):
    """Sparse layouts reach no kernel: named at the boundary (they failed inside, after
    the projection, with PyTorch's "reshape is not implemented for sparse tensors")."""
    layer = FlashMultiHeadedAttention(8, 2).eval()
    query, memory, mask = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(2, 1, 5)
    name = where.split()[-1]
    with torch.no_grad():
        if where == "step query":
            _, state = layer.step(query[:, 0], None, memory)
            layer.step(query[:, 1], state, memory)  # the signature is remembered: the fast path
            with pytest.raises(TypeError, match=r"query must be a dense \(strided\) tensor, got layout "
                                                r"torch.sparse_coo \(shape \(2, 1, 8\)\)"):
                layer.step(query[:, 2:3].to_sparse(), state, memory)  # (B, 1, D): the stock step fails too
            return
        args = {"query": query, "memory": memory, "mask": mask}
        args[name] = args[name].to_sparse()
        with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
            layer(args["query"], args["memory"], args["mask"])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("nested_layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
@pytest.mark.parametrize("where", ["query", "memory", "mask", "step memory", "step state"])
def test_a_nested_input_is_named(where, nested_layout):
    """Nested tensors are refused at the boundary, naming the argument (a strided nested
    tensor, whose layout reads as strided, failed inside with PyTorch's "Internal error:
    NestedTensorImpl doesn't support sizes")."""
    layer = FlashMultiHeadedAttention(8, 2).eval()
    query, memory, mask = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.ones(2, 1, 5)
    name = where.split()[-1]

    def nested(x):
        return torch.nested.nested_tensor([x[0], x[1, :-1]], layout=nested_layout)

    match = rf"{name} must be a dense \(strided\) tensor, got a nested tensor of 2 items"
    with torch.no_grad():
        if where.startswith("step"):
            _, state = layer.step(query[:, 0], None, memory)
            layer.step(query[:, 1], state, memory)  # the signature is remembered: the fast path
            if name == "state":  # a strided nested state of two like items was taken
                items = [state[0], state[1]] if nested_layout == torch.strided else \
                    [state[0].reshape(-1, 4), state[1].reshape(-1, 4)]
                state = torch.nested.nested_tensor(items, layout=nested_layout)
                match = r"state is not a cross-attention cache .*: it must be a dense \(strided\) tensor, got a nested"
            with pytest.raises(TypeError, match=match):
                layer.step(query[:, 2], state, nested(memory) if name == "memory" else memory)
            return
        args = {"query": query, "memory": memory, "mask": mask}
        args[name] = nested(args[name])
        with pytest.raises(TypeError, match=match):
            layer(args["query"], args["memory"], args["mask"])
