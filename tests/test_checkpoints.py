"""Whole ESPnet models: stock checkpoints load into flash_mha models, state dicts export back, wrapper prefixes.

Every model here is built by ESPnet's ``ASRTask`` from a recipe config (see
``espnet_asr.py``); the reference is the same model built with the stock ``mha``.
"""

import logging
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from espnet.nets.pytorch_backend.transformer.add_sos_eos import add_sos_eos

import espnet_asr
from espnet_mha import quantized
from espnet_mha.checkpoint import load_stock_or_fused, to_fused, to_stock
from espnet_mha.checkpoint_keys import fused_layers, stock_layers, strip_wrapper_prefixes
from espnet_mha.layer import FlashMultiHeadedAttention

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return espnet_asr.Experiment(tmp_path_factory.mktemp("exp"))


def outputs(model, seed=0):
    """(loss, decoder logits) of an ASR model on a fixed batch, fp32, eval mode."""
    b = espnet_asr.batch(seed)
    with torch.no_grad():
        loss, _, _ = model(**b)
        enc, enc_lens = model.encode(b["speech"], b["speech_lengths"])
        ys_in, _ = add_sos_eos(b["text"], model.sos, model.eos, model.ignore_id)
        logits, _ = model.decoder(enc, enc_lens, ys_in, b["text_lengths"] + 1)
    return loss, logits


_REFERENCE = {}


