"""Whole ESPnet models load stock and fused files: strict loads, build_model_from_file, asr_inference decoding."""

import pytest
import torch

import espnet_asr
from checkpoint_cases import assert_same_outputs
from espnet_mha import quantized
from espnet_mha.checkpoint import to_fused
from espnet_mha.layer import FlashMultiHeadedAttention

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


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
