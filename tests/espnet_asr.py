"""Small ESPnet ASR models built by ``ASRTask`` from a real recipe config, and files as ESPnet writes them.

The config follows ``egs/synth_digits/asr1/conf/train_asr_s4dec_*.yaml`` (default
frontend, transformer encoder, ``decoder: s4`` with ``[s4, <attention>, ff]``),
shrunk so a model builds in a fraction of a second.
"""

import argparse
import importlib.util

import torch
import yaml

TOKENS = ["<blank>", "<unk>", "a", "b", "c", "d", "e", "f", "g", "<sos/eos>"]
D_MODEL = 32
N_HEAD = 4
# Our attention layers' key prefixes in this model (SequenceModel.layers[1] and [4]);
# the encoder's own attention has the same key names under encoders.0.self_attn.
DECODER_ATTENTION = ["decoder.decoder.layers.1.layer.", "decoder.decoder.layers.4.layer."]
ENCODER_ATTENTION = "encoder.encoders.0.self_attn."


def espnet_has(module):
    """Whether the installed ESPnet has ``module`` (a dotted name): the declared oldest,
    espnet 202402, has no adapters (``espnet2.layers.create_adapter``) and no Lightning
    training (``espnet2.train.lightning_espnet_model``)."""
    return importlib.util.find_spec(module) is not None


def recipe_config(attention, *, d_model=D_MODEL, n_head=N_HEAD, **layer_options):
    """A training config (the YAML a recipe passes to ``asr_train --config``) as a dict."""
    return {
        "frontend_conf": {"n_fft": 64, "win_length": 64, "hop_length": 32, "n_mels": 16},
        "encoder": "transformer",
        "encoder_conf": {"output_size": d_model, "attention_heads": 2, "linear_units": 64, "num_blocks": 1,
                         "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0,
                         "input_layer": "conv2d", "normalize_before": True},
        "decoder": "s4",
        "decoder_conf": {"n_layers": 2, "dropout": 0.0, "prenorm": True, "norm": "layer", "residual": "residual",
                         "layer": [{"_name_": "s4", "keops": True, "d_state": 8, "postact": "glu"},
                                   {"_name_": attention, "n_head": n_head, **layer_options},
                                   {"_name_": "ff", "expand": 2, "activation": "gelu"}]},
        "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1, "length_normalized_loss": False},
        "token_type": "char",
        "seed": 0,
    }


def build(tmp_path, attention, *, seed=0, encoder=None, encoder_conf=None, **config_options):
    """``ASRTask.build_model`` from the recipe config, as ``asr_train`` does
    (``encoder``/``encoder_conf`` replace the recipe's encoder when given).

    Returns:
        (model in eval mode, args); ``args`` is what ESPnet dumps to ``config.yaml``.
    """
    from espnet2.tasks.asr import ASRTask

    import espnet_mha  # noqa: F401  (registers flash_mha, as the startup hook does)

    config = tmp_path / f"train_{attention}_{seed}.yaml"
    conf = recipe_config(attention, **config_options)
    if encoder is not None:
        conf.update(encoder=encoder, encoder_conf=encoder_conf or {})
    config.write_text(yaml.safe_dump(conf))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    args = ASRTask.get_parser().parse_args(["--config", str(config), "--token_list", str(tokens)])
    torch.manual_seed(seed)
    model = ASRTask.build_model(args)
    return model.eval(), args


def write_config(path, args):
    """``config.yaml`` as ``asr_train`` writes it (after ``build_model`` turned token_list into a list)."""
    from espnet2.utils.yaml_no_alias_safe_dump import yaml_no_alias_safe_dump

    with open(path, "w", encoding="utf-8") as f:
        yaml_no_alias_safe_dump(vars(args), f, indent=4, sort_keys=False)
    return path


