"""``espnet-mha-convert EXP_DIR OUT_DIR --to stock|fused``: a flash_mha experiment folder for
ESPnet without espnet-mha, checked by decoding in a Python that cannot import us; and a stock
folder converted in place, which ESPnet resumes and averages with flash_mha."""

import json
import re
import subprocess
import sys
import sysconfig

import pytest
import torch
import yaml

import espnet_asr
from espnet_mha.checkpoint import to_fused, to_stock
from espnet_mha.checkpoint_keys import fused_layers
from espnet_mha.configs import fused_config, stock_config
from espnet_mha.convert import ConversionError, main
from espnet_mha.export import convert_experiment, export_experiment

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
OURS = {"backend": "sdpa", "compile": False, "keep_attn": False, "causal": False}


def run(*args):
    return main([str(a) for a in args])


def experiment(root, **layer_options):
    """An experiment folder as asr_train leaves it for a flash_mha model: config.yaml, two
    epoch files, the best and averaged models (a link), the training checkpoint."""
    root.mkdir()
    model, args = espnet_asr.build(root, "flash_mha", seed=9, **layer_options)
    espnet_asr.write_config(root / "config.yaml", args)
    for name in ("1epoch.pth", "2epoch.pth", "valid.acc.best.pth"):
        torch.save(model.state_dict(), root / name)
    (root / "valid.acc.ave.pth").symlink_to("valid.acc.best.pth")
    torch.save(espnet_asr.training_checkpoint(espnet_asr.build(root, "flash_mha", seed=9, **layer_options)[0].train()),
               root / "checkpoint.pth")
    (root / "train.log").write_text("not a model\n")
    return root


