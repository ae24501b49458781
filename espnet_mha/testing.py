"""Reference pairs and ESPnet decoders, built the way our tests and benchmarks compare them.

Public so that users can check their own configurations against the stock
layer: every "ours" here gets its weights from the stock object through plain
``load_state_dict`` (our adapter), never by copying our own parameters.
"""

import torch

from espnet_mha.registration import FLASH_MHA, STOCK_MHA, register


def stock_and_flash(n_feat, n_head, *, dtype=torch.float64, device="cpu", seed=0, **options):
    """A stock ``MultiHeadedAttention`` and our layer with the same weights, in eval mode.

    Args:
        n_feat, n_head: layer sizes.
        dtype, device: where both layers live.
        seed: seeds the stock layer's initialisation.
        **options: extra constructor options of our layer (``causal``, ``backend``...).

    Returns:
        (stock, ours).
    """
    from espnet2.asr.state_spaces.attention import MultiHeadedAttention

    from espnet_mha.layer import FlashMultiHeadedAttention

    torch.manual_seed(seed)
    stock = MultiHeadedAttention(n_feat, n_head)
    ours = FlashMultiHeadedAttention(n_feat, n_head, **options)
    ours.load_state_dict(stock.state_dict())
    return stock.to(device, dtype).eval(), ours.to(device, dtype).eval()


def under_stock_names(named):
    """``{name: tensor}`` of our layer (its parameters, or their gradients, by
    ``named_parameters()`` name) under the stock layer's names: the fused
    ``linear_qkv`` rows split into ``linear_q/k/v`` (copies), the stock parameters
    (``state_dict_layout="stock"``) as they are. For comparing with the stock layer."""
    from espnet_mha.fused_keys import unfuse_keys

    named = dict(named)
    unfuse_keys(named, "")
    return named


def s4_layer_config(name, *, n_head=4, **options):
    """``decoder_conf.layer`` of an ESPnet S4 decoder: ``[s4, <name>, ff]``."""
    return [
        {"_name_": "s4", "keops": False},
        {"_name_": name, "n_head": n_head, **options},
        {"_name_": "ff"},
    ]


def build_s4_decoder(layer_name, *, vocab_size=500, d_model=256, n_layers=6, n_head=4,
                     seed=0, layer_options=None, **decoder_kwargs):
    """ESPnet's own ``S4Decoder`` with ``[s4, layer_name, ff]`` layers.

    Args:
        layer_name: ``"mha"`` (stock) or ``"flash_mha"`` (ours).
        seed: seeds the initialisation (the same seed gives the same weights for
            both layer names, since our layer initialises q/k/v like the stock one).
        layer_options: extra options of the attention layer.
        **decoder_kwargs: other ``S4Decoder`` arguments (``prenorm``, ``norm``...).
            ``norm`` defaults to ``"layer"`` and ``dropout`` to 0.

    Returns:
        S4Decoder.
    """
    from espnet2.asr.decoder.s4_decoder import S4Decoder

    register()
    decoder_kwargs.setdefault("norm", "layer")
    decoder_kwargs.setdefault("dropout", 0.0)
    torch.manual_seed(seed)
    return S4Decoder(
        vocab_size=vocab_size,
        encoder_output_size=d_model,
        n_layers=n_layers,
        layer=s4_layer_config(layer_name, n_head=n_head, **(layer_options or {})),
        **decoder_kwargs,
    )


def s4_decoder_pair(*, dtype=torch.float64, layer_options=None, **kwargs):
    """A stock-``mha`` S4Decoder and its ``flash_mha`` twin with the stock weights.

    Args:
        dtype: dtype of both decoders.
        layer_options: extra options of our attention layer.
        **kwargs: :func:`build_s4_decoder` arguments shared by both.

    Returns:
        (stock, ours); ours loaded the stock state dict with strict ``load_state_dict``.
    """
    stock = build_s4_decoder(STOCK_MHA, **kwargs)
    ours = build_s4_decoder(FLASH_MHA, layer_options=layer_options, **kwargs)
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock.to(dtype), ours.to(dtype)


def prepare_for_decoding(decoder):
    """Eval mode and S4's ``setup_step`` (what ``asr_inference`` does before beam search)."""
    decoder.eval()
    for module in decoder.modules():
        if hasattr(module, "setup_step"):
            module.setup_step()
    return decoder


def beam_search(decoder, *, beam_size=10, vocab_size=None):
    """ESPnet's ``BatchBeamSearch`` with the decoder as the only scorer (sos = eos = V - 1)."""
    from espnet.nets.batch_beam_search import BatchBeamSearch

    vocab_size = vocab_size or decoder.odim
    search = BatchBeamSearch(
        scorers={"decoder": decoder},
        weights={"decoder": 1.0},
        beam_size=beam_size,
        vocab_size=vocab_size,
        sos=vocab_size - 1,
        eos=vocab_size - 1,
        pre_beam_score_key=None,
    )
    return search.eval()


__all__ = [
    "beam_search",
    "build_s4_decoder",
    "prepare_for_decoding",
    "s4_decoder_pair",
    "s4_layer_config",
    "stock_and_flash",
]
