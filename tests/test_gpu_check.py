"""The one-command GPU check runs end to end (here as its CPU dry run, so it cannot rot), and
its flash-attn cases exercise their flash-attn branch against the CPU stand-in."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_cases, gpu_check
from espnet_mha import dispatch, masks, optional

import flash_attn_standin

CPU = torch.device("cpu")
NEW_CASES = {
    "causal_self_attention": gpu_cases.check_causal,
    "holed_masks": gpu_cases.check_holed_masks,
    "fragile_lengths": gpu_cases.check_fragile_lengths,
    "expanded_state_step": gpu_check.check_expanded_state_steps,
    "dropout_train": gpu_cases.check_dropout,  # also records dropout_eval
}


@pytest.mark.slow
def test_gpu_all_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_all.sh, what runs on a lent GPU, runs every step here at small sizes."""
    # LIMIT_SCALE: the steps' limits are the GPU's; here a loaded machine passed them (a flaky
    # failure). The timeout: the scaled limits' sum (590 s each) and a margin.
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable, "LIMIT_SCALE": "3"}
    done = subprocess.run(["bash", "benchmarks/gpu_all.sh", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=3 * 590 + 60, cwd=pathlib.Path(__file__).parents[1])
    log = (tmp_path / "all.log").read_text()
    assert done.returncode == 0, log[-3000:]
    steps = re.findall(r"^== (\S+): exit (\d+)", log, flags=re.M)
    assert steps == [(name, "0") for name in
                     ("env", "gpu_check", "cuda_tests", "bench_fp32", "bench_fp32_compiled", "bench_fp16")]
    cuda_tests = log[log.index("== cuda_tests ("):log.index("== cuda_tests: exit")]
    assert re.search(r"\d+ (skipped|passed)", cuda_tests)  # the tests that want CUDA, by their gpu marker
    for name in ("gpu_check", "bench_fp32", "bench_fp16"):
        assert json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["1.5", "0", "04", "x"])
