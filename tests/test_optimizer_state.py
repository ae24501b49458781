"""A training checkpoint's optimizer state between the layouts: a run resumed after the
one-line swap (or exported back to stock) continues as the original run would have.

The reference is ESPnet's stock model trained by a stock optimizer; after converting
``checkpoint.pth``, ESPnet's ``Trainer.resume`` loads it into the other layout and a few
more steps must give the stock run's parameters (fp64).
"""

import copy

import pytest
import torch
import yaml

import espnet_asr
from espnet_mha.checkpoint import to_fused
from espnet_mha.convert import ConversionError, convert_file, convert_object
from espnet_mha.optimizer_state import convert_optimizer_state

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# A conformer encoder: BatchNorm buffers (running_mean/var, the same shapes as parameters) and
# S4 kernel buffers lie between parameters, so positions must be told apart by the state's shapes.
CONFORMER = {"output_size": espnet_asr.D_MODEL, "attention_heads": 2, "linear_units": 64, "num_blocks": 2,
             "input_layer": "conv2d", "cnn_module_kernel": 3, "use_cnn_module": True, "macaron_style": True,
             "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0}


def model(tmp_path, attention, seed):
    built, _ = espnet_asr.build(tmp_path, attention, seed=seed, encoder="conformer", encoder_conf=CONFORMER)
    return built.double().train()


def batch():
    return {k: v.double() if v.is_floating_point() else v for k, v in espnet_asr.batch().items()}


def train(net, optimizer, scheduler, steps):
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = net(**batch())[0]
            loss.backward()
            return loss
        optimizer.step(closure)
        if scheduler is not None:
            scheduler.step()


def max_difference(got, expected):
    assert list(got) == list(expected)
    return max((got[k] - expected[k]).abs().max().item() for k in expected if expected[k].is_floating_point())


def checkpoint(net, optimizer, scheduler):
    """``checkpoint.pth`` as ESPnet's trainer saves it."""
    from espnet2.train.reporter import Reporter

    return {"model": net.state_dict(), "reporter": Reporter().state_dict(), "optimizers": [optimizer.state_dict()],
            "schedulers": [scheduler.state_dict()], "scaler": None}


def test_a_stock_run_resumed_with_flash_mha_continues_as_the_stock_run(tmp_path):
    """The one-line swap in the middle of training: ESPnet resumes the stock checkpoint.pth,
    converted, into flash_mha; three more steps give the stock run's parameters. Without the
    Adam moments (--drop-optimizer-state) they are lr-sized steps away."""
    from espnet2.schedulers.warmup_lr import WarmupLR

    stock = model(tmp_path, "mha", seed=3)
    optimizer = torch.optim.Adam(stock.parameters(), lr=1e-3)
    scheduler = WarmupLR(optimizer, warmup_steps=10)
    train(stock, optimizer, scheduler, 2)
    saved = copy.deepcopy(checkpoint(stock, optimizer, scheduler))
    torch.save(saved, tmp_path / "stock.pth")
    for drop in (False, True):
        converted, report = convert_object(copy.deepcopy(saved), src="stock.pth", dst="fused.pth", to="fused",
                                           drop_optimizer_state=drop)
        assert (report.converted_optimizers, report.dropped_optimizers) == ((0, 1) if drop else (1, 0))
        torch.save(converted, tmp_path / "fused.pth")
        ours = model(tmp_path, "flash_mha", seed=5)
        train(ours, *espnet_asr.resume(tmp_path / "fused.pth", ours)[:2], 3)
        reference = model(tmp_path, "mha", seed=7)
        train(reference, *espnet_asr.resume(tmp_path / "stock.pth", reference)[:2], 3)
        difference = max_difference(ours.state_dict(), to_fused(reference.state_dict()))
        if drop:
            assert difference > 1e-4
        else:
            assert difference < 1e-8  # fp64 rounding of the two layers, through 3 Adam steps


def test_a_flash_mha_run_exported_to_stock_continues_in_stock_espnet(tmp_path):
    from espnet2.schedulers.warmup_lr import WarmupLR

    ours = model(tmp_path, "flash_mha", seed=3)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-3, amsgrad=True)
    scheduler = WarmupLR(optimizer, warmup_steps=10)
    train(ours, optimizer, scheduler, 2)
    saved = copy.deepcopy(checkpoint(ours, optimizer, scheduler))  # state_dict() holds the live tensors
    torch.save(saved, tmp_path / "fused.pth")
    converted, report = convert_object(copy.deepcopy(saved), src="fused.pth", dst="stock.pth", to="stock")
    assert report.converted_optimizers == 1
    torch.save(converted, tmp_path / "stock.pth")
    stock = model(tmp_path, "mha", seed=5)
    adamw = espnet_asr.resume(tmp_path / "stock.pth", stock, lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True))
    train(stock, *adamw[:2], 3)
    train(ours, optimizer, scheduler, 3)
    assert max_difference(ours.state_dict(), to_fused(stock.state_dict())) < 1e-8

    back, _ = convert_object(copy.deepcopy(converted), src="stock.pth", dst="back.pth", to="fused")
    expected = saved["optimizers"][0]
    got = back["optimizers"][0]
    assert got["param_groups"] == expected["param_groups"] and sorted(got["state"]) == sorted(expected["state"])
    for index, values in expected["state"].items():
        assert sorted(got["state"][index]) == sorted(values)
        for key, value in values.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


