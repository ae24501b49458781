"""convert_optimizer_state is exact: element-wise optimizers, frozen parameters, open positions, fuse and split."""

import copy

import pytest
import torch
import yaml

import espnet_asr
from espnet_mha.checkpoint import to_fused
from espnet_mha.convert import ConversionError, convert_file
from espnet_mha.optimizer_state import convert_optimizer_state
from optimizer_cases import batch, model, tiny, train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


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
