"""Shared by the optimizer-state tests: conformer ASR models trained in fp64, and a tiny hand-made state.

The reference is ESPnet's stock model trained by a stock optimizer; after converting
``checkpoint.pth``, ESPnet's ``Trainer.resume`` loads it into the other layout and a few
more steps must give the stock run's parameters (fp64).
"""

import torch

import espnet_asr


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