def decode(config, model_file, speech_file, *, without_us):
    """N-best texts and scores of ESPnet's Speech2Text; ``without_us``: in a fresh Python
    that sees ESPnet's site-packages but no .pth file (no espnet-mha, no startup hook)."""
    code = f"""
import json, sys
if {without_us!r}:
    sys.path.insert(0, {sysconfig.get_paths()["purelib"]!r})
    try:
        import espnet_mha
    except ImportError:
        pass
    else:
        sys.exit("espnet_mha is importable")
import torch
from espnet2.bin.asr_inference import Speech2Text
s2t = Speech2Text(asr_train_config={str(config)!r}, asr_model_file={str(model_file)!r}, device="cpu",
                  beam_size=3, nbest=3, ctc_weight=0.3)
print(json.dumps([[text, float(hyp.score)] for text, _, _, hyp in s2t(torch.load({str(speech_file)!r}))]))
"""
    command = [sys.executable, "-S", "-c", code] if without_us else [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, cwd=speech_file.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_exported_folder_decodes_the_same_in_espnet_without_us(tmp_path, capsys):
    src = experiment(tmp_path / "exp", **OURS)
    out = tmp_path / "stock"
    assert run(src, out, "--to", "stock") == 0
    report = capsys.readouterr().out
    assert "1 attention layer(s) -> stock mha (decoder_conf.layer[1])" in report
    for name in ("1epoch.pth", "2epoch.pth", "valid.acc.best.pth"):
        assert f"converted {name}: 2 attention layer(s) to stock" in report
    assert "linked valid.acc.ave.pth -> valid.acc.best.pth" in report
    assert ("skipped checkpoint.pth: training state not converted (--resume in the new folder would start "
            "training afresh") in report
    assert sorted(p.name for p in out.iterdir()) == ["1epoch.pth", "2epoch.pth", "config.yaml", "valid.acc.ave.pth",
                                                     "valid.acc.best.pth"]
    assert (out / "valid.acc.ave.pth").readlink().name == "valid.acc.best.pth"
    stock_model, stock_args = espnet_asr.build(tmp_path, "mha")
    exported = yaml.safe_load((out / "config.yaml").read_text())
    assert exported["decoder_conf"] == stock_args.decoder_conf  # what asr_train writes for the stock mha
    state = torch.load(out / "valid.acc.ave.pth", weights_only=True)
    assert sorted(state) == sorted(stock_model.state_dict())  # ESPnet loads with strict=False: nothing may be left

    speech = tmp_path / "speech.pt"
    torch.save(espnet_asr.batch()["speech"][0], speech)
    ours = decode(src / "config.yaml", src / "valid.acc.ave.pth", speech, without_us=False)
    theirs = decode(out / "config.yaml", out / "valid.acc.ave.pth", speech, without_us=True)
    assert [text for text, _ in theirs] == [text for text, _ in ours]
    for (_, got), (_, expected) in zip(theirs, ours):
        assert got == pytest.approx(expected, abs=1e-4)


def test_an_edited_config_alone_would_leave_q_k_v_random(tmp_path):
    """Why the folder is converted whole: ESPnet's build_model_from_file loads with
    strict=False, so a fused file under a config edited to mha drops q/k/v silently."""
    fused = experiment(tmp_path / "exp") / "valid.acc.best.pth"
    stock_model, _ = espnet_asr.build(tmp_path, "mha")
    missing, unexpected = stock_model.load_state_dict(torch.load(fused, weights_only=True), strict=False)
    assert sorted(unexpected) == [f"{p}linear_qkv.{n}" for p in espnet_asr.DECODER_ATTENTION for n in ("bias", "weight")]
    assert sorted(missing) == [f"{p}linear_{x}.{n}" for p in espnet_asr.DECODER_ATTENTION for x in "kqv"
                               for n in ("bias", "weight")]


def test_a_stock_layout_folder_needs_only_its_config(tmp_path, capsys):
    src = experiment(tmp_path / "exp", state_dict_layout="stock")
    out = tmp_path / "stock"
    assert run(src, out, "--to", "stock") == 0
    report = capsys.readouterr().out
    assert "copied valid.acc.best.pth: nothing to convert" in report
    assert (out / "valid.acc.best.pth").read_bytes() == (src / "valid.acc.best.pth").read_bytes()
    assert "state_dict_layout" not in (out / "config.yaml").read_text()


def test_the_training_checkpoint_is_exported_with_its_optimizer_state(tmp_path, capsys):
    """With the classes ESPnet's reporter needs admitted, checkpoint.pth is exported with its Adam
    state in the stock parameter order (tests/test_optimizer_state.py: resuming from it continues
    the run); a conversion that cannot be exact skips it, or drops the optimizer state if asked."""
    src = experiment(tmp_path / "exp")
    globals_ = espnet_globals()
    report = export_experiment(src, tmp_path / "stock", allow_globals=globals_)
    assert ("checkpoint.pth", 2) in report.converted
    original = torch.load(src / "checkpoint.pth", weights_only=False)
    checkpoint = torch.load(tmp_path / "stock" / "checkpoint.pth", weights_only=False)
    assert "linear_qkv" not in " ".join(checkpoint["model"])
    n_params = len(original["optimizers"][0]["param_groups"][0]["params"])
    assert checkpoint["optimizers"][0]["param_groups"][0]["params"] == list(range(n_params + 8))  # 2 layers

    adafactor = torch.load(src / "checkpoint.pth", weights_only=False)
    model = espnet_asr.build(tmp_path, "flash_mha", seed=9)[0].train()
    optimizer = torch.optim.Adafactor(model.parameters())
    model(**espnet_asr.batch())[0].backward()
    optimizer.step()
    adafactor["optimizers"] = [optimizer.state_dict()]
    torch.save(adafactor, src / "checkpoint.pth")
    report = export_experiment(src, tmp_path / "skipped", allow_globals=globals_)
    assert [name for name, _ in report.skipped] == ["checkpoint.pth"]
    assert "factored or whole-matrix optimizer" in report.skipped[0][1]
    assert "--drop-optimizer-state" in report.skipped[0][1]
    report = export_experiment(src, tmp_path / "dropped", allow_globals=globals_, drop_optimizer_state=True)
    assert ("checkpoint.pth", 2) in report.converted
    assert torch.load(tmp_path / "dropped" / "checkpoint.pth", weights_only=False)["optimizers"] == []


def espnet_globals():
    """The classes an ESPnet checkpoint.pth holds besides tensors (its reporter's times, numpy
    scalars and dtypes), as --allow-global names."""
    import numpy

    scalar = numpy.float64(0).__reduce__()[0]
    return ["datetime.timedelta", "numpy.dtype", f"{scalar.__module__}.{scalar.__name__}"]


def test_refusals(tmp_path, capsys):
    src = experiment(tmp_path / "exp", causal=True)
    out = tmp_path / "stock"
    assert run(src, out, "--to", "stock") == 1
    assert ("decoder_conf.layer[1]: flash_mha with causal: true has no stock equivalent"
            in capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(SystemExit):
        run(src, out, "--to", "fused", "--layer-pattern", "")
    assert "--layer-pattern selects layers of files" in capsys.readouterr().err
    with pytest.raises(ConversionError, match=r"no config\.yaml"):
        export_experiment(tmp_path, out)
    plain = experiment(tmp_path / "plain")
    assert run(plain, out, "--to", "stock") == 0
    assert run(plain, out, "--to", "stock") == 1
    assert "exist(s); pass --force" in capsys.readouterr().err
    assert run(plain, out, "--to", "stock", "--force") == 0
    with pytest.raises(FileExistsError, match=r"pass --force .* \(OUT_DIR is EXP_DIR: convert it in place\)"):
        export_experiment(plain, plain)
    with pytest.raises(ValueError, match=r"to must be 'stock' or 'fused', got 'fusd'"):
        convert_experiment(plain, out, to="fusd")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConversionError, match=r"a_file is a file: a folder EXP_DIR .* is converted into a folder"):
        convert_experiment(plain, tmp_path / "a_file", to="stock")
    (plain / "config.yaml").write_text("a: [b\n")
    assert run(plain, tmp_path / "o2", "--to", "stock") == 1
    assert "not YAML ESPnet can read" in capsys.readouterr().err
    # A config that names no attention layer (no decoder, a layer list that is not one): the
    # weights were converted and the config left as it was, exit 0 (found by a probe).
    for config in ({"encoder": "conformer"}, {"decoder": "s4", "decoder_conf": {"layer": "flash_mha"}}, [], None):
        (plain / "config.yaml").write_text(yaml.safe_dump(config))
        assert run(plain, tmp_path / "o3", "--to", "stock") == 1
        assert re.search(r"config\.yaml names no 'mha' layer \(_name_: mha; after the conversion\), but the "
                         r"model files hold attention layers to convert \(1epoch\.pth: \d", capsys.readouterr().err)
        assert not (tmp_path / "o3" / "1epoch.pth").exists()


def test_links_odd_files_and_failures(tmp_path, capsys):
    """Links stay links only where their target is exported; what is left out is reported;
    a failure leaves OUT_DIR as it was; file modes are kept."""
    src = experiment(tmp_path / "exp")
    (src / "latest.pth").symlink_to("checkpoint.pth")  # checkpoint.pth is skipped
    (src / "gone.pth").symlink_to("missing.pth")
    (src / "absolute.pth").symlink_to(src / "2epoch.pth")
    torch.save({"not": "a model"}, src / "stats.pth")
    (src / "1epoch.pth").chmod(0o600)
    out = tmp_path / "stock"
    assert run(src, out, "--to", "stock") == 0
    report = capsys.readouterr().out
    assert "linked absolute.pth -> 2epoch.pth" in report
    assert "skipped latest.pth: a link to checkpoint.pth, which is not exported" in report
    assert "skipped gone.pth: a link to missing.pth, which does not exist" in report
    assert "skipped stats.pth: not an ESPnet model file" in report
    assert sorted(p.name for p in out.iterdir()) == ["1epoch.pth", "2epoch.pth", "absolute.pth", "config.yaml",
                                                     "valid.acc.ave.pth", "valid.acc.best.pth"]
    assert (out / "absolute.pth").readlink().name == "2epoch.pth"
    assert (out / "1epoch.pth").stat().st_mode & 0o777 == 0o600

    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()}
    (src / "3epoch.pth").write_bytes(b"damaged")
    assert run(src, out, "--to", "stock", "--force") == 1
    assert "3epoch.pth: cannot read it" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()} == before  # nothing half-written
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # A file whose layer cannot be converted: the layer's error, and which file (a probe
    # found only the layer named, one file of several).
    state = torch.load(src / "2epoch.pth", weights_only=True)
    state = {**to_stock(state), **{k: v for k, v in state.items() if "linear_qkv" in k}}  # both layouts
    torch.save(state, src / "3epoch.pth")
    assert run(src, out, "--to", "stock", "--force") == 1
    assert re.search(rf"error: {re.escape(str(src / '3epoch.pth'))}: attention layer at "
                     r"'decoder\.decoder\.layers\.\d\.layer\.' has both fused keys and stock",
                     capsys.readouterr().err)
    with pytest.raises(KeyError, match=r"3epoch\.pth: attention layer at .* has both fused keys and stock"):
        convert_experiment(src, out, to="stock", force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()} == before
    # Into an OUT_DIR that did not exist: none is left behind (a probe found it made and left
    # empty); a 0-D weight is named, not an IndexError's traceback.
    state = torch.load(src / "2epoch.pth", weights_only=True)
    key = next(k for k in state if k.endswith("linear_qkv.weight"))
    torch.save({**state, key: torch.tensor(1.0)}, src / "3epoch.pth")
    fresh = tmp_path / "new" / "stock"
    assert run(src, fresh, "--to", "stock") == 1
    assert re.search(rf"error: {re.escape(str(src / '3epoch.pth'))}: .*linear_qkv\.weight: expected shape "
                     r"\(3D, D\), found \(\)", capsys.readouterr().err)
    with pytest.raises(ValueError, match=r"3epoch\.pth: .*linear_qkv\.weight: expected shape \(3D, D\)"):
        convert_experiment(src, fresh, to="stock")
    assert not (tmp_path / "new").exists()


