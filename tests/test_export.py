"""Graphs captured from the layer (``torch.jit.trace``, ``torch.export``, the TorchScript
ONNX exporter that espnet_onnx uses) against the stock layer, on inputs other than the
capture example.

A capture keeps only the Python branches its example took. The layer's shortcuts
(skipping padded keys, the stride-0 memory and batch-1 cache of decoding, the mask
SDPA gets on CPU) depend on mask values, strides and sizes, so a captured graph
takes the stock computation instead (``compile_policy.capturing``); these tests run
each captured graph on other lengths, masks, batches and memories.
"""

import warnings

import pytest
import torch

from espnet_mha import packing
from espnet_mha.testing import stock_and_flash

pytestmark = pytest.mark.usefixtures("layout")

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def quiet_tracer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: what the tests check instead
        yield


def padding(lengths, t2):
    return (torch.arange(t2)[None, :] < torch.tensor(lengths)[:, None]).unsqueeze(1)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Forward(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, query, memory, mask):
        return self.layer(query, memory, mask)[0]


class NoMask(Forward):
    def forward(self, query, memory):
        return self.layer(query, memory)[0]


class Step(Forward):
    def forward(self, query, state, memory):
        return self.layer.step(query, state, memory=memory)[0]


class FirstStep(Forward):
    def forward(self, query, memory):
        return self.layer.step(query, None, memory=memory)[0]


def other_inputs():
    """(query, memory, mask): other lengths, no padding, a fully masked item, other B and T2."""
    return [
        (rand(2, 5, 32, seed=3), rand(2, 40, 32, seed=4), padding((13, 40), 40)),
        (rand(2, 5, 32, seed=5), rand(2, 40, 32, seed=6), padding((40, 40), 40)),
        (rand(2, 5, 32, seed=7), rand(2, 40, 32, seed=8), padding((0, 22), 40)),
        (rand(3, 2, 32, seed=9), rand(3, 57, 32, seed=10), padding((57, 9, 30), 57)),
    ]


def test_a_forward_traced_on_a_padded_batch_serves_other_masks(monkeypatch):
    """The padded-key skip read the example's lengths and dropped the mask from the trace."""
    monkeypatch.setattr(packing, "ITEM_COST_MACS", 0)  # the example would be split per item
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32)
    example = (rand(2, 5, 32, seed=1), rand(2, 40, 32, seed=2), padding((40, 8), 40))
    with torch.no_grad():
        traced = torch.jit.trace(Forward(ours), example, check_trace=False)
        for query, memory, mask in [example, *other_inputs()]:
            torch.testing.assert_close(traced(query, memory, mask), stock(query, memory, mask)[0], **FP32)


@pytest.mark.parametrize("keep_attn", [False, True])
def test_a_forward_traced_without_a_mask_serves_other_lengths_and_batches(keep_attn):
    """The all-True mask SDPA gets on CPU, and the math path's batch-1 shortcut, were
    frozen at the example's T2 and batch."""
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32, keep_attn=keep_attn)
    with torch.no_grad():
        traced = torch.jit.trace(NoMask(ours), (rand(1, 5, 32, seed=1), rand(1, 40, 32, seed=2)), check_trace=False)
        for query, memory, _ in other_inputs():
            torch.testing.assert_close(traced(query, memory), stock(query, memory)[0], **FP32)