ELEMENT_WISE = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),  # no per-parameter state at all
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-3),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-3),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-3),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adadelta": lambda p: torch.optim.Adadelta(p),
}


@pytest.mark.parametrize("name", sorted(ELEMENT_WISE))
def test_element_wise_optimizers_convert_exactly(tmp_path, name):
    """The converted state is the stock state, re-indexed and with q, k and v stacked: given
    the stock gradients (stacked the same way), the next steps give the stock parameters
    bit for bit. Both runs resume from the saved state (load_state_dict casts some state,
    e.g. NAdam's mu_product, to the parameters' dtype)."""
    make = ELEMENT_WISE[name]
    stock = model(tmp_path, "mha", seed=3)
    first = make(stock.parameters())
    train(stock, first, None, 2)
    saved = copy.deepcopy(first.state_dict())
    optimizer = make(stock.parameters())
    optimizer.load_state_dict(copy.deepcopy(saved))
    ours = model(tmp_path, "flash_mha", seed=5)
    ours.load_state_dict(stock.state_dict())
    mine = make(ours.parameters())
    mine.load_state_dict(convert_optimizer_state(saved, stock.state_dict(), espnet_asr.DECODER_ATTENTION, fuse=True))
    for _ in range(2):
        optimizer.zero_grad()
        stock(**batch())[0].backward()
        grads = to_fused({name: param.grad for name, param in stock.named_parameters()})
        for name, param in ours.named_parameters():
            param.grad = grads[name].clone()
        optimizer.step()
        mine.step()
    expected = to_fused(dict(stock.named_parameters()))
    for key, value in ours.named_parameters():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("frozen", ["encoder.", "decoder."])
def test_frozen_parameters_convert_where_the_config_says_the_model_state_is_whole(tmp_path, frozen):
    """ESPnet's --freeze_param: the frozen parameters have no optimizer state. The
    config.yaml beside checkpoint.pth (no --use_adapter) says the model state holds them, so
    their positions are found; the converted run then steps as the stock one, bit for bit.
    With the decoder frozen, its attention layers have no state, and buffers between its
    parameters leave their positions open: every reading gives the same converted state,
    so it converts (it was refused before)."""
    stock = model(tmp_path, "mha", seed=3)
    for name, param in stock.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    first = torch.optim.Adam(stock.parameters(), lr=1e-3)
    train(stock, first, None, 2)
    folder = tmp_path / "exp"
    folder.mkdir()
    saved = {"model": stock.state_dict(), "reporter": {}, "optimizers": [first.state_dict()], "schedulers": [None],
             "scaler": None}
    torch.save(saved, folder / "checkpoint.pth")
    with pytest.raises(ConversionError, match=r"parameter\(s\) have no state \(frozen or unused"):
        convert_file(folder / "checkpoint.pth", folder / "fused.pth", to="fused")
    (folder / "config.yaml").write_text(yaml.safe_dump({"use_adapter": False, "freeze_param": [frozen[:-1]]}))
    assert convert_file(folder / "checkpoint.pth", folder / "fused.pth", to="fused").converted_optimizers == 1

    optimizer = torch.optim.Adam(stock.parameters(), lr=1e-3)
    optimizer.load_state_dict(copy.deepcopy(saved["optimizers"][0]))
    ours = model(tmp_path, "flash_mha", seed=5)
    for name, param in ours.named_parameters():
        param.requires_grad_(not name.startswith(frozen))
    ours.load_state_dict(stock.state_dict())
    mine = torch.optim.Adam(ours.parameters(), lr=1e-3)
    mine.load_state_dict(torch.load(folder / "fused.pth", weights_only=True)["optimizers"][0])
    optimizer.zero_grad()
    stock(**batch())[0].backward()
    grads = to_fused({name: param.grad for name, param in stock.named_parameters() if param.grad is not None})
    for name, param in ours.named_parameters():
        param.grad = grads[name].clone() if name in grads else None
    optimizer.step()
    mine.step()
    expected = to_fused(dict(stock.named_parameters()))
    for key, value in ours.named_parameters():
        assert torch.equal(value, expected[key]), key