def test_an_mha_layer_with_our_options_is_made_stock_too(tmp_path):
    """Under ESPNET_MHA_REPLACE_MHA=1, mha builds our layer and reads our options."""
    layer = {"_name_": "mha", "n_head": 2, "backend": "sdpa", "state_dict_layout": "stock"}
    assert stock_config({"layer": [layer]}) == ({"layer": [{"_name_": "mha", "n_head": 2}]}, ["layer[0]"])
    assert stock_config({"layer": [{"_name_": "mha", "n_head": 2}]}) == ({"layer": [{"_name_": "mha", "n_head": 2}]},
                                                                          [])
    # The mha name ignores causal (as the stock layer does): dropped, where it was refused
    # as if the layer had been causal (fused_config drops it too).
    assert stock_config({"layer": [{"_name_": "mha", "causal": True}]}) == ({"layer": [{"_name_": "mha"}]},
                                                                             ["layer[0]"])


def test_a_stock_folder_converted_in_place_resumes_and_averages_with_flash_mha(tmp_path, capsys):
    """The one-line swap in the middle of a run: the stock experiment folder is converted in
    place, so ESPnet resumes it with flash_mha (checkpoint.pth with its Adam state) and its
    end-of-training averaging reads the older epochs with the new ones (mixed layouts fail)."""
    from espnet2.main_funcs.average_nbest_models import average_nbest_models
    from espnet2.train.reporter import Reporter

    root = tmp_path / "exp"
    root.mkdir()
    stock, args = espnet_asr.build(tmp_path, "mha", seed=3)
    espnet_asr.write_config(root / "config.yaml", args)
    torch.save(espnet_asr.training_checkpoint(stock.train()), root / "checkpoint.pth")
    torch.save(stock.state_dict(), root / "1epoch.pth")
    (root / "valid.acc.best.pth").symlink_to("1epoch.pth")
    (root / "train.log").write_text("a log\n")
    ours = espnet_asr.build(tmp_path, "flash_mha", seed=4)[0]
    torch.save(ours.state_dict(), root / "2epoch.pth")  # an epoch saved after the resume
    reporter = Reporter()
    for epoch, acc in ((1, 0.5), (2, 0.6)):
        reporter.set_epoch(epoch)
        with reporter.observe("valid") as sub:
            sub.register({"acc": acc})
            sub.next()

    def average():
        average_nbest_models(output_dir=root, reporter=reporter, best_model_criterion=[("valid", "acc", "max")],
                             nbest=2)
        return torch.load(root / "valid.acc.ave_2best.pth", weights_only=True)

    with pytest.raises(KeyError, match="linear_q"):
        average()  # why the whole folder: ESPnet adds the epochs key by key
    epoch1 = torch.load(root / "1epoch.pth", weights_only=True)
    flags = [arg for name in espnet_globals() for arg in ("--allow-global", name)]
    assert run(root, root, "--to", "fused", *flags) == 1
    assert "(OUT_DIR is EXP_DIR: convert it in place)" in capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    # Without the classes ESPnet's reporter needs, checkpoint.pth cannot be read: in place that
    # stops everything (a probe's folder, converted but for it, later decoded 20 of 40 differently).
    assert run(root, root, "--to", "fused", "--force") == 1
    err = capsys.readouterr().err
    assert "--allow-global datetime.timedelta" in err
    assert "(in place, checkpoint.pth must convert with the rest of the folder: nothing was changed)" in err
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert run(root, root, "--to", "fused", "--force", *flags) == 0
    report = capsys.readouterr().out
    assert "1 attention layer(s) -> flash_mha (decoder_conf.layer[1])" in report
    for name in ("1epoch.pth", "checkpoint.pth"):
        assert f"converted {name}: 2 attention layer(s) to fused" in report
    assert "left 2epoch.pth: nothing to convert" in report
    assert "kept link valid.acc.best.pth -> 1epoch.pth" in report
    assert sorted(p.name for p in root.iterdir()) == ["1epoch.pth", "2epoch.pth", "checkpoint.pth", "config.yaml",
                                                      "train.log", "valid.acc.best.pth"]  # no temporary left
    config = yaml.safe_load((root / "config.yaml").read_text())
    assert [layer["_name_"] for layer in config["decoder_conf"]["layer"]] == ["s4", "flash_mha", "ff"]

    averaged = average()
    epoch2 = ours.state_dict()
    for key, value in to_fused(epoch1).items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[key], (value + epoch2[key]) / 2, rtol=0, atol=0)
    resumed = espnet_asr.build(tmp_path, "flash_mha", seed=5)[0]
    optimizer = espnet_asr.resume(root / "checkpoint.pth", resumed)[0]
    assert optimizer.state_dict()["param_groups"][0]["params"] == list(range(len(list(resumed.parameters()))))

    assert run(root, root, "--to", "fused", "--force", *flags) == 0  # again: nothing left to convert
    assert "left checkpoint.pth: nothing to convert" in capsys.readouterr().out