def assert_same_outputs(ours, reference):
    """Loss and decoder logits within 1e-5 (fp32); the reference's outputs are computed once."""
    if id(reference) not in _REFERENCE:
        _REFERENCE[id(reference)] = (reference, outputs(reference))
    for got, expected in zip(outputs(ours), _REFERENCE[id(reference)][1]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def assert_same_state(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


# ---------------------------------------------------------------- loading whole models
def test_stock_file_loads_strictly_and_gives_the_same_outputs(exp):
    ours = exp.flash()
    result = ours.load_state_dict(torch.load(exp.ave, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_outputs(ours, exp.model)
    # The encoder's attention has the same key names and is not touched.
    assert torch.equal(ours.encoder.encoders[0].self_attn.linear_q.weight,
                       exp.model.encoder.encoders[0].self_attn.linear_q.weight)


def test_training_checkpoint_model_entry_loads_strictly(exp):
    checkpoint = espnet_asr.training_checkpoint(espnet_asr.build(exp.root, "mha", seed=3)[0].train())
    stock, ours = espnet_asr.build(exp.root, "mha", seed=4)[0], exp.flash()
    stock.load_state_dict(checkpoint["model"], strict=True)
    ours.load_state_dict(checkpoint["model"], strict=True)
    assert_same_outputs(ours, stock)


def test_espnet_build_model_from_file_loads_stock_and_fused_files(exp, tmp_path):
    from espnet2.tasks.asr import ASRTask

    model, _ = ASRTask.build_model_from_file(exp.flash_config, exp.ave, "cpu")
    assert isinstance(model.decoder.decoder.layers[1].layer, FlashMultiHeadedAttention)
    assert_same_outputs(model.eval(), exp.model)
    fused = tmp_path / "fused.pth"
    torch.save(to_fused(exp.stock_state()), fused)
    model, _ = ASRTask.build_model_from_file(exp.flash_config, fused, "cpu")
    assert_same_outputs(model.eval(), exp.model)


@pytest.mark.parametrize("quantize", [None, "qint8", "float16"], ids=["float", "quantized_qint8", "quantized_float16"])
def test_asr_inference_beam_search_is_identical(exp, quantize):
    """asr_inference's Speech2Text, also with --quantize_asr_model true (quantize_dynamic
    swaps every nn.Linear, our fused projection included; it raised KeyError before)."""
    from espnet2.bin.asr_inference import Speech2Text

    speech = espnet_asr.batch()["speech"][0]
    options = {} if quantize is None else dict(quantize_asr_model=True, quantize_dtype=quantize)
    results = []
    for config in (exp.stock_config, exp.flash_config):
        speech2text = Speech2Text(asr_train_config=config, asr_model_file=exp.ave, device="cpu",
                                  beam_size=4, ctc_weight=0.3, nbest=3, **options)
        results.append(speech2text(speech))
    stock, ours = results
    layer = speech2text.asr_model.decoder.decoder.layers[4].layer
    assert isinstance(layer, FlashMultiHeadedAttention)
    if quantize:  # the fused projection was swapped, and q, k, v re-quantized as the stock layer's
        assert not quantized.is_plain(layer.linear_qkv) and quantized.projections(layer).exact
    assert [r[2] for r in ours] == [r[2] for r in stock]
    assert max(len(r[2]) for r in stock) > 2  # real hypotheses, not just <sos/eos>
    for (*_, got), (*_, expected) in zip(ours, stock):
        torch.testing.assert_close(got.score, expected.score, rtol=0, atol=1e-4)


LAYER = "decoder.decoder.layers.1.layer"


@pytest.mark.parametrize("ignore_init_mismatch", [False, True])
@pytest.mark.parametrize("init_param,loaded", [("{path}", "decoder."), ("{path}:decoder:decoder", "decoder."),
                                               (f"{{path}}:{LAYER}:{LAYER}", f"{LAYER}.")])
def test_espnet_init_param_loads_a_stock_file(exp, init_param, loaded, ignore_init_mismatch):
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    ours = exp.flash()
    load_pretrained_model(init_param.format(path=exp.ave), ours, ignore_init_mismatch=ignore_init_mismatch)
    got, expected = ours.state_dict(), to_fused(exp.stock_state())
    for key in [key for key in expected if key.startswith(loaded)]:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("ignore_init_mismatch", [False, True])
def test_espnet_init_param_can_exclude_part_of_our_layer(exp, ignore_init_mismatch):
    """--init_param file:::<layer>.linear_q keeps the model's current q and loads the rest,
    for our layer as for the stock one (it raised missing/unexpected keys before)."""
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    stock = espnet_asr.build(exp.root, "mha", seed=5)[0]
    ours = exp.flash()
    ours.load_state_dict(stock.state_dict(), strict=True)
    for model in (stock, ours):
        load_pretrained_model(f"{exp.ave}:::decoder.decoder.layers.1.layer.linear_q", model,
                              ignore_init_mismatch=ignore_init_mismatch)
    assert_same_outputs(ours, stock)


def test_a_model_built_as_mha_by_use_for_mha_reloads_in_stock_espnet(tmp_path, monkeypatch):
    """A config that says mha, trained with ESPNET_MHA_REPLACE_MHA=1: config.yaml says mha, so
    the checkpoint must load into the stock layer where the replacement is off. ESPnet's
    build_model_from_file loads with strict=False, so fused keys were dropped silently
    (random q/k/v) before; the layers built as mha now save the stock layout."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention
    from espnet2.tasks.asr import ASRTask

    import espnet_mha

    monkeypatch.setenv("ESPNET_MHA_REPLACE_MHA", "0")  # restored after the test
    espnet_mha.use_for_mha()
    try:
        ours, args = espnet_asr.build(tmp_path, "mha", seed=6)
    finally:
        espnet_mha.restore_mha()
    assert isinstance(ours.decoder.decoder.layers[1].layer, FlashMultiHeadedAttention)
    checkpoint = tmp_path / "valid.acc.ave.pth"
    torch.save(ours.state_dict(), checkpoint)
    config = espnet_asr.write_config(tmp_path / "config.yaml", args)
    stock, _ = ASRTask.build_model_from_file(config, checkpoint, "cpu")
    assert type(stock.decoder.decoder.layers[1].layer) is MultiHeadedAttention
    assert_same_outputs(stock.eval(), ours)


@pytest.mark.parametrize("file_layout", ["stock", "fused"])
def test_espnet_init_param_with_ignore_init_mismatch_loads_either_layout(exp, tmp_path, file_layout, caplog):
    """ESPnet's filter drops the file's keys that the model's state_dict() lacks before
    loading, so a stock file's linear_q/k/v never reached the fused layer (q, k and v stayed
    random; an independent probe: logits 0.35 off). espnet_mha.init_param matches them."""
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    path = exp.ave
    if file_layout == "fused":
        path = tmp_path / "fused.pth"
        torch.save(to_fused(exp.stock_state()), path)
    ours = exp.flash()
    with caplog.at_level(logging.INFO, logger="espnet_mha.init_param"):
        load_pretrained_model(str(path), ours, ignore_init_mismatch=True)
    assert_same_outputs(ours, exp.model)
    assert ("kept 12 stock q/k/v keys of 2 layer(s)" in caplog.text) == (file_layout == "stock")
    assert "Filter out" not in caplog.text


@pytest.mark.parametrize("file_layout", ["stock", "fused"])
@pytest.mark.parametrize("attention", ["mha", "flash_mha"])
def test_fine_tuning_on_a_new_vocabulary_keeps_the_attention_weights(exp, tmp_path, monkeypatch, attention,
                                                                    file_layout, caplog):
    """The recipe way to fine-tune on other tokens: --init_param with --ignore_init_mismatch,
    which filters the output layers (their size changed) and must load everything else. The
    same load into a stock model with the new vocabulary is the reference, key by key."""
    from espnet2.torch_utils.load_pretrained_model import load_pretrained_model

    path = exp.ave
    if file_layout == "fused":
        path = tmp_path / "fused.pth"
        torch.save(to_fused(exp.stock_state()), path)
    monkeypatch.setattr(espnet_asr, "TOKENS", [*espnet_asr.TOKENS, "new1", "new2"])
    stock = espnet_asr.build(tmp_path, "mha", seed=4)[0]
    ours = espnet_asr.build(tmp_path, attention, seed=4)[0]
    load_pretrained_model(str(exp.ave), stock, ignore_init_mismatch=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_pretrained_model(str(path), ours, ignore_init_mismatch=True)
    filtered = sorted(re.findall(r"Filter out (\S+) from pretrained dict because of size mismatch", caplog.text))
    assert filtered == ["ctc.ctc_lo.bias", "ctc.ctc_lo.weight", "decoder.embed.weight", "decoder.output.bias",
                        "decoder.output.weight"]
    assert "name not found" not in caplog.text
    assert_same_state(to_stock(ours.state_dict()), stock.state_dict())


def init_param_in_a_fresh_process(config, path, out, report, **env):
    """As asr_train does, in a fresh interpreter (the startup hook's, nothing of ours imported by
    hand): build the model from ``config``, load ``path`` with --init_param and
    --ignore_init_mismatch, save the model's state dict to ``out``, then run ``report`` (a line
    of Python that prints what the test checks). INFO logging goes to stderr.

    Returns:
        the finished ``subprocess.CompletedProcess`` (exit status 0 asserted).
    """
    code = (
        "import logging, sys, torch\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from espnet2.tasks.asr import ASRTask\n"
        "from espnet2.torch_utils.load_pretrained_model import load_pretrained_model\n"
        f"model, _ = ASRTask.build_model_from_file({str(config)!r}, None, 'cpu')\n"
        f"load_pretrained_model({str(path)!r}, model, ignore_init_mismatch=True)\n"
        f"torch.save(model.state_dict(), {str(out)!r})\n"
        f"{report}\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_an_espnet_entry_point_gets_the_filter_through_the_startup_hook(exp, tmp_path):
    """As asr_train: the model is built from a config naming flash_mha (our layer imported by
    ESPnet's registry, nothing imported by hand), then --init_param with
    --ignore_init_mismatch loads a stock file."""
    out = tmp_path / "loaded.pth"
    result = init_param_in_a_fresh_process(
        exp.flash_config, exp.ave, out,
        "print(sorted(m for m in sys.modules if m == 'espnet_mha' or m.startswith('espnet_mha.init')))")
    assert "['espnet_mha', 'espnet_mha.init_param']" in result.stdout
    loaded, expected = torch.load(out, weights_only=True), to_fused(exp.stock_state())
    for key in [key for key in expected if ".layer.linear_qkv." in key]:
        assert torch.equal(loaded[key], expected[key]), key


def test_a_stock_model_gets_the_filter_without_our_layer(exp, tmp_path):
    """A stock-only process (a config naming mha, our layer never built or imported) fine-tuning
    from a flash_mha file with --init_param --ignore_init_mismatch: ESPnet's filter dropped the
    fused linear_qkv, so q, k and v kept their random initialisation. The startup hook wraps
    the filter when ESPnet imports the S4 layer registry."""
    fused, out = tmp_path / "fused.pth", tmp_path / "loaded.pth"
    torch.save(to_fused(exp.stock_state()), fused)
    report = "print('layer imported:', 'espnet_mha.layer' in sys.modules)"
    result = init_param_in_a_fresh_process(exp.stock_config, fused, out, report)
    assert "layer imported: False" in result.stdout
    assert "split 4 fused linear_qkv keys" in result.stderr and "Filter out" not in result.stderr
    assert_same_state(torch.load(out, weights_only=True), exp.stock_state())
    # ESPNET_MHA_NO_HOOK leaves ESPnet's filter as it is (it drops the fused keys, with its warnings).
    result = init_param_in_a_fresh_process(exp.stock_config, fused, out, report, ESPNET_MHA_NO_HOOK="1")
    assert "name not found" in result.stderr and "split" not in result.stderr


def test_match_layouts_leaves_a_layer_with_both_layouts_in_the_file_to_espnet(caplog):
    """A file with both layouts for one layer is no checkpoint of either layer: ESPnet's filter
    decides, as before (the layer's load would warn and refuse the mix)."""
    from espnet_mha.init_param import match_layouts

    d = 4
    fused_model = {"a.linear_qkv.weight": torch.zeros(3 * d, d), "a.linear_qkv.bias": torch.zeros(3 * d)}
    both = {"a.linear_q.weight": torch.ones(d, d), "a.linear_qkv.bias": torch.ones(3 * d)}
    assert match_layouts(fused_model, both) == (both, set())
    wrong_shape = {"a.linear_q.weight": torch.ones(d + 1, d)}
    assert match_layouts(fused_model, wrong_shape) == (wrong_shape, set())
    stock_model = {f"a.{name}.weight": torch.zeros(d, d) for name in ("linear_q", "linear_k", "linear_v")}
    state, kept = match_layouts(stock_model, {"a.linear_qkv.weight": torch.arange(3.0 * d * d).view(3 * d, d)})
    assert list(state) == list(stock_model) and not kept
    assert torch.equal(state["a.linear_v.weight"], torch.arange(2.0 * d * d, 3.0 * d * d).view(d, d))


def test_match_layouts_passes_keys_that_are_not_names_to_espnet():
    """ESPnet's filter drops such a key with its warning; the regexes must not see it (a review)."""
    from espnet_mha.init_param import filter_state_dict

    dst = {"a.linear_qkv.weight": torch.zeros(6, 2)}
    src = {3: torch.ones(1), "a.linear_q.weight": torch.ones(2, 2)}
    assert list(filter_state_dict(dst, src)) == ["a.linear_q.weight"]


def test_the_wrappers_survive_a_reload_and_a_fresh_import_of_the_package():
    """A fresh import of our package in the same process (its modules purged from sys.modules)
    found no ESPnet function to keep and broke ESPnet's filter for every model (a review)."""
    code = """
import importlib, sys, torch
import espnet2.layers.create_adapter  # as ESPnet's tasks do
import espnet_mha.layer
import espnet2.torch_utils.load_pretrained_model as loader
import espnet2.layers.create_adapter_fn as adapter_fn
for name in [n for n in sys.modules if n == "espnet_mha" or n.startswith("espnet_mha.")]:
    del sys.modules[name]
import espnet_mha.layer
importlib.reload(sys.modules["espnet_mha.init_param"]).install()
importlib.reload(sys.modules["espnet_mha.lora_targets"]).install()
from espnet_mha import init_param, lora_targets
assert loader.filter_state_dict is init_param.filter_state_dict
assert init_param._ORIGINAL["filter_state_dict"].__module__ == loader.__name__
assert adapter_fn.create_lora_adapter is lora_targets.create_lora_adapter
assert lora_targets._ORIGINAL["create_lora_adapter"].__module__ == adapter_fn.__name__
assert espnet2.layers.create_adapter.create_adapter_fn_table["lora"] is lora_targets.create_lora_adapter
print(sorted(loader.filter_state_dict({"a.linear_qkv.weight": torch.zeros(6, 2)},
                                      {"a.linear_q.weight": torch.ones(2, 2), "b": torch.ones(1)})))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("['a.linear_q.weight']")


def test_the_filter_wrapper_is_installed_once_by_the_layer():
    import espnet2.torch_utils.load_pretrained_model as espnet_loader

    from espnet_mha import init_param

    assert espnet_loader.filter_state_dict is init_param.filter_state_dict and init_param.install()
    assert espnet_loader.filter_state_dict is init_param.filter_state_dict
    assert init_param._ORIGINAL["filter_state_dict"].__module__ == espnet_loader.__name__
    assert pickle.loads(pickle.dumps(espnet_loader.filter_state_dict)) is init_param.filter_state_dict


# ------------------------------------------------------------------------- export
def test_export_to_stock_loads_in_stock_espnet_and_gives_the_same_outputs(exp):
    ours = exp.flash(seed=7)
    stock = espnet_asr.build(exp.root, "mha", seed=8)[0]
    exported = to_stock(ours.state_dict())
    result = stock.load_state_dict(exported, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_outputs(ours, stock)
    assert list(exported) == list(stock.state_dict())


def test_round_trip_is_bit_identical_and_touches_only_our_layers(exp):
    original = exp.stock_state()
    fused = to_fused(original)
    assert fused_layers(fused) == espnet_asr.DECODER_ATTENTION
    assert stock_layers(fused, layer_pattern=None) == [espnet_asr.ENCODER_ATTENTION]
    assert list(fused) == list(exp.flash().state_dict())
    for key, value in fused.items():
        if "linear_qkv" not in key:
            assert value is original[key], key
    back = to_stock(fused)
    assert_same_state(back, original)
    assert back._metadata == original._metadata
    assert list(back._metadata) == list(original._metadata)


def test_to_fused_with_a_model_picks_its_layers(exp):
    ours = exp.flash()
    fused = to_fused(exp.stock_state(), model=ours, layer_pattern="no match")
    ours.load_state_dict(fused, strict=True)
    assert_same_outputs(ours, exp.model)
    assert to_fused(fused, model=ours).keys() == fused.keys()  # already fused: unchanged


def test_to_fused_takes_a_bare_layers_state_dict():
    """A single layer's stock state dict (top-level linear_q/k/v keys) is fused by
    ``to_fused`` without a model; before, it came back unchanged, without a word (an audit)."""
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    stock = MultiHeadedAttention(12, 3)
    fused = to_fused(stock.state_dict())
    assert list(fused) == ["linear_qkv.weight", "linear_qkv.bias", "linear_out.weight", "linear_out.bias"]
    ours = FlashMultiHeadedAttention(12, 3)
    ours.load_state_dict(fused, strict=True)
    assert_same_state(to_stock(ours.state_dict()), stock.state_dict())


def test_a_keep_vars_state_dict_converts_to_plain_tensors():
    """``state_dict(keep_vars=True)`` holds the parameters themselves: the converted entries
    are detached tensors with their values (tied to the parameters' graph, they could not
    be deep-copied, where the stock dict can: a probe); the others stay the parameters."""
    import copy

    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    stock = MultiHeadedAttention(12, 3)
    ours = FlashMultiHeadedAttention(12, 3)
    for convert, layer in ((to_fused, stock), (to_stock, ours)):
        converted = convert(layer.state_dict(keep_vars=True))
        for key, value in converted.items():
            if "linear_out" in key:
                assert value is layer.get_parameter(key)
            else:
                assert not value.requires_grad and value.grad_fn is None, key
        copy.deepcopy(converted)
        assert_same_state(converted, convert(layer.state_dict()))


def test_to_fused_that_converts_nothing_says_which_layers_it_left(exp, caplog):
    """Without a model, layers the pattern does not match are left as they are; when that is
    all of them, a warning names them and what to pass."""
    original = exp.stock_state()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        same = to_fused(original, layer_pattern=r"no\.such\.layer\.$")
    assert list(same) == list(original)
    assert "to_fused converted nothing" in caplog.text
    assert repr(espnet_asr.ENCODER_ATTENTION) in caplog.text and "pass model=" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        to_fused(original)  # the decoder's layers match: the encoder's are left alone, as meant
    assert "converted nothing" not in caplog.text
    # A model with no fused layer (here the stock model) converts nothing either, and says so.
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        assert list(to_fused(original, model=exp.model)) == list(original)
    assert "the model has no FlashMultiHeadedAttention with the fused linear_qkv" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        to_fused(original, model=exp.flash())
    assert "converted nothing" not in caplog.text


def test_our_compiled_layer_saves_plain_keys(exp):
    # The layer compiles module-level functions and never wraps itself (see compile_policy).
    ours = exp.flash(compile=True)
    assert ours.decoder.decoder.layers[1].layer.compile_setting is True
    assert list(ours.state_dict()) == list(exp.flash().state_dict())
    assert not [key for key in ours.state_dict() if "_orig_mod" in key]
    ours.load_state_dict(torch.load(exp.ave, weights_only=True), strict=True)


@pytest.mark.slow
def test_our_compiled_layer_saves_plain_keys_after_running_compiled(exp):
    ours = exp.flash(compile=True)
    ours.load_state_dict(torch.load(exp.ave, weights_only=True), strict=True)
    assert_same_outputs(ours, exp.model)
    assert list(ours.state_dict()) == list(exp.flash().state_dict())


# ------------------------------------------------------------------------ prefixes
@pytest.fixture
def process_group(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


WRAPPERS = {
    "compile": (torch.compile, ["_orig_mod."]),
    "dataparallel": (torch.nn.DataParallel, ["module."]),
    "ddp": (ddp, ["module."]),
    "ddp-of-compiled": (lambda m: ddp(torch.compile(m)), ["module.", "_orig_mod."]),
    "compiled-ddp": (lambda m: torch.compile(ddp(m)), ["_orig_mod.", "module."]),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_wrapped_state_dicts_load(exp, wrapper, process_group):
    wrap, prefixes = WRAPPERS[wrapper]
    saved = wrap(espnet_asr.build(exp.root, "mha", seed=1)[0]).state_dict()
    assert next(iter(saved)).startswith("".join(prefixes))
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict"):
        exp.flash().load_state_dict(saved)  # plain load_state_dict never strips prefixes
    clean, stripped = strip_wrapper_prefixes(saved)
    assert stripped == prefixes
    assert_same_state(clean, exp.stock_state())
    expected = to_fused(exp.stock_state())
    ours = exp.flash()
    load_stock_or_fused(ours, saved)
    assert_same_state(ours.state_dict(), expected)
    target = exp.flash()
    load_stock_or_fused(wrap(target), to_fused(saved))  # into a wrapped model, from a fused file
    assert_same_state(target.state_dict(), expected)


def test_load_stock_or_fused_unfuses_for_a_stock_model(exp):
    stock = espnet_asr.build(exp.root, "mha", seed=5)[0]
    load_stock_or_fused(stock, {f"module.{k}": v for k, v in to_fused(exp.stock_state()).items()})
    assert_same_state(stock.state_dict(), exp.stock_state())


def test_strip_wrapper_prefixes_inner_compiled_module_and_metadata():
    state = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state.add_module("1", torch.compile(torch.nn.Linear(2, 2)))
    saved = torch.nn.DataParallel(state).state_dict()
    assert list(saved) == ["module.0.weight", "module.0.bias", "module.1._orig_mod.weight", "module.1._orig_mod.bias"]
    clean, stripped = strip_wrapper_prefixes(saved)
    assert list(clean) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert stripped == ["module.", "_orig_mod."]
    assert set(clean._metadata) == {"", "0", "1"}
    assert strip_wrapper_prefixes({"module": torch.zeros(1)})[1] == []  # a key, not a prefix
    assert strip_wrapper_prefixes({"module.a": torch.zeros(1), "b": torch.zeros(1)})[1] == []


# -------------------------------------------------------------------------- errors
def test_wrong_attention_size_names_key_expected_and_found(exp, tmp_path):
    ours = espnet_asr.build(tmp_path, "flash_mha", d_model=48)[0]
    with pytest.raises(ValueError, match=r"decoder\.decoder\.layers\.1\.layer\.linear_q\.weight: "
                                         r"expected shape \(48, 48\) for n_feat=48, found \(32, 32\)"):
        ours.load_state_dict(torch.load(exp.ave, weights_only=True))
    with pytest.raises(ValueError, match=r"layers\.1\.layer\.linear_q\.weight: expected shape \(48, 48\) "
                                         r"for n_feat=48, found \(32, 32\)"):
        to_fused(exp.stock_state(), model=ours)
    with pytest.raises(RuntimeError, match=r"size mismatch for decoder\.decoder\.layers\.1\.layer\.linear_qkv\.weight: "
                                           r"copying a param with shape torch\.Size\(\[96, 32\]\) from checkpoint, "
                                           r"the shape in current model is torch\.Size\(\[144, 48\]\)"):
        ours.load_state_dict(to_fused(exp.stock_state()))


def test_inconsistent_stock_sizes_name_the_key(exp):
    state = exp.stock_state()
    state["decoder.decoder.layers.4.layer.linear_v.weight"] = torch.zeros(32, 16)
    with pytest.raises(ValueError, match=r"layers\.4\.layer\.linear_v\.weight: expected shape \(32, 32\) "
                                         r"for n_feat=32, found \(32, 16\)"):
        to_fused(state)


def test_half_converted_state_dict_names_the_missing_keys(exp):
    """A whole model's strict load names the absent stock key, as the stock model's does;
    the file converters refuse such a state dict."""
    state = exp.stock_state()
    del state["decoder.decoder.layers.4.layer.linear_k.weight"]
    missing = r"missing \['decoder\.decoder\.layers\.4\.layer\.linear_k\.weight'\]"
    messages = []
    for model in (espnet_asr.build(exp.root, "mha", seed=2)[0], exp.flash()):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict") as error:
            model.load_state_dict(state)
        messages.append(str(error.value).replace("ESPnetASRModel", ""))
    assert messages[0] == messages[1]
    assert '"decoder.decoder.layers.4.layer.linear_k.weight"' in messages[1]
    with pytest.raises(KeyError, match=missing):
        to_fused(state)
    fused = to_fused(exp.stock_state())
    del fused["decoder.decoder.layers.1.layer.linear_qkv.bias"]
    with pytest.raises(KeyError, match=r"missing \['decoder\.decoder\.layers\.1\.layer\.linear_qkv\.bias'\]"):
        to_stock(fused)


def test_both_layouts_are_refused(exp, caplog):
    state = to_fused(exp.stock_state())
    state["decoder.decoder.layers.1.layer.linear_q.weight"] = torch.zeros(32, 32)
    with pytest.raises(KeyError, match=r"at 'decoder\.decoder\.layers\.1\.layer\.' has both fused keys and stock "
                                       r"\['decoder\.decoder\.layers\.1\.layer\.linear_q\.weight'\]"):
        to_stock(state)
    # Foreign fused tensors next to stock ones (not the --init_param pattern) stay refused.
    mixed = dict(exp.stock_state(), **{"decoder.decoder.layers.1.layer.linear_qkv.weight": torch.zeros(96, 32),
                                            "decoder.decoder.layers.1.layer.linear_qkv.bias": torch.zeros(96)})
    with caplog.at_level(logging.WARNING, logger="espnet_mha.state_dict"):
        with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "decoder\.decoder\.layers\.1\.layer\.linear_q\.weight"'):
            exp.flash().load_state_dict(mixed)
    assert "has both stock keys and fused" in caplog.text


@pytest.mark.parametrize("key, shape, message", [
    ("weight", (96, 16), r"linear_qkv\.weight: expected shape \(3D, D\) = \(48, 16\), found \(96, 16\)"),
    ("bias", (32,), r"linear_qkv\.bias: expected shape \(96,\), found \(32,\)"),
])
def test_fused_shapes_are_checked_on_export(exp, key, shape, message):
    state = to_fused(exp.stock_state())
    state[f"decoder.decoder.layers.1.layer.linear_qkv.{key}"] = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):
        to_stock(state)


def test_argument_errors(exp):
    ours = exp.flash()
    prefixed = {f"module.{k}": v for k, v in exp.stock_state().items()}
    with pytest.raises(KeyError, match=r"the model's attention layer 'decoder\.decoder\.layers\.1\.layer\.' has "
                                       r"neither linear_q/k/v nor linear_qkv keys .*strip_wrapper_prefixes"):
        to_fused(prefixed, model=ours)
    with pytest.raises(ValueError, match=r"layer_pattern '\(' is not a valid regular expression"):
        to_fused(exp.stock_state(), layer_pattern="(")
    with pytest.raises(TypeError, match=r"looks like an ESPnet training checkpoint .*pass checkpoint\['model'\]"):
        load_stock_or_fused(ours, {"model": exp.stock_state(), "optimizers": []})
    with pytest.raises(ValueError, match=r"keys 'x\._orig_mod\.w' and 'x\.w' both become 'x\.w' without wrapper"):
        strip_wrapper_prefixes({"x._orig_mod.w": torch.zeros(1), "x.w": torch.zeros(1)})


def test_a_lightning_checkpoint_is_named_and_a_load_of_nothing_warns(exp, caplog):
    """An audit: a Lightning *.ckpt, or its state_dict (keys under "model."), loaded with
    strict=False into the ESPnet model left every weight as it was, without a word."""
    ours = exp.flash()
    lightning = {f"model.{k}": v for k, v in exp.stock_state().items()}
    with pytest.raises(TypeError, match=r"looks like a Lightning checkpoint .*pass its 'state_dict' entry"):
        load_stock_or_fused(ours, {"state_dict": lightning, "pytorch-lightning_version": "2.5.0"}, strict=False)
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        result = load_stock_or_fused(ours, lightning, strict=False)
    assert len(result.unexpected_keys) == len(lightning)
    assert "load_stock_or_fused loaded nothing: no key of the state dict is the model's (e.g. 'model." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="espnet_mha.checkpoint"):
        load_stock_or_fused(ours, exp.stock_state(), strict=False)
    assert "loaded nothing" not in caplog.text


def test_asr_inference_streaming_is_identical(tmp_path):
    """asr_inference --streaming true: a contextual-block encoder and the S4 decoder under
    ESPnet's BatchBeamSearchOnlineSim, which keeps decoder states while the encoder
    output grows block by block (our cached layer raised here before)."""
    from espnet2.bin.asr_inference import Speech2Text

    encoder_conf = {"output_size": espnet_asr.D_MODEL, "attention_heads": 2, "linear_units": 64, "num_blocks": 1,
                    "dropout_rate": 0.0, "positional_dropout_rate": 0.0, "attention_dropout_rate": 0.0,
                    "input_layer": "conv2d", "block_size": 6, "hop_size": 2, "look_ahead": 2}
    model, args = espnet_asr.build(tmp_path, "mha", seed=1, encoder="contextual_block_transformer",
                                   encoder_conf=encoder_conf)
    torch.save(model.state_dict(), tmp_path / "valid.acc.ave.pth")
    configs = [espnet_asr.write_config(tmp_path / "config.yaml", args)]
    (tmp_path / "flash").mkdir()
    configs.append(espnet_asr.write_config(tmp_path / "flash" / "config.yaml",
                                           espnet_asr.with_attention(args, "flash_mha")))
    speech = torch.randn(16000, generator=torch.Generator().manual_seed(3))
    results = []
    for config in configs:
        speech2text = Speech2Text(asr_train_config=config, asr_model_file=tmp_path / "valid.acc.ave.pth",
                                  device="cpu", beam_size=3, ctc_weight=0.3, nbest=2, streaming=True)
        assert type(speech2text.beam_search).__name__ == "BatchBeamSearchOnlineSim"
        results.append(speech2text(speech))
    layer = speech2text.asr_model.decoder.decoder.layers[1].layer
    assert isinstance(layer, FlashMultiHeadedAttention)
    stock, ours = results
    assert [r[2] for r in ours] == [r[2] for r in stock] and len(stock[0][2]) > 2
    for (*_, got), (*_, expected) in zip(ours, stock):
        torch.testing.assert_close(got.score, expected.score, rtol=0, atol=1e-4)