def test_traced_decoding_steps_serve_distinct_memories_and_stale_states():
    """A step traced the way BatchBeamSearch calls it (memory expanded with stride 0; later a
    batch-1 state) kept item 0's memory for every item and skipped the stale-state check."""
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32)
    beam = rand(1, 20, 32, seed=1).expand(4, -1, -1)
    with torch.no_grad():
        _, state = ours.step(rand(1, 32, seed=2), None, memory=beam[:1])
        first = torch.jit.trace(FirstStep(ours), (rand(4, 32, seed=3), beam), check_trace=False)
        later = torch.jit.trace(Step(ours), (rand(4, 32, seed=3), state[:1], beam), check_trace=False)
        distinct, other = rand(4, 20, 32, seed=4), rand(1, 20, 32, seed=5).expand(4, -1, -1)
        query = rand(4, 32, seed=6)
        _, distinct_state = ours.step(query, None, memory=distinct)
        for memory, given_state in ((distinct, distinct_state), (other, state[:1])):  # the second is stale
            expected, _ = stock.step(query, None, memory=memory)
            torch.testing.assert_close(first(query, memory), expected, **FP32)
            torch.testing.assert_close(later(query, given_state, memory), expected, **FP32)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_an_exported_decoding_step_serves_other_memories(strict):
    """torch.export of a cached step failed on the cache's record (a data pointer)."""
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32)
    beam = rand(1, 20, 32, seed=1).expand(4, -1, -1)
    with torch.no_grad():
        _, state = ours.step(rand(1, 32, seed=2), None, memory=beam[:1])
        program = torch.export.export(Step(ours), (rand(4, 32, seed=3), state[:1], beam), strict=strict)
        query, memory = rand(4, 32, seed=4), rand(4, 20, 32, seed=5)
        torch.testing.assert_close(program.module()(query, state[:1], memory), stock.step(query, None, memory=memory)[0],
                                   **FP32)


def test_a_non_strict_export_of_a_hooked_layer_says_it_calls_its_linears(caplog):
    """Non-strict torch.export sets is_compiling() without Dynamo, where comptime runs only
    its fallback: the line saying the linears are called as modules was lost (a review)."""
    import logging

    stock, ours = stock_and_flash(8, 2, dtype=torch.float32)
    for layer in (stock, ours):
        layer.linear_out.register_forward_hook(lambda module, args, out: out * 2.0)
    query, memory = rand(2, 3, 8, seed=1), rand(2, 4, 8, seed=2)
    with caplog.at_level(logging.INFO, logger="espnet_mha"):
        program = torch.export.export(NoMask(ours), (query, memory), strict=False)
    assert [r.getMessage() for r in caplog.records if "as modules" in r.getMessage()], caplog.text
    torch.testing.assert_close(program.module()(query, memory), stock(query, memory)[0], **FP32)