def test_fused_config_makes_every_attention_layer_flash_mha_with_the_fused_parameters():
    """A layer built with the stock parameters would split the fused files again, and its
    parameter list would not fit the converted optimizer state (a probe's resume failed)."""
    config = {"decoder_conf": {"layer": [{"_name_": "s4"},
                                         {"_name_": "flash_mha", "n_head": 4, "state_dict_layout": "stock"},
                                         {"_name_": "mha", "n_head": 2, "state_dict_layout": "stock"},
                                         {"_name_": "flash_mha", "n_head": 4, "causal": False},
                                         # The stock layer ignores causal; flash_mha would apply it.
                                         {"_name_": "mha", "n_head": 2, "causal": True}]}}
    new, paths = fused_config(config)
    assert new["decoder_conf"]["layer"] == [{"_name_": "s4"}, {"_name_": "flash_mha", "n_head": 4},
                                            {"_name_": "flash_mha", "n_head": 2},
                                            {"_name_": "flash_mha", "n_head": 4, "causal": False},
                                            {"_name_": "flash_mha", "n_head": 2}]
    assert paths == ["decoder_conf.layer[1]", "decoder_conf.layer[2]", "decoder_conf.layer[4]"]
    assert config["decoder_conf"]["layer"][1]["state_dict_layout"] == "stock"  # a copy


