"""Lightning runs' *.ckpt files (espnet2.bin.lightning_train) converted with their folder, and restored by Lightning."""

import pytest
import torch

import espnet_asr
from espnet_mha.checkpoint import to_stock
from convert_cases import run

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
    pytest.mark.skipif(not espnet_asr.espnet_has("espnet2.train.lightning_espnet_model"),
                       reason="this ESPnet has no Lightning training (espnet2.train.lightning_espnet_model)"),
]


def lightning_model(tmp_path, attention, seed, **layer_options):
    """ESPnet's ``LitESPnetModel`` (what ``espnet2.bin.lightning_train`` trains) over the recipe
    config's model, with its Adam optimizer from ``configure_optimizers``."""
    from espnet2.train.lightning_espnet_model import LitESPnetModel

    args = espnet_asr.build(tmp_path, attention, seed=seed, **layer_options)[1]
    out = tmp_path / f"lit_{attention}_{seed}"
    out.mkdir()
    args = espnet_asr.with_attention(args, attention)
    vars(args).update(task="asr", output_dir=str(out), optim="adam", optim_conf={"lr": 1e-3}, scheduler=None)
    torch.manual_seed(seed)
    lit = LitESPnetModel(args)
    return lit, lit.configure_optimizers()["optimizer"]


def lightning_step(lit, optimizer):
    loss = lit.model(**espnet_asr.batch())[0]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def lightning_checkpoint(lit, optimizer=None):
    """A ``*.ckpt`` file's content as Lightning writes it for ESPnet's model: the training state
    (``optimizer``) or weights only, with the hyper-parameters ``save_hyperparameters`` kept."""
    import lightning

    checkpoint = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": lightning.__version__,
                  "state_dict": lit.state_dict(), "loops": {}, "hparams_name": "args",
                  "hyper_parameters": {"args": lit.hparams["args"]}}
    if optimizer is not None:
        checkpoint |= {"callbacks": {}, "optimizer_states": [optimizer.state_dict()], "lr_schedulers": []}
    return checkpoint


def test_a_lightning_folder_converted_in_place_resumes_with_flash_mha(tmp_path, capsys):
    """The swap in the middle of a ``espnet2.bin.lightning_train`` run: its ``*.ckpt`` files
    (Lightning's format: the state dict under ``state_dict`` with ESPnet's model as ``model.``,
    the Adam state under ``optimizer_states``, the arguments in ``hyper_parameters``) convert
    with the folder, so Lightning's restore (``load_state_dict`` of both) resumes with
    flash_mha and the next step gives the stock run's parameters. The converter left the
    ``*.ckpt`` files alone, and Lightning's resume failed in ``optimizer.load_state_dict``
    (an audit found it). And back to stock."""
    root = tmp_path / "exp"
    root.mkdir()
    stock, optimizer = lightning_model(tmp_path, "mha", seed=3)
    stock.train()
    lightning_step(stock, optimizer)
    espnet_asr.write_config(root / "config.yaml", stock.hparams["args"])
    torch.save(lightning_checkpoint(stock, optimizer), root / "step1.ckpt")
    torch.save(lightning_checkpoint(stock), root / "epoch0_step1_valid.acc.ckpt")
    (root / "last.ckpt").symlink_to("step1.ckpt")
    torch.save({k.removeprefix("model."): v for k, v in stock.state_dict().items()}, root / "valid.acc.ave_1best.pth")

    assert run(root, root, "--to", "fused", "--force") == 1  # the arguments are a Namespace: to be admitted
    assert "--allow-global argparse.Namespace" in capsys.readouterr().err
    assert run(root, root, "--to", "fused", "--force", "--allow-global", "argparse.Namespace") == 0
    report = capsys.readouterr().out
    for name in ("epoch0_step1_valid.acc.ckpt", "step1.ckpt", "valid.acc.ave_1best.pth"):
        assert f"converted {name}: 2 attention layer(s) to fused" in report
    assert "kept link last.ckpt -> step1.ckpt" in report

    checkpoint = torch.load(root / "last.ckpt", weights_only=False)
    assert [layer["_name_"] for layer in checkpoint["hyper_parameters"]["args"].decoder_conf["layer"]] == \
        ["s4", "flash_mha", "ff"]
    ours, ours_optimizer = lightning_model(tmp_path, "flash_mha", seed=4)
    ours.train()
    ours.load_state_dict(checkpoint["state_dict"])  # Lightning's restore: strict
    ours_optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    lightning_step(stock, optimizer)
    lightning_step(ours, ours_optimizer)
    expected, got = stock.state_dict(), to_stock(ours.state_dict())
    assert got.keys() == expected.keys()
    for key in expected:
        # Not the key biases (the encoder's and ours): the softmax ignores them, their gradient is
        # rounding noise, which Adam's normalisation turns into steps of either sign.
        if not key.endswith("linear_k.bias"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)

    out = tmp_path / "stock"
    assert run(root, out, "--to", "stock", "--allow-global", "argparse.Namespace") == 0
    back = torch.load(out / "last.ckpt", weights_only=False)
    assert "linear_qkv" not in " ".join(back["state_dict"])
    assert back["hyper_parameters"]["args"].decoder_conf["layer"][1]["_name_"] == "mha"
    restarted, restarted_optimizer = lightning_model(tmp_path, "mha", seed=5)
    restarted.load_state_dict(back["state_dict"])
    restarted_optimizer.load_state_dict(back["optimizer_states"][0])
    capsys.readouterr()
    # One file (the converter said "neither a state dict ... nor an ESPnet training checkpoint").
    assert run(out / "step1.ckpt", tmp_path / "one.ckpt", "--to", "fused", "--allow-global", "argparse.Namespace") == 0
    assert f"read {out / 'step1.ckpt'}: Lightning checkpoint (state dict in entry 'state_dict', " in \
        capsys.readouterr().out
    one = torch.load(tmp_path / "one.ckpt", weights_only=False)
    assert one["state_dict"].keys() == checkpoint["state_dict"].keys()
    assert one["optimizer_states"][0]["param_groups"] == checkpoint["optimizer_states"][0]["param_groups"]


