"""ESPnet's own S4Decoder and BatchBeamSearch with flash_mha against the stock mha."""

import pytest
import torch
from espnet2.asr.state_spaces import registry
from espnet2.asr.state_spaces.attention import MultiHeadedAttention

from conftest import assert_same_nbest
from espnet_mha.checkpoint import to_stock
from espnet_mha.testing import build_s4_decoder, s4_decoder_pair

pytestmark = pytest.mark.usefixtures("layout")


class TransposedStock(MultiHeadedAttention):
    """The stock layer made to honour transposed=True (it ignores the flag): the reference
    for decoders built with SequenceModel(transposed=True)."""

    def __init__(self, *args, transposed=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout_transposed = transposed

    def forward(self, query, memory=None, mask=None, *args, **kwargs):
        if not self.layout_transposed or query.dim() != 3:  # step() passes (B, D)
            return super().forward(query, memory, mask)
        out, _ = super().forward(query.transpose(1, 2), memory, mask)
        return out.transpose(1, 2), None


@pytest.fixture
def transposed_stock_name():
    registry.layer["stock_mha_transposed"] = TransposedStock
    yield "stock_mha_transposed"
    del registry.layer["stock_mha_transposed"]


GRID = [
    dict(prenorm=True, n_layers=1, residual=None, norm="layer", drop_path=0.0),
    dict(prenorm=True, n_layers=2, residual="R", norm="layer", drop_path=0.0),
    dict(prenorm=False, n_layers=2, residual="R", norm="layer", drop_path=0.1),
    dict(prenorm=True, n_layers=3, residual="H", norm="batch", drop_path=0.0),
    dict(prenorm=False, n_layers=1, residual="D", norm="none", drop_path=0.0),
    dict(prenorm=True, n_layers=2, residual="R", norm="layer", drop_path=0.2, transposed=True),
    dict(prenorm=False, n_layers=2, residual="F", norm="layer", drop_path=0.0, transposed=True),
]


def grid_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def batch(vocab, d_model, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(3, 11, d_model, generator=gen, dtype=dtype)
    hlens = torch.tensor([11, 7, 4])
    ys = torch.randint(0, vocab, (3, 6), generator=gen)
    ylens = torch.tensor([6, 6, 2])
    return hs, hlens, ys, ylens


def make_pair(cfg, reference_name, dtype=torch.float64, **extra):
    cfg = dict(cfg)
    residual = cfg.pop("residual")
    kwargs = dict(vocab_size=13, d_model=24, n_head=3, seed=5, residual=None if residual is None else {"_name_": residual}, **cfg, **extra)
    stock = build_s4_decoder(reference_name, **kwargs)
    ours = build_s4_decoder("flash_mha", **kwargs)
    ours.load_state_dict(stock.state_dict(), strict=True)
    return stock.to(dtype), ours.to(dtype)


@pytest.mark.parametrize("cfg", GRID, ids=grid_id)
def test_forward_backward_and_decoding_match_stock(cfg, transposed_stock_name):
    reference = transposed_stock_name if cfg.get("transposed") else "mha"
    stock, ours = make_pair(cfg, reference)
    hs, hlens, ys, ylens = batch(13, 24, torch.float64)

    # Eval: the same logits.
    stock.eval(), ours.eval()
    expected, _ = stock(hs, hlens, ys, ylens)
    got, _ = ours(hs, hlens, ys, ylens)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    # Training with dropout / drop path: runs and gives finite gradients.
    ours.train()
    ours(hs, hlens, ys, ylens)[0].logsumexp(-1).sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in ours.parameters())

    # Training without randomness: the same gradients as the stock decoder.
    if not cfg["drop_path"]:
        for model in (stock, ours):
            model.zero_grad()
            model.train()
            model(hs, hlens, ys, ylens)[0].logsumexp(-1).sum().backward()
        stock_grads, our_grads = stock_layout_grads(stock), stock_layout_grads(ours)
        assert our_grads.keys() == stock_grads.keys()
        for name, expected in stock_grads.items():
            torch.testing.assert_close(our_grads[name], expected, rtol=1e-9, atol=1e-10, msg=name)


def stock_layout_grads(model):
    """Every parameter's gradient under its stock name: a fused q/k/v gradient is split as
    ``to_stock`` splits the fused weight and bias (the stock model's names pass through)."""
    return to_stock({name: p.grad for name, p in model.named_parameters()})


# The decoder's own randomness and repetition options (found untested by a probe): the
# attention dropout, S4Decoder's input dropout, drop path, tied dropout, repeated layers.
RANDOM_CFGS = [
    dict(prenorm=True, n_layers=2, residual="R", dropout=0.3),
    dict(prenorm=False, n_layers=1, residual="R", dropout=0.1, dropinp=0.2, tie_dropout=True),
    dict(prenorm=True, n_layers=2, residual="R", dropout=0.1, drop_path=0.2, n_repeat=2, track_norms=False),
]


@pytest.mark.parametrize("cfg", RANDOM_CFGS, ids=grid_id)
def test_training_with_dropout_draws_the_stock_random_numbers(cfg):
    """Under the same seed, a training step of the whole decoder gives the stock decoder's
    logits, gradients and RNG state: our attention dropout draws what the stock layer draws."""
    stock, ours = make_pair(cfg, "mha")
    hs, hlens, ys, ylens = batch(13, 24, torch.float64)
    results = []
    for model in (stock, ours):
        model.train()
        torch.manual_seed(11)
        logits, _ = model(hs, hlens, ys, ylens)
        logits.logsumexp(-1).sum().backward()
        results.append((logits, stock_layout_grads(model), torch.get_rng_state()))
    (expected, stock_grads, stock_rng), (got, our_grads, our_rng) = results
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert our_grads.keys() == stock_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)
    assert torch.equal(our_rng, stock_rng)