def test_freeze_param_follows_the_layout(tmp_path):
    """config.yaml's freeze_param names parameters: after converting, linear_q/k/v (or
    linear_qkv) of our layers would freeze nothing, and a resumed or fine-tuned run trained
    what the original froze (a probe: q/k/v 2e-3 off after two Adam steps). The entries are
    rewritten; part of one layer's q/k/v cannot be frozen in the fused layout."""
    src = experiment(tmp_path / "exp")
    prefix = fused_layers(torch.load(src / "1epoch.pth", weights_only=True))[0].rstrip(".")
    config = yaml.safe_load((src / "config.yaml").read_text())
    others = ["encoder", "decoder.decoder.layers.0"]
    (src / "config.yaml").write_text(yaml.safe_dump(config | {"freeze_param": [others[0], f"{prefix}.linear_qkv",
                                                                               others[1]]}))
    report = export_experiment(src, tmp_path / "stock")
    stock_names = yaml.safe_load((tmp_path / "stock" / "config.yaml").read_text())["freeze_param"]
    assert stock_names == [others[0], *(f"{prefix}.linear_{x}" for x in "qkv"), others[1]]
    assert f"freeze_param: {prefix}.linear_qkv -> {', '.join(stock_names[1:4])}" in report.lines()
    convert_experiment(tmp_path / "stock", tmp_path / "fused", to="fused")
    assert yaml.safe_load((tmp_path / "fused" / "config.yaml").read_text())["freeze_param"] == [
        others[0], f"{prefix}.linear_qkv", others[1]]
    config = yaml.safe_load((tmp_path / "stock" / "config.yaml").read_text())
    (tmp_path / "stock" / "config.yaml").write_text(yaml.safe_dump(config | {"freeze_param": stock_names[:3]}))
    with pytest.raises(ConversionError, match=rf"freeze_param freezes {prefix}\.linear_q, {prefix}\.linear_k but not "
                                              rf"all of q, k and v of {prefix}: the fused linear_qkv is frozen"):
        convert_experiment(tmp_path / "stock", tmp_path / "partial", to="fused")
    assert not (tmp_path / "partial" / "config.yaml").exists()


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