def test_lightning_files_in_the_layout_get_their_arguments_converted_and_sharded_folders_are_named(tmp_path, capsys):
    """A flash_mha run with the stock parameters (``state_dict_layout: stock``) exported to stock:
    its ``*.ckpt`` weights need nothing, but their saved arguments still built flash_mha, which
    ESPnet without espnet-mha cannot load (they were copied as they were: an audit). A folder
    named ``*.ckpt`` (Lightning's sharded checkpoints), a link to it and ESPnet's DeepSpeed
    checkpoint folders (``checkpoint_<epoch>``) are reported, not passed over in silence."""
    root = tmp_path / "exp"
    root.mkdir()
    lit, optimizer = lightning_model(tmp_path, "flash_mha", seed=6, state_dict_layout="stock")
    lightning_step(lit.train(), optimizer)
    espnet_asr.write_config(root / "config.yaml", lit.hparams["args"])
    torch.save(lightning_checkpoint(lit, optimizer), root / "step1.ckpt")
    (root / "step2.ckpt").mkdir()
    (root / "step2.ckpt" / "shard_0.distcp").write_bytes(b"shard")
    (root / "last.ckpt").symlink_to("step2.ckpt")
    (root / "checkpoint_3" / "3").mkdir(parents=True)  # ESPnet's DeepSpeed trainer's, by epoch
    (root / "checkpoint_3" / "3" / "mp_rank_00_model_states.pt").write_bytes(b"states")
    out = tmp_path / "stock"
    assert run(root, out, "--to", "stock", "--allow-global", "argparse.Namespace") == 0
    report = capsys.readouterr().out
    assert "copied step1.ckpt: nothing to convert (its saved training arguments rewritten as config.yaml)" in report
    assert "skipped step2.ckpt: a folder (a sharded checkpoint?), not converted" in report
    assert "skipped last.ckpt: a link to step2.ckpt, a folder, not converted" in report
    assert "skipped checkpoint_3: a DeepSpeed checkpoint folder (ESPnet's DeepSpeed trainer), not converted" in report
    saved = torch.load(out / "step1.ckpt", weights_only=False)
    layer = saved["hyper_parameters"]["args"].decoder_conf["layer"][1]
    assert layer["_name_"] == "mha" and "state_dict_layout" not in layer
    original = torch.load(root / "step1.ckpt", weights_only=False)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in original["state_dict"].items())
    (got,), (expected,) = saved["optimizer_states"], original["optimizer_states"]
    assert got["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        assert all(torch.equal(got["state"][index][name], value) for name, value in state.items())
