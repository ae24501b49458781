"""Bad input raises before any kernel runs, naming the argument and what it got."""

import pytest
import torch

from espnet_mha import FlashMultiHeadedAttention
from espnet_mha.dispatch import BackendUnavailableError

pytestmark = pytest.mark.usefixtures("layout")


@pytest.fixture
def layer():
    return FlashMultiHeadedAttention(8, 2).eval()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(n_feat=250, n_head=4), ValueError, r"n_feat \(250\) must be divisible by n_head \(4\)"),
        (dict(n_feat=0, n_head=1), ValueError, r"n_feat must be positive, got 0"),
        (dict(n_feat=8, n_head=-2), ValueError, r"n_head must be positive, got -2"),
        (dict(n_feat=8.0, n_head=2), TypeError, r"n_feat must be an int, got float 8.0"),
        (dict(n_feat=8, n_head=True), TypeError, r"n_head must be an int, got bool True"),
        (dict(n_feat=8, n_head=2, dropout=1.5), ValueError, r"dropout must be in \[0, 1\], got 1.5"),
        (dict(n_feat=8, n_head=2, backend="cudnn"), ValueError, r"backend must be one of .* got 'cudnn'"),
        (dict(n_feat=8, n_head=2, compile="yes"), ValueError, r"compile must be True, False or 'auto', got 'yes'"),
        (dict(n_feat=8, n_head=2, compile=1.0), ValueError, r"compile must be True, False or 'auto', got 1.0"),
        (dict(n_feat=8, n_head=2, compile=2), ValueError, r"compile must be True, False or 'auto', got 2"),
        (dict(n_feat=8, n_head=2, compile_mode=3), ValueError, r"compile_mode must be None or one of \(.*\), got 3"),
        (dict(n_feat=8, n_head=2, compile_mode="bogus"), ValueError, r"compile_mode must be None or one of \('default', .*\), got 'bogus'"),
        (dict(n_feat=8, n_head=2, dropout="0.1"), TypeError, r"dropout must be a float in \[0, 1\], got str '0.1'"),
        (dict(n_feat=8, n_head=2, dropout=None), TypeError, r"dropout must be a float in \[0, 1\], got NoneType None"),
        (dict(n_feat=8, n_head=2, dropout=float("nan")), ValueError, r"dropout must be in \[0, 1\], got nan"),
        (dict(n_feat=8, n_head=2, causal="false"), TypeError, r"causal must be True or False, got str 'false'"),
        (dict(n_feat=8, n_head=2, keep_attn="no"), TypeError, r"keep_attn must be True or False, got str 'no'"),
        # bool("false") is True: a YAML string turned transposition on (a probe).
        (dict(n_feat=8, n_head=2, transposed="false"), TypeError, r"transposed must be True or False, got str 'false'"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FlashMultiHeadedAttention(**kwargs)


def test_environment_overrides_are_checked(monkeypatch):
    monkeypatch.setenv("ESPNET_MHA_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"ESPNET_MHA_BACKEND='fast' is not one of"):
        FlashMultiHeadedAttention(8, 2)
    monkeypatch.setenv("ESPNET_MHA_BACKEND", "math")
    assert FlashMultiHeadedAttention(8, 2, backend="sdpa").backend == "math"
    monkeypatch.delenv("ESPNET_MHA_BACKEND")
    monkeypatch.setenv("ESPNET_MHA_COMPILE", "maybe")
    with pytest.raises(ValueError, match=r"ESPNET_MHA_COMPILE='maybe' must be 0/1/auto \(or true/false, yes/no, "
                                         r"on/off\)"):
        FlashMultiHeadedAttention(8, 2)
    for value, setting in (("No", False), ("ON", True), (" Auto ", "auto")):
        monkeypatch.setenv("ESPNET_MHA_COMPILE", value)
        assert FlashMultiHeadedAttention(8, 2).compile_setting == setting, value
    monkeypatch.delenv("ESPNET_MHA_COMPILE")
    monkeypatch.setenv("ESPNET_MHA_BACKEND", "SDPA")  # as other variables, any case
    assert FlashMultiHeadedAttention(8, 2).backend == "sdpa"


def test_string_options_are_read_as_the_environment_variables_are():
    """Any case, surrounding spaces ignored, and None (a YAML null) as the default (a probe:
    ``backend: SDPA`` in a config was refused where ``ESPNET_MHA_BACKEND=SDPA`` was taken, and
    ``state_dict_layout: null`` refused where ``backend: null`` was taken)."""
    layer = FlashMultiHeadedAttention(8, 2, backend=" SDPA ", compile="AUTO", compile_mode=" Default",
                                      state_dict_layout="Stock ")
    assert (layer.backend, layer.compile_setting, layer.compile_mode, layer.state_dict_layout) == (
        "sdpa", "auto", "default", "stock")
    assert FlashMultiHeadedAttention(8, 2, state_dict_layout=None).state_dict_layout == "fused"
    # What the mha name builds under use_for_mha(): None is its own default, the stock layout
    # (a review: it built the fused one, without the warning a fused mha gets).
    from espnet_mha.layer import StockLayoutFlashMultiHeadedAttention

    assert StockLayoutFlashMultiHeadedAttention(8, 2, state_dict_layout=None).state_dict_layout == "stock"
    with pytest.raises(ValueError, match=r"state_dict_layout must be one of \('fused', 'stock'\), got 'Split'"):
        FlashMultiHeadedAttention(8, 2, state_dict_layout="Split")


def test_options_are_checked_where_the_environment_overrides_them(monkeypatch):
    """A bad option is an error even while an environment variable decides (it was
    accepted, and stored, as long as the variable was set)."""
    monkeypatch.setenv("ESPNET_MHA_BACKEND", "math")
    monkeypatch.setenv("ESPNET_MHA_COMPILE", "0")
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'fast'"):
        FlashMultiHeadedAttention(8, 2, backend="fast")
    with pytest.raises(ValueError, match=r"compile must be True, False or 'auto', got 'bogus'"):
        FlashMultiHeadedAttention(8, 2, compile="bogus")
    monkeypatch.delenv("ESPNET_MHA_COMPILE")
    # A YAML config's 0 and 1 are False and True.
    assert FlashMultiHeadedAttention(8, 2, compile=1).compile_setting is True
    assert FlashMultiHeadedAttention(8, 2, compile=0).compile_setting is False


@pytest.mark.parametrize(
    "query,memory,mask,error,match",
    [
        ([1.0], None, None, TypeError, r"query must be a torch.Tensor, got list"),
        # (A (B, D) query or memory is one position, as in the stock layer: test_layer.py.)
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
         r"query must be 2-D \(B, D\), got shape \(2, 3, 1, 8\)"),
        (torch.randn(2, 6), torch.randn(2, 5, 8), ValueError, r"query has feature size 6"),
        (torch.randn(2, 8), torch.randn(1, 5, 8), ValueError, r"memory batch 1 \(shape \(1, 5, 8\)\) != query batch 2"),
        # A 2-D memory's shape as given (it named the (2, 2, 6) it would have been read as).
        (torch.randn(2, 8), torch.randn(4, 6), ValueError, r"memory has feature size 6 \(shape \(4, 6\), \(N, D\)\)"),
    ],
)
def test_step_errors(layer, query, memory, error, match):
    with pytest.raises(error, match=match):
        layer.step(query, None, memory=memory)


def test_forced_backend_that_cannot_serve_raises():
    layer = FlashMultiHeadedAttention(8, 2, backend="flash_attn")
    with pytest.raises(BackendUnavailableError, match=r"backend='flash_attn' cannot serve this call: .*Use backend='auto'"):
        layer(torch.randn(1, 2, 8))
    # keep_attn with a backend that returns no weights: refused when built (every call would
    # raise), and at the call when keep_attn is switched on later.
    with pytest.raises(ValueError, match=r"keep_attn=True needs the attention weights, which only the math path "
                                         r"returns; backend='sdpa' cannot give them: use 'math' or 'auto'"):
        FlashMultiHeadedAttention(8, 2, backend="sdpa", keep_attn=True)
    layer = FlashMultiHeadedAttention(8, 2, backend="flash_attn")
    layer.keep_attn = True
    with pytest.raises(BackendUnavailableError, match=r"backend='flash_attn' cannot return attention weights"):
        layer(torch.randn(1, 2, 8))


def test_ignored_kwargs_are_logged(caplog):
    FlashMultiHeadedAttention(8, 2, dropout_rate=0.1)
    assert "ignores ['dropout_rate']" in caplog.text


def test_a_refused_call_leaves_no_stale_last_backend():
    layer = FlashMultiHeadedAttention(8, 2, backend="sdpa")
    layer(torch.randn(1, 3, 8))
    assert layer.last_backend == "sdpa"
    layer.keep_attn = True
    with pytest.raises(BackendUnavailableError, match=r"backend='sdpa' cannot return attention weights"):
        layer(torch.randn(1, 3, 8))
    assert layer.last_backend is None and layer.last_fallback == ""


def test_a_backend_set_after_construction_is_read_as_the_constructor_reads_it(monkeypatch):
    """Checked when set, not at the next call, and None is "auto" there too (a probe: None
    was refused at the call). $ESPNET_MHA_BACKEND is read when a layer is built, so setting
    a built layer's backend overrides it (the way to change one layer under the variable)."""
    layer = FlashMultiHeadedAttention(8, 2, backend="math")
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'bogus'"):
        layer.backend = "bogus"
    assert layer.backend == "math"
    layer.backend = None
    layer(torch.randn(1, 3, 8))
    assert (layer.backend, layer.last_backend) == ("auto", "sdpa")
    monkeypatch.setenv("ESPNET_MHA_BACKEND", "sdpa")
    layer = FlashMultiHeadedAttention(8, 2)
    assert layer.backend == "sdpa"
    layer.keep_attn, layer.backend = True, "Math"
    layer(torch.randn(1, 3, 8))
    assert (layer.backend, layer.last_backend, layer.attn.shape) == ("math", "math", (1, 2, 3, 3))
    with pytest.raises(ValueError, match=r"backend='sdpa' \(from \$ESPNET_MHA_BACKEND\) cannot give them"):
        FlashMultiHeadedAttention(8, 2, keep_attn=True)
    monkeypatch.delenv("ESPNET_MHA_BACKEND")
    with pytest.raises(ValueError, match=r"backend='sdpa' cannot give them"):  # the argument, not the variable
        FlashMultiHeadedAttention(8, 2, keep_attn=True, backend="SDPA")


def test_numpy_sizes_and_flags_are_taken_as_the_stock_layer_takes_them(monkeypatch):
    import numpy as np

    layer = FlashMultiHeadedAttention(np.int64(8), np.int64(2), dropout=np.float32(0.25), causal=np.bool_(False))
    assert (layer.n_feat, layer.h, layer.dropout.p, layer.causal) == (8, 2, 0.25, False)
    assert type(layer.n_feat) is int and type(layer.causal) is bool
    monkeypatch.setenv("ESPNET_MHA_COMPILE_MODE", "bogus")
    with pytest.raises(ValueError, match=r"ESPNET_MHA_COMPILE_MODE must be None or one of \(.*\), got 'bogus'"):
        FlashMultiHeadedAttention(8, 2)


def test_a_tensor_dropout_is_taken_as_the_stock_layer_takes_it():
    """A 0-D tensor, which nn.Dropout and F.dropout take (a probe: we refused it), draws the
    stock random numbers; a one-element 1-D tensor, which F.dropout refuses at every stock
    call, we read as its float. The flags take None (a YAML null) as off; bools stay refused."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    query = torch.randn(2, 3, 8, dtype=torch.float64)
    for value in (torch.tensor(0.25), torch.tensor([0.25], dtype=torch.float64)):
        torch.manual_seed(0)
        stock = MultiHeadedAttention(8, 2, dropout=value).double()
        torch.manual_seed(0)
        ours = FlashMultiHeadedAttention(8, 2, dropout=value, transposed=None, causal=None, keep_attn=None).double()
        assert (ours.dropout.p, ours.transposed, ours.causal, ours.keep_attn) == (0.25, False, False, False)
        for training in (False, True):
            outs = []
            for layer in (stock, ours):
                torch.manual_seed(1)
                try:
                    outs.append(layer.train(training)(query, query)[0])
                except TypeError as error:  # the stock layer, a 1-D p
                    assert layer is stock and value.dim() and "must be float, not Tensor" in str(error)
            if len(outs) == 2:
                torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match=r"dropout must be a float in \[0, 1\], got bool True"):
        FlashMultiHeadedAttention(8, 2, dropout=True)


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


def test_an_input_error_leaves_no_stale_last_backend_or_cache():
    layer = FlashMultiHeadedAttention(8, 2).eval()
    memory = torch.randn(2, 5, 8)
    with torch.no_grad():
        _, state = layer.step(torch.randn(2, 8), None, memory)
        assert layer.last_backend and layer.last_cache == "filled"
        with pytest.raises(ValueError, match=r"query has feature size 6"):
            layer.step(torch.randn(2, 6), state, memory)
        assert layer.last_backend is None and layer.last_fallback == "" and layer.last_cache is None
        layer(torch.randn(2, 3, 8))
        with pytest.raises(ValueError, match=r"query has feature size 6"):
            layer(torch.randn(2, 3, 6))
        assert layer.last_backend is None and layer.last_fallback == ""


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(2, 1, 4, dtype=torch.bool), ValueError, r"mask"),
    ("numpy", TypeError, r"mask must be a torch.Tensor or None, got ndarray"),
])
def test_a_bad_mask_on_the_first_step_raises_before_the_memory_is_projected(mask, error, match):
    layer = FlashMultiHeadedAttention(8, 2).eval()
    mask = torch.ones(2, 1, 5).numpy() if mask == "numpy" else mask
    with torch.no_grad(), pytest.raises(error, match=match):
        layer.step(torch.randn(2, 8), None, torch.randn(2, 5, 8), mask)
    assert layer.last_cache is None and not layer._cache_sources


def test_a_forced_backend_that_cannot_serve_a_first_step_raises_before_the_memory_is_projected():
    layer = FlashMultiHeadedAttention(8, 2, backend="flash_attn").eval()
    with torch.no_grad(), pytest.raises(BackendUnavailableError, match=r"backend='flash_attn' cannot serve"):
        layer.step(torch.randn(2, 8), None, torch.randn(2, 5, 8))
    assert layer.last_cache is None and not layer._cache_sources


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


def test_options_and_sizes_set_on_a_built_layer_are_checked():
    """An audit: ``keep_attn = "false"`` and ``causal = "no"`` on a built layer acted as true,
    ``h = 3`` ran with the heads and head size out of step, and a ``dropout.p`` out of range
    ran in eval (the stock layer's ``F.dropout`` refuses it in every mode)."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    layer = FlashMultiHeadedAttention(8, 2)
    for name in ("keep_attn", "causal", "transposed"):
        with pytest.raises(TypeError, match=rf"{name} must be True or False, got str 'false'"):
            setattr(layer, name, "false")
        setattr(layer, name, 0)  # as the constructor reads it
        assert getattr(layer, name) is False
    for name in ("h", "d_model", "d_output"):  # d_model, d_output: SequenceModule properties (a probe)
        with pytest.raises(AttributeError, match=rf"{name} is {getattr(layer, name)}, fixed by the parameters this "
                                                 r"layer was built with; got 3"):
            setattr(layer, name, 3)
    layer.h = 2  # the same size: fine
    # The compile options too (a probe: a bad mode was taken, and layer.compile = True hid
    # nn.Module.compile and changed nothing).
    with pytest.raises(ValueError, match=r"compile_mode must be None or one of .*, got 'bogus'"):
        layer.compile_mode = "bogus"
    with pytest.raises(ValueError, match=r"compile must be True, False or 'auto', got 'yes'"):
        layer.compile_setting = "yes"
    with pytest.raises(AttributeError, match=r"compile is nn.Module.compile; the layer's compile option is "
                                             r"compile_setting"):
        layer.compile = True
    layer.compile_setting = False
    assert (layer.compile_setting, layer.compile_mode, callable(layer.compile)) == (False, None, True)
    # The environment variables are read when a layer is built; an assignment overrides them,
    # as for backend.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ESPNET_MHA_COMPILE", "1")
        layer.compile_setting = "Auto"
        assert layer.compile_setting == "auto"
    query, memory = torch.randn(1, 2, 8), torch.randn(1, 3, 8)
    stock = MultiHeadedAttention(8, 2).eval()
    for p in (2.0, -0.1):
        layer.dropout.p = stock.dropout.p = p
        for mode in (False, True):
            layer.train(mode), stock.train(mode)
            with pytest.raises(ValueError, match=r"dropout probability has to be between 0 and 1, but got"):
                stock(query, memory)
            with pytest.raises(ValueError, match=rf"dropout probability has to be between 0 and 1, but got {p} "
                                                 r"\(the layer's dropout.p\)"):
                layer(query, memory)