def with_attention(args, attention):
    """A copy of ``args`` whose decoder uses ``attention`` (what a user edits in config.yaml)."""
    conf = dict(args.decoder_conf)
    conf["layer"] = [dict(layer, _name_=attention) if layer["_name_"] in ("mha", "flash_mha") else layer
                     for layer in conf["layer"]]
    return argparse.Namespace(**{**vars(args), "decoder_conf": conf})


def training_checkpoint(model, *, steps=1):
    """``checkpoint.pth`` content as ESPnet's trainer saves it, after ``steps`` Adam steps."""
    from espnet2.schedulers.warmup_lr import WarmupLR
    from espnet2.train.reporter import Reporter

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = WarmupLR(optimizer, warmup_steps=10)
    reporter = Reporter()
    reporter.set_epoch(1)
    with reporter.observe("train") as sub:
        for _ in range(steps):
            loss, stats, weight = model(**batch())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            sub.register(stats, weight)
            sub.next()
    return {
        "model": model.state_dict(),
        "reporter": reporter.state_dict(),
        "optimizers": [optimizer.state_dict()],
        "schedulers": [scheduler.state_dict()],
        "scaler": None,
    }


def resume(path, model, make_optimizer=None):
    """ESPnet's ``Trainer.resume`` of ``path`` into ``model``, with the optimizer and scheduler
    :func:`training_checkpoint` saves (``make_optimizer(params)``, default Adam at 1e-3).

    Returns:
        (optimizer, scheduler, reporter).
    """
    import datetime

    from espnet2.schedulers.warmup_lr import WarmupLR
    from espnet2.train.reporter import Reporter
    from espnet2.train.trainer import Trainer

    optimizer = (make_optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3)))(model.parameters())
    scheduler = WarmupLR(optimizer, warmup_steps=10)
    reporter = Reporter()
    # ESPnet 202412 and before: Trainer.resume's torch.load without weights_only (True from torch 2.6)
    with torch.serialization.safe_globals([datetime.timedelta]):
        Trainer.resume(checkpoint=path, model=model, reporter=reporter, optimizers=[optimizer],
                       schedulers=[scheduler], scaler=None)
    return optimizer, scheduler, reporter


def batch(seed=0):
    """A padded batch of raw waveforms and token sequences (the model's forward arguments)."""
    gen = torch.Generator().manual_seed(seed)
    speech = torch.randn(2, 1600, generator=gen)
    speech_lengths = torch.tensor([1600, 1100])
    text = torch.randint(2, len(TOKENS) - 1, (2, 5), generator=gen)
    text_lengths = torch.tensor([5, 3])
    text[1, 3:] = -1
    return {"speech": speech, "speech_lengths": speech_lengths, "text": text, "text_lengths": text_lengths}


class Experiment:
    """A stock-``mha`` model's experiment folder as ESPnet leaves it after training.

    Attributes:
        model, args: the stock model (eval mode) and its training args.
        ave: ``valid.acc.ave.pth`` (flat state dict).
        stock_config, flash_config: ``config.yaml`` as written, and the same with
            ``flash_mha`` in the decoder (the one edit a user makes).
    """

    def __init__(self, root, *, seed=1):
        self.root = root
        self.model, self.args = build(root, "mha", seed=seed)
        self.ave = root / "valid.acc.ave.pth"
        torch.save(self.model.state_dict(), self.ave)
        self.stock_config = write_config(root / "config.yaml", self.args)
        (root / "flash").mkdir()
        self.flash_config = write_config(root / "flash" / "config.yaml", with_attention(self.args, "flash_mha"))

    def stock_state(self):
        """The saved state dict, freshly loaded (S4 kernels rewrite buffers in forward, so
        ``model.state_dict()`` drifts from the file once the model has run)."""
        return torch.load(self.ave, weights_only=True)

    def flash(self, *, seed=2, **layer_options):
        """A fresh ``flash_mha`` model with other initial weights than the stock one."""
        return build(self.root, "flash_mha", seed=seed, **layer_options)[0]
