"""Optimizer states that cannot convert exactly are refused: optimizer kinds, groups, positions, filtered states."""

import copy

import pytest
import torch
import yaml

import espnet_asr
from espnet_mha.convert import ConversionError, convert_file, convert_object
from espnet_mha.optimizer_state import convert_optimizer_state
from optimizer_cases import model, tiny, train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


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