def trained_state(tmp_path, make, attention="mha", freeze=None):
    net = model(tmp_path, attention, seed=3)
    for name, param in net.named_parameters():
        if freeze is not None and not freeze(name):
            param.requires_grad_(False)
    optimizer = make(net.parameters())
    train(net, optimizer, None, 1)
    return net.state_dict(), optimizer.state_dict()


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.optim.Adafactor(p), r"parameter 0's state holds tensors of different shapes \(row_var .*"
                                          r"factored or whole-matrix optimizer"),
    (lambda p: torch.optim.LBFGS(p, max_iter=2), r"parameter 0's '\w+' is a list: only element-wise"),
])
def test_optimizers_whose_state_is_not_element_wise_are_refused(tmp_path, make, message):
    state, optimizer = trained_state(tmp_path, make)
    with pytest.raises(ConversionError, match=message):
        convert_optimizer_state(optimizer, state, espnet_asr.DECODER_ATTENTION, fuse=True)
    saved = {"model": state, "reporter": {}, "optimizers": [optimizer], "schedulers": [None], "scaler": None}
    with pytest.raises(ConversionError, match=r"Pass --drop-optimizer-state"):
        convert_object(saved, src="checkpoint.pth", dst="out.pth", to="fused")


def test_parameter_groups_and_unreadable_states_are_refused(tmp_path):
    configure_optimizer = pytest.importorskip("espnet2.optimizers.optim_groups").configure_optimizer
    net = model(tmp_path, "mha", seed=3)
    grouped = configure_optimizer(net, torch.optim.AdamW, {"lr": 1e-3}, {})  # --exclude_weight_decay true
    train(net, grouped, None, 1)
    state = net.state_dict()
    layers = espnet_asr.DECODER_ATTENTION
    with pytest.raises(ConversionError, match=r"2 parameter groups \(ESPnet's --exclude_weight_decay"):
        convert_optimizer_state(grouped.state_dict(), state, layers, fuse=True)
    with pytest.raises(ConversionError, match=r"not a torch.optim state dict .*got dict with keys \['opt'\]"):
        convert_optimizer_state({"opt": 1}, state, layers, fuse=True)
    adam = torch.optim.Adam(net.parameters())
    train(net, adam, None, 1)
    shrunk = dict(state)
    del shrunk["decoder.output.weight"]  # a model state that is not the optimizer's model
    with pytest.raises(ConversionError, match=r"shapes do not fit the model state's entries"):
        convert_optimizer_state(adam.state_dict(), shrunk, layers, fuse=True)


def test_positions_the_state_cannot_tell_are_refused():
    """A state whose shapes repeat (weight, bias, weight, bias...) with entries of no state
    around it: the layer could start at position 0 or 2, so nothing is guessed."""
    layer = "layers.0.layer."
    weight, bias = (2, 2), (2,)
    shapes = {"b1": weight, "b2": bias}  # buffers or parameters: only the count can tell
    for name in ("q", "k", "v", "out", "extra"):
        prefix = f"{layer}linear_{name}." if name != "extra" else "extra."
        shapes[f"{prefix}weight"], shapes[f"{prefix}bias"] = weight, bias
    model_state = {key: torch.zeros(shape) for key, shape in shapes.items()}
    state = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.ones(bias if i % 2 else weight) * i}
                       for i in range(8)},
             "param_groups": [{"lr": 1.0, "params": list(range(10))}]}
    with pytest.raises(ConversionError, match=r"cannot tell which optimizer position holds "
                                              r"layers\.0\.layer\.linear_q\.weight \(possible: \[0, 2\]\)"):
        convert_optimizer_state(state, model_state, [layer], fuse=True, complete=True)
    state["param_groups"][0]["params"] = list(range(12))  # every entry a parameter: one way only
    converted = convert_optimizer_state(state, model_state, [layer], fuse=True, complete=True)
    assert converted["param_groups"][0]["params"] == list(range(8))
    assert sorted(converted["state"]) == [0, 1, 2, 3]  # b1, b2, qkv weight and bias (out and extra: no state)
    assert torch.equal(converted["state"][2]["exp_avg"], torch.cat([torch.full(weight, i) for i in (2.0, 4.0, 6.0)]))
    assert torch.equal(converted["state"][3]["exp_avg"], torch.cat([torch.full(bias, i) for i in (3.0, 5.0, 7.0)]))


