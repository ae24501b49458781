"""The one-command GPU check runs end to end (here as its CPU dry run, so it cannot rot)."""

import json

import pytest

from benchmarks import gpu_check


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failed"] == 0
    assert {c["check"] for c in report["checks"]} == {
        "equivalence", "masked_rows_and_grads", "expanded_memory_step", "nan_rows", "compile_fullgraph"}
    assert {r["impl"] for r in report["timings"]} >= {"stock", "flash_mha"}