def test_a_config_that_is_not_yaml_is_refused_before_anything_is_written(tmp_path):
    src = experiment(tmp_path / "exp")
    (src / "config.yaml").write_text("a: [b\n")
    out = tmp_path / "stock"
    with pytest.raises(ConversionError, match=r"exp/config\.yaml: not YAML ESPnet can read \(while parsing a flow "
                                              r"sequence"):
        convert_experiment(src, out, to="stock")
    assert not out.exists()


def test_a_config_that_names_no_attention_layer_is_refused(tmp_path):
    """ESPnet would build the config's layers and load the converted weights beside them with
    strict=False: q/k/v dropped without a word. Nothing is written."""
    src = experiment(tmp_path / "exp")
    (src / "config.yaml").write_text(yaml.safe_dump({"encoder": "conformer"}))
    out = tmp_path / "stock"
    with pytest.raises(ConversionError, match=r"exp/config\.yaml names no 'mha' layer \(_name_: mha; after the "
                                              r"conversion\), but the model files hold attention layers to convert "
                                              r"\(1epoch\.pth: 2, 2epoch\.pth: 2, valid\.acc\.best\.pth: 2\)"):
        export_experiment(src, out)
    assert not out.exists()  # made for the conversion, removed with it


def test_a_training_checkpoint_that_cannot_be_read_stops_an_in_place_conversion(tmp_path):
    """Written to another folder, a checkpoint.pth that cannot be read is skipped; in place it stops
    the conversion (the folder would pair new model files with the old training state), and the
    folder is left as it was."""
    src = experiment(tmp_path / "exp")
    before = {p.name: p.read_bytes() for p in src.iterdir() if not p.is_symlink()}
    with pytest.raises(ConversionError, match=r"(?s)exp/checkpoint\.pth: torch\.load\(weights_only=True\) refuses 1 "
                                              r"class\(es\).*--allow-global datetime\.timedelta \(in place, "
                                              r"checkpoint\.pth must convert with the rest of the folder: nothing "
                                              r"was changed\)$"):
        convert_experiment(src, src, to="stock", force=True)
    assert {p.name: p.read_bytes() for p in src.iterdir() if not p.is_symlink()} == before
    assert sorted(p.name for p in src.iterdir()) == sorted([*before, "valid.acc.ave.pth"])