def test_gpu_all_refuses_a_limit_scale_that_is_no_whole_number(tmp_path, scale):
    """bash's arithmetic failed on 1.5 inside every step, which then ran nothing and the script
    exited 0; 0 would have meant no limit (timeout 0)."""
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PYTHON": sys.executable, "LIMIT_SCALE": scale}
    done = subprocess.run(["bash", "benchmarks/gpu_all.sh", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=60, cwd=pathlib.Path(__file__).parents[1])
    assert done.returncode == 2 and f"LIMIT_SCALE must be a whole number from 1, got '{scale}'" in done.stderr


@pytest.mark.slow  # about 30 s: it compiles (compile_fullgraph)
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failed"] == 0
    assert {c["check"] for c in report["checks"]} == {
        "equivalence", "masked_rows_and_grads", "expanded_memory_step", "nan_rows", "compile_fullgraph",
        "causal_self_attention", "dropout_eval", "dropout_train", "holed_masks", "fragile_lengths",
        "expanded_state_step"}
    # Without flash-attn (or a GPU) each flash-attn case says so rather than failing.
    skipped = {c["check"] for c in report["checks"] if "flash-attn not available here" in c.get("skipped", "")}
    assert skipped == set(NEW_CASES)
    assert {r["impl"] for r in report["timings"]} >= {"stock", "flash_mha"}


@pytest.fixture
def flash_on_cpu(standin, monkeypatch):
    """The stand-in in place of flash-attn, and CPU calls of any dtype treated as flash-attn
    can serve them (the real rules, device and dtype pretended), as tests/test_flash_attn_glue.py does:
    the dispatch refuses CPU tensors for flash-attn, stand-in or not."""
    monkeypatch.setattr(optional, "device_capability", lambda device: (9, 0))
    real = dispatch.flash_attn_refusal
    monkeypatch.setattr(dispatch, "flash_attn_refusal", lambda call: real(
        dataclasses.replace(call, device=torch.device("cuda"), dtype=torch.bfloat16)))
    monkeypatch.setattr(gpu_cases, "RESULTS", [])
    return standin


@pytest.mark.standin
@pytest.mark.parametrize("name", sorted(NEW_CASES))
def test_flash_attn_cases_against_the_standin(flash_on_cpu, name):
    NEW_CASES[name](CPU, True)
    records = [r for r in gpu_cases.RESULTS if r["check"] == name]
    assert records and all(r["ok"] for r in gpu_cases.RESULTS), [r for r in gpu_cases.RESULTS if not r["ok"]]
    assert not any("flash-attn not available" in r.get("skipped", "") for r in records)
    assert any(r.get("backend") == "flash_attn" for r in records)
    calls = flash_on_cpu.calls
    if name == "causal_self_attention":
        assert any(c["causal"] for c in calls)
        # causal with padding: auto went to SDPA and said why; forced flash_attn refused
        assert any(r["asked"] == "auto" and r["padded"] and r["backend"] == "sdpa" for r in records)
        assert any(r["asked"] == "flash_attn" and "causal attention with a padding mask" in r.get("refused", "")
                   for r in records)
    if name == "holed_masks":
        # A key mask with holes goes to the varlen call, whose key sequences are not contiguous ranges
        # of the padded keys; a per-query mask never reaches flash-attn.
        assert any(c["fn"] == "flash_attn_varlen_func" for c in calls)
        by_kind = {(r["mask_kind"], r["asked"]): r for r in records}
        assert by_kind["key_holes", "auto"]["backend"] == "flash_attn"
        assert by_kind["per_query", "auto"]["backend"] == "sdpa"
        assert "differs per query" in by_kind["per_query_b1", "flash_attn"]["refused"]
    if name == "dropout_train":
        assert {c["dropout_p"] for c in calls} == {0.0, 0.25}
        assert any(r["check"] == "dropout_eval" for r in gpu_cases.RESULTS)


@pytest.mark.standin
def test_the_cases_catch_a_wrong_flash_attn(flash_on_cpu, monkeypatch):
    """The checks have teeth: a flash-attn that ignores ``causal`` or whose dropout forgets the
    1/(1-p) scale, or a dispatch that hands per-query masks to flash-attn (which reads one row),
    fails them, and only in the runs on flash-attn."""
    reference = flash_attn_standin._reference
    monkeypatch.setattr(flash_attn_standin, "_reference", lambda *args, causal, **kwargs: reference(
        *args, causal=False, **kwargs))
    gpu_cases.check_causal(CPU, True)
    failed = [r for r in gpu_cases.RESULTS if not r["ok"]]
    assert failed and all(r["backend"] == "flash_attn" and r["t"] > 1 for r in failed)
    monkeypatch.setattr(gpu_cases, "RESULTS", [])

    def unscaled(q, k, v, *, softmax_scale, causal, dropout_p):
        return reference(q, k, v, softmax_scale=softmax_scale, causal=causal, dropout_p=dropout_p) * (1 - dropout_p)

    monkeypatch.setattr(flash_attn_standin, "_reference", unscaled)
    gpu_cases.check_dropout(CPU, True)
    failed = [r for r in gpu_cases.RESULTS if not r["ok"]]
    assert failed and all(r["check"] == "dropout_train" and r["backend"] == "flash_attn" for r in failed)
    assert all("scale" in r["failed"] for r in failed)

    monkeypatch.setattr(flash_attn_standin, "_reference", reference)
    monkeypatch.setattr(gpu_cases, "RESULTS", [])
    pretend = dispatch.flash_attn_refusal
    as_key_padding = {masks.PER_QUERY: masks.KEY_PADDING}
    monkeypatch.setattr(dispatch, "flash_attn_refusal", lambda call: pretend(
        dataclasses.replace(call, mask_kind=as_key_padding.get(call.mask_kind, call.mask_kind))))
    gpu_cases.check_holed_masks(CPU, True)
    failed = [r for r in gpu_cases.RESULTS if not r["ok"]]
    assert failed and all(r["mask_kind"].startswith("per_query") for r in failed)
