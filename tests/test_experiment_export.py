"""``--to stock``: a flash_mha experiment folder exported for ESPnet without espnet-mha decodes the same."""

import json
import subprocess
import sys
import sysconfig

import pytest
import torch
import yaml

import espnet_asr
from espnet_mha.export import export_experiment
from convert_cases import run
from experiment_cases import espnet_globals, experiment

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


OURS = {"backend": "sdpa", "compile": False, "keep_attn": False, "causal": False}


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
    state in the stock parameter order (tests/test_optimizer_resume.py: resuming from it continues
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
