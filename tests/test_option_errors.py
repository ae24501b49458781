"""Constructor options, environment overrides and attributes set on a built layer are checked, naming what they got."""

import pytest
import torch

from espnet_mha import FlashMultiHeadedAttention

pytestmark = pytest.mark.usefixtures("layout")


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


def test_ignored_kwargs_are_logged(caplog):
    FlashMultiHeadedAttention(8, 2, dropout_rate=0.1)
    assert "ignores ['dropout_rate']" in caplog.text


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
