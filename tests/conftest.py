"""Shared fixtures: seeded random attention cases compared with the stock ESPnet layer, the
flash-attn stand-in, and a stock ESPnet experiment folder."""

import random
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import espnet_mha  # noqa: F401  (registers flash_mha)
from espnet_mha import optional
from espnet_mha.testing import beam_search, prepare_for_decoding


@dataclass
class Case:
    """One random attention call: sizes, inputs and a mask (nonzero = keep)."""

    seed: int
    n_feat: int
    n_head: int
    batch: int
    t1: int
    t2: int
    self_attention: bool
    mask_layout: str  # none | key | query | key-b1 | query-b1
    mask_dtype: torch.dtype

    def tensors(self, dtype=torch.float64, scale=1.0):
        """(query, memory or None, mask or None), generated from the seed."""
        gen = torch.Generator().manual_seed(self.seed)
        query = torch.randn(self.batch, self.t1, self.n_feat, generator=gen, dtype=dtype) * scale
        memory = None
        if not self.self_attention:
            memory = torch.randn(self.batch, self.t2, self.n_feat, generator=gen, dtype=dtype) * scale
        t2 = self.t1 if self.self_attention else self.t2
        return query, memory, self.mask(t2, gen)

    def mask(self, t2, gen):
        if self.mask_layout == "none":
            return None
        b = 1 if self.mask_layout.endswith("b1") else self.batch
        m = self.t1 if self.mask_layout.startswith("query") else 1
        keep = torch.rand(b, m, t2, generator=gen) > 0.35
        # Fully masked rows (and, for batch-1 masks, a fully masked batch) on purpose.
        if torch.rand((), generator=gen) < 0.5:
            keep[torch.randint(b, (), generator=gen), torch.randint(m, (), generator=gen)] = False
        if self.mask_dtype == torch.bool:
            return keep
        if self.mask_dtype.is_floating_point:
            # Any nonzero value keeps, including negatives (ESPnet's rule, not additive).
            return keep.to(self.mask_dtype) * torch.where(torch.rand(keep.shape, generator=gen) > 0.5, 1.0, -2.5)
        return keep.to(self.mask_dtype)


def random_case(seed):
    """A seeded random configuration, head sizes 1..16 including non powers of two."""
    rng = random.Random(seed)
    n_head = rng.choice([1, 2, 3, 4, 5, 8])
    d_k = rng.choice([1, 2, 3, 5, 6, 7, 8, 12, 16])
    return Case(
        seed=seed,
        n_feat=n_head * d_k,
        n_head=n_head,
        batch=rng.choice([1, 1, 2, 3, 5]),
        t1=rng.choice([1, 2, 3, 7, 13]),
        t2=rng.choice([1, 2, 5, 9, 17]),
        self_attention=rng.random() < 0.3,
        mask_layout=rng.choice(["none", "key", "key", "query", "key-b1", "query-b1"]),
        mask_dtype=rng.choice([torch.bool, torch.bool, torch.int64, torch.uint8, torch.float32]),
    )


CASE_SEEDS = list(range(40))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use small tensors: one intra-op thread avoids OpenMP overhead
    and oversubscription on a shared machine (the benchmarks keep the default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=CASE_SEEDS, ids=lambda s: f"seed{s}")
def case(request):
    return random_case(request.param)


def assert_same_nbest(stock, ours, x, *, beam, maxlenratio, score_tol):
    """ESPnet's BatchBeamSearch over both decoders gives the same n-best (tokens, scores)."""
    results = []
    for model in (stock, ours):
        search = beam_search(prepare_for_decoding(model), beam_size=beam)
        with torch.no_grad():
            results.append(search(x, maxlenratio=maxlenratio, minlenratio=0.0))
    assert len(results[0]) == len(results[1]) > 0
    for a, b in zip(*results):
        assert a.yseq.tolist() == b.yseq.tolist()
        assert abs(float(a.score) - float(b.score)) <= score_tol