@pytest.mark.parametrize("dtype,score_tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cfg", [GRID[1], GRID[3], GRID[6]], ids=grid_id)
def test_beam_search_hypotheses_match_stock(cfg, dtype, score_tol, transposed_stock_name):
    reference = transposed_stock_name if cfg.get("transposed") else "mha"
    stock, ours = make_pair(cfg, reference, dtype=dtype)
    x = torch.randn(17, 24, dtype=dtype, generator=torch.Generator().manual_seed(1))
    assert_same_nbest(stock, ours, x, beam=4, maxlenratio=0.5, score_tol=score_tol)


def test_pair_helper_loads_stock_weights_strictly(layout):
    stock, ours = s4_decoder_pair(vocab_size=9, d_model=8, n_layers=1, n_head=2)
    keys = set(ours.state_dict())
    assert ("decoder.layers.1.layer.linear_qkv.weight" in keys) == (layout == "fused")
    assert "decoder.layers.1.layer.linear_q.weight" in set(stock.state_dict())


@pytest.mark.parametrize("dtype,score_tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("length_limit", [0, 12], ids=["growing", "sliding"])
def test_streaming_beam_search_matches_stock(length_limit, dtype, score_tol):
    """ESPnet's blockwise streaming search (BatchBeamSearchOnline, asr_inference
    --streaming true) keeps the decoder states while the encoder output grows
    block by block, or slides with encoded_feat_length_limit: the cached layer
    must recompute its keys for each new memory (it raised before)."""
    from espnet.nets.batch_beam_search_online import BatchBeamSearchOnline

    from espnet_mha.testing import prepare_for_decoding

    stock, ours = s4_decoder_pair(vocab_size=20, d_model=32, n_layers=2, n_head=4, seed=0, dtype=dtype)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for model in (stock, ours):
        search = BatchBeamSearchOnline(
            scorers={"decoder": prepare_for_decoding(model)}, weights={"decoder": 1.0}, beam_size=3, vocab_size=20,
            sos=19, eos=19, pre_beam_score_key=None, block_size=16, hop_size=8, look_ahead=4,
            encoded_feat_length_limit=length_limit, disable_repetition_detection=True,
        ).eval()
        search.reset()
        with torch.no_grad():
            for start in range(0, 40, 8):  # feed the encoder output in chunks, as asr_inference_streaming does
                hyps = search(x[start:start + 8], maxlenratio=0.0, minlenratio=0.0, is_final=start + 8 >= 40)
        results.append(hyps)
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        assert a.yseq.tolist() == b.yseq.tolist()
        assert abs(float(a.score) - float(b.score)) <= score_tol