def test_open_positions_convert_where_every_reading_gives_the_same_state():
    """torch 1.x SGD without momentum kept ``momentum_buffer: None`` for every parameter: no
    shapes, so the layer's position is open, but the state is the same whichever it is."""
    layer = "layers.0.layer."
    shapes = {"b1": (2, 2), "b2": (2,)}
    for name in ("q", "k", "v", "out"):
        shapes[f"{layer}linear_{name}.weight"], shapes[f"{layer}linear_{name}.bias"] = (2, 2), (2,)
    model_state = {key: torch.zeros(shape) for key, shape in shapes.items()}
    state = {"state": {i: {"momentum_buffer": None} for i in range(8)},
             "param_groups": [{"lr": 1.0, "momentum": 0, "params": list(range(8))}]}
    converted = convert_optimizer_state(state, model_state, [layer], fuse=True, complete=True)
    assert converted["state"] == {i: {"momentum_buffer": None} for i in range(4)}
    assert converted["param_groups"][0]["params"] == list(range(4))
    back = convert_optimizer_state(converted, to_fused(model_state), [layer], fuse=False, complete=True)
    assert back["state"] == state["state"] and back["param_groups"] == state["param_groups"]
    state["state"][3] = {"momentum_buffer": None, "step": 2}  # no longer alike: which entry moves is open
    with pytest.raises(ConversionError, match=r"cannot tell which optimizer position holds .*would differ"):
        convert_optimizer_state(state, model_state, [layer], fuse=True, complete=True)


def tiny(n_feat=2):
    """A model state (a parameter ``p``, then one stock layer under ``L.``) and an Adam-like
    state for its 9 parameters."""
    model_state = {"p": torch.zeros(3)}
    for name in ("q", "k", "v", "out"):
        model_state[f"L.linear_{name}.weight"] = torch.zeros(n_feat, n_feat)
        model_state[f"L.linear_{name}.bias"] = torch.zeros(n_feat)
    state = {"state": {i: {"step": torch.tensor(2.0), "exp_avg": torch.full(value.shape, float(i))}
                       for i, value in enumerate(model_state.values())},
             "param_groups": [{"lr": 1.0, "params": list(range(9))}]}
    return model_state, state


def test_a_tiny_state_fuses_and_splits_back():
    model_state, state = tiny()
    fused = convert_optimizer_state(copy.deepcopy(state), model_state, ["L."], fuse=True)
    assert fused["param_groups"] == [{"lr": 1.0, "params": list(range(5))}]
    assert torch.equal(fused["state"][1]["exp_avg"], torch.cat([torch.full((2, 2), i) for i in (1.0, 3.0, 5.0)]))
    assert torch.equal(fused["state"][4]["exp_avg"], torch.full((2,), 8.0))
    back = convert_optimizer_state(fused, to_fused(model_state, layer_pattern=""), ["L."], fuse=False)
    assert back["param_groups"] == state["param_groups"]
    for index, values in state["state"].items():
        for key, value in values.items():
            assert torch.equal(back["state"][index][key], value), (index, key)


def _edit(edit):
    model_state, state = tiny()
    edit(model_state, state)
    return model_state, state


@pytest.mark.parametrize("edit, message", [
    (lambda m, s: m.pop("L.linear_v.bias"), r"the model state has no L\.linear_v\.bias"),
    (lambda m, s: s["param_groups"][0].update(params=[1, 0, *range(2, 9)]),
     r"'params' are not the positions 0\.\.N-1 \(got \[1, 0, 2"),
    (lambda m, s: s["param_groups"][0].update(param_names=list("abcdef")), r"names its parameters \('param_names': \['a', 'b', 'c', 'd'\]\.\.\.\)"),
    (lambda m, s: s["state"].update({9: {}}), r"state for positions \[9\] outside the parameter group \(0\.\.8\)"),
    (lambda m, s: s["state"].update({0: [1]}), r"the state of parameter 0 is a list, not a dict"),
    (lambda m, s: s.update(state={}, param_groups=[{"params": [0, 1, 2]}]),
     r"3 parameters, fewer than the 1 layer\(s\) to convert have \(6 each\)"),
    (lambda m, s: m.update({"L.linear_q.bias": m.pop("L.linear_q.bias")}),
     r"does not list L\.linear_q\.weight, L\.linear_q\.bias, .* in this order"),
    (lambda m, s: s["state"][3].clear(), r"L\.linear_q/k/v\.weight have unlike state \(\[\['exp_avg', 'step'\], \[\]"),
    (lambda m, s: s["state"][5].update(step=torch.tensor(3.0)), r"L\.linear_q/k/v\.weight disagree in 'step'"),
])
def test_states_that_cannot_be_converted_exactly_are_refused(edit, message):
    model_state, state = _edit(edit)
    with pytest.raises(ConversionError, match=message):
        convert_optimizer_state(state, model_state, ["L."], fuse=True, complete=True)


