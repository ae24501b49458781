"""A converted training checkpoint's optimizer state: a run resumed in the other layout continues as the original."""

import copy

import pytest
import torch

import espnet_asr
from espnet_mha.checkpoint import to_fused
from espnet_mha.convert import convert_object
from optimizer_cases import model, train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


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
