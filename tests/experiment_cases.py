"""Shared by the experiment-folder tests: a flash_mha experiment folder as asr_train leaves it (the
command line is ``convert_cases.run``)."""

import torch

import espnet_asr


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


def espnet_globals():
    """The classes an ESPnet checkpoint.pth holds besides tensors (its reporter's times, numpy
    scalars and dtypes), as --allow-global names."""
    import numpy

    scalar = numpy.float64(0).__reduce__()[0]
    return ["datetime.timedelta", "numpy.dtype", f"{scalar.__module__}.{scalar.__name__}"]