@pytest.mark.parametrize("torch_tells_export_apart", [
    pytest.param(True, marks=pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting"), reason="torch < 2.7")),
    False,
])
def test_torch_compile_of_a_step_keeps_the_cache_where_torch_tells_it_from_export(torch_tells_export_apart,
                                                                                 monkeypatch):
    """Under torch.compile (unlike export) the cache stays: dynamo reads
    torch.compiler.is_exporting() as True there too, which must not switch it off.
    torch < 2.7 has neither that nor its flag (simulated), and cannot tell export from
    compile: a compiled step then takes the stock step (no cache), as an export must."""
    from espnet_mha import compile_policy

    if not torch_tells_export_apart:
        monkeypatch.setattr(compile_policy, "_exporting", lambda: None)
    torch._dynamo.reset()
    stock, ours = stock_and_flash(16, 2, dtype=torch.float32)
    step = torch.compile(ours.step, backend="eager")
    memory = rand(1, 6, 16, seed=1)
    with torch.no_grad():
        out, state = step(rand(1, 16, seed=2), None, memory=memory)
        torch.testing.assert_close(out, stock.step(rand(1, 16, seed=2), None, memory=memory)[0], **FP32)
        if torch_tells_export_apart:
            step(rand(3, 16, seed=3), state[:1], memory=memory.expand(3, -1, -1))
            assert ours.last_cache == "reused"
        else:
            assert state is None and ours.last_cache is None
    torch._dynamo.reset()


def test_the_torchscript_onnx_export_serves_other_shapes_and_masks(tmp_path, monkeypatch):
    """espnet_onnx exports decoders with torch.onnx's TorchScript exporter; run in onnxruntime."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(packing, "ITEM_COST_MACS", 0)
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32)
    example = (rand(2, 5, 32, seed=1), rand(2, 40, 32, seed=2), padding((40, 8), 40))
    axes = {"query": {0: "B", 1: "T1"}, "memory": {0: "B", 1: "T2"}, "mask": {0: "B", 2: "T2"}}
    for with_mask in (True, False):
        path = tmp_path / f"layer_{with_mask}.onnx"
        module, args, names = ((Forward(ours), example, ["query", "memory", "mask"]) if with_mask else
                               (NoMask(ours), example[:2], ["query", "memory"]))
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=["out"],
                              dynamic_axes={name: axes[name] for name in names}, opset_version=17)
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for query, memory, mask in other_inputs():
            feeds = {"query": query.numpy(), "memory": memory.numpy()}
            if with_mask:
                feeds["mask"] = mask.numpy()
            got = torch.from_numpy(session.run(None, feeds)[0])
            with torch.no_grad():
                expected, _ = stock(query, memory, mask if with_mask else None)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fx_symbolic_trace_gets_a_clear_error():
    _, ours = stock_and_flash(16, 2)
    with pytest.raises(TypeError, match=r"query is a torch.fx Proxy: .*keep it a leaf module"):
        torch.fx.symbolic_trace(Forward(ours), concrete_args={"mask": None})


def test_a_layer_built_with_compile_traces_eagerly():
    """jit.trace refuses dynamo-compiled functions: the layer's compile policy steps aside."""
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32, compile=True)
    example = (rand(2, 5, 32, seed=1), rand(2, 40, 32, seed=2), padding((40, 8), 40))
    with torch.no_grad():
        traced = torch.jit.trace(Forward(ours), example, check_trace=False)
        for query, memory, mask in other_inputs():
            torch.testing.assert_close(traced(query, memory, mask), stock(query, memory, mask)[0], **FP32)


def test_a_quantized_layer_refuses_to_be_traced_with_a_clear_error(layout):
    """The fused layer's re-quantized q/k/v parts are not submodules: it refuses. With the
    stock parameters each linear is quantized as in the stock layer, and it traces."""
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32)
    model = torch.ao.quantization.quantize_dynamic(Forward(ours), {torch.nn.Linear}, dtype=torch.qint8)
    example = (rand(2, 5, 32, seed=1), rand(2, 40, 32, seed=2), padding((40, 8), 40))
    if layout == "fused":
        with pytest.raises(RuntimeError, match=r"quantize_dynamic'd FlashMultiHeadedAttention cannot be traced"):
            torch.jit.trace(model, example)
        return
    reference = torch.ao.quantization.quantize_dynamic(Forward(stock), {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        for query, memory, mask in other_inputs():
            torch.testing.assert_close(traced(query, memory, mask), reference(query, memory, mask), **FP32)


@pytest.mark.parametrize("transform", ["vmap", "make_fx"])
def test_transforms_over_a_masked_call_match_stock(transform, monkeypatch):
    """The padded-key split reads the mask's values, which vmap and make_fx cannot give."""
    monkeypatch.setattr(packing, "ITEM_COST_MACS", 0)
    stock, ours = stock_and_flash(32, 4, dtype=torch.float32)
    query, memory = rand(3, 2, 5, 32, seed=1), rand(3, 2, 40, 32, seed=2)
    mask = torch.stack([padding((40, 8), 40), padding((3, 40), 40), padding((0, 21), 40)])
    if transform == "vmap":
        got = torch.func.vmap(lambda q, m, k: ours(q, m, k)[0])(query, memory, mask)
    else:
        graph = torch.fx.experimental.proxy_tensor.make_fx(lambda q, m, k: ours(q, m, k)[0])(query[0], memory[0], mask[0])
        got = torch.stack([graph(*inputs) for inputs in zip(query, memory, mask)])
    expected = torch.stack([stock(*inputs)[0] for inputs in zip(query, memory, mask)])
    torch.testing.assert_close(got, expected, **FP32)