class _Holder(torch.nn.Module):
    def __init__(self, shape, *, buffer=False):
        super().__init__()
        if buffer:
            self.register_buffer("b", torch.randn(shape))
        else:
            self.p = torch.nn.Parameter(torch.randn(shape))


def _two_layers(fused):
    """A parameter, 8 buffers shaped like a layer's parameters, two attention layers (stock
    or fused linears), 8 parameters after them."""
    d = 4
    if fused:
        def layer():
            return torch.nn.ModuleDict({"linear_qkv": torch.nn.Linear(d, 3 * d), "linear_out": torch.nn.Linear(d, d)})
    else:
        def layer():
            return torch.nn.ModuleDict({f"linear_{n}": torch.nn.Linear(d, d) for n in ("q", "k", "v", "out")})
    return torch.nn.Sequential(_Holder((d,)), *[_Holder((d, d) if i % 2 == 0 else (d,), buffer=True) for i in range(8)],
                               layer(), layer(), *[_Holder((3,)) for _ in range(8)])


def test_a_model_state_without_its_frozen_parameters_is_not_guessed(tmp_path):
    """ESPnet's --use_adapter with --save_strategy required_grad_only saves the model state
    without the frozen parameters, while the optimizer keeps their positions. Here the
    search would fill them with buffers and put layer 10's moments on a frozen parameter
    (a probe's case, which loaded and stepped without error). Parameters without state are
    only trusted where the config.yaml beside the file says the model state is whole (a
    config that says so of a filtered state is not detected)."""
    torch.manual_seed(0)
    net = _two_layers(fused=False)
    for i in range(11, 19):
        net[i].p.requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        sum((p ** 2).sum() for n, p in net.named_parameters() if p.requires_grad and not n.startswith("9.")).backward()
        optimizer.step()
    filtered = net.state_dict()
    for i in range(11, 19):
        filtered.pop(f"{i}.p")
    with pytest.raises(ConversionError, match=r"16 parameter\(s\) have no state \(frozen or unused: positions "
                                              r"\[1, 2, 3, 4, 5\]\.\.\.\), and nothing says that the model state "
                                              r"holds them: .*--save_strategy required_grad_only"):
        convert_optimizer_state(optimizer.state_dict(), filtered, ["9.", "10."], fuse=True)

    # As files: the config.yaml ESPnet writes beside checkpoint.pth says how the model state was saved.
    # With the whole state, layer 9 (no gradient, no state) could sit at several positions: refused too.
    for config, model_state, message in (
            (None, filtered, "have no state"),
            ({"use_adapter": True, "save_strategy": "required_grad_only"}, filtered, "have no state"),
            ({"use_adapter": True, "save_strategy": "all"}, net.state_dict(), "cannot tell"),
            ({"use_adapter": False}, net.state_dict(), "cannot tell")):
        if config is not None:
            (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        torch.save({"model": model_state, "reporter": {}, "optimizers": [optimizer.state_dict()],
                    "schedulers": [None], "scaler": None}, tmp_path / "checkpoint.pth")
        with pytest.raises(ConversionError, match=rf"{message} .*Pass --drop-optimizer-state"):
            convert_file(tmp_path / "checkpoint.pth", tmp_path / "out.pth", to="fused", layer_pattern="", force=True)


def test_several_optimizers_are_refused():
    """A task with several optimizers (GAN TTS) gives each a part of the model."""
    model_state, state = tiny()
    checkpoint = {"model": model_state, "reporter": {}, "optimizers": [state, copy.deepcopy(state)]}
    with pytest.raises(ConversionError, match=r"holds 2 optimizers .*Pass --drop-optimizer-state"):
        convert_object(checkpoint, src="checkpoint.pth", dst="out.pth", to="fused", layer_pattern="")