@pytest.fixture(scope="module", params=["fused", "stock"])
def layout(request):
    """Runs a module's tests with each parameter layout as our layer's default
    (``state_dict_layout``: one fused ``linear_qkv``, or the stock ``linear_q/k/v``)."""
    from espnet_mha.layer import FlashMultiHeadedAttention

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(FlashMultiHeadedAttention.__init__.__kwdefaults__, "state_dict_layout", request.param)
        yield request.param


@pytest.fixture(autouse=True)
def _fused_only(request):
    """Skips a test marked ``fused_only`` (it is about the fused ``linear_qkv``) under the
    stock parameter layout."""
    if request.node.get_closest_marker("fused_only") and "layout" in request.fixturenames \
            and request.getfixturevalue("layout") == "stock":
        pytest.skip("about the fused linear_qkv")


def quantize(model, dtype):
    with warnings.catch_warnings():  # torch's deprecation notice for the eager quantization API
        warnings.simplefilter("ignore")
        return torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype=dtype)


class LowRankLinear(nn.Linear):
    """What loralib's ``Linear`` does in training: its forward adds a low-rank update."""

    def __init__(self, linear, rank=2):
        super().__init__(linear.in_features, linear.out_features, dtype=linear.weight.dtype)
        self.load_state_dict(linear.state_dict())
        gen = torch.Generator().manual_seed(rank)
        self.lora_a = nn.Parameter(torch.randn(rank, self.in_features, generator=gen, dtype=self.weight.dtype))
        self.lora_b = nn.Parameter(torch.randn(self.out_features, rank, generator=gen, dtype=self.weight.dtype))

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


def assert_layers_agree(ours, stock, tol):
    """Our layer and the stock one (same weights, possibly quantized) agree on seeded
    inputs (16 features): forward (cross, masked, self), a cached beam of steps as
    BatchBeamSearch makes them, a masked step, and the forward_qkv helper."""
    dtype = next(stock.parameters()).dtype if list(stock.parameters()) else torch.float32
    gen = torch.Generator().manual_seed(0)
    query, memory = torch.randn(3, 4, 16, generator=gen, dtype=dtype), torch.randn(3, 6, 16, generator=gen, dtype=dtype)
    mask = torch.randn(3, 1, 6, generator=gen) > -0.3
    for args in ((query, memory, mask), (query, memory, None), (query, None, None)):
        torch.testing.assert_close(ours(*args)[0], stock(*args)[0], **tol)
    shared = memory[:1].expand(3, -1, -1)
    _, state = ours.step(query[:1, 0], None, memory=shared[:1])
    assert ours.last_cache == "filled"
    for t in range(1, 4):
        got, state = ours.step(query[:, t], state[:1], memory=shared)
        torch.testing.assert_close(got, stock.step(query[:, t], None, memory=shared)[0], **tol)
        assert ours.last_cache == "reused"
    got, _ = ours.step(query[:, 0], None, memory=memory, mask=mask)
    torch.testing.assert_close(got, stock.step(query[:, 0], None, memory=memory, mask=mask)[0], **tol)
    for got, expected in zip(ours.forward_qkv(query, memory, memory), stock.forward_qkv(query, memory, memory)):
        torch.testing.assert_close(got, expected, **tol)


@pytest.fixture
def standin(monkeypatch):
    """flash-attn's CPU stand-in (``flash_attn_standin``) as the installed flash-attn."""
    import flash_attn_standin

    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin)
    optional.reset()
    flash_attn_standin.calls.clear()
    yield flash_attn_standin
    optional.reset()


@pytest.fixture
def sm90(monkeypatch):
    """CUDA devices report compute capability 9.0 (what flash-attn's kernels need)."""
    monkeypatch.setattr(optional, "device_capability", lambda device: (9, 0) if device.type == "cuda" else None)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """A stock model's experiment folder (:class:`espnet_asr.Experiment`), one per test module."""
    import espnet_asr  # ESPnet's ASR task: imported by the modules that use it only

    return espnet_asr.Experiment(tmp_path_factory.mktemp("exp"))
