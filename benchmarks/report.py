"""Turn pytest-benchmark JSON into a table of medians and speed-ups, and a bar chart.

Usage:
    python -m benchmarks.report RUN.json [--compare OTHER.json] [--out DIR]

Writes ``DIR/report.md`` (the table) and ``DIR/speedup.png`` (speed-up of each
implementation over ``stock`` per scenario; with ``--compare``, both runs side
by side, e.g. before/after a change or CPU vs GPU) and prints the table.
Speed-up = stock median / implementation median (higher is better). The
interleaved cases (``test_bench_layer.run_interleaved``) get a table of their
own: their speed-up is the median over rounds of stock / implementation, each
round running every implementation once.
"""

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

STOCK = "stock"
# attention_replayed: a bound, not an implementation (see test_bench_decoder.py).
IMPLS = ("flash_mha", "flash_mha-compiled", "flash_mha-stock_layout", "attention_replayed")
INTERLEAVED = "interleaved"  # benchmarks.conftest.INTERLEAVED (not imported: that would import torch)


def load(path):
    """{scenario: {impl: benchmark dict}}, the run's machine description, and
    {scenario: extra_info} of its interleaved cases."""
    data = json.loads(Path(path).read_text())
    runs = defaultdict(dict)
    machine, interleaved = {}, {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        machine = machine or {k: info[k] for k in ("device", "dtype", "torch", "espnet", "machine", "threads", "gpu") if k in info}
        if info.get("impl") == INTERLEAVED:
            interleaved[info["scenario"]] = info
        else:
            runs[info.get("scenario", bench["group"])][info.get("impl", bench["name"])] = bench
    machine["cpu"] = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", machine.get("machine", "?"))
    return dict(runs), machine, interleaved


def speedups(runs):
    """{scenario: {impl: stock_median / impl_median}}."""
    result = {}
    for scenario, impls in runs.items():
        if STOCK in impls:
            base = impls[STOCK]["stats"]["median"]
            result[scenario] = {impl: base / impls[impl]["stats"]["median"] for impl in IMPLS if impl in impls}
    return result


def fmt_time(seconds):
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def table(runs, machine, label=""):
    """The machine, then (if ``runs`` has any) the table of medians and speed-ups."""
    lines = [f"{label}{machine.get('device', '?')} {machine.get('dtype', '')} | {machine.get('gpu', machine['cpu'])}"
             f" | torch {machine.get('torch', '?')}, espnet {machine.get('espnet', '?')}, {machine.get('threads', '?')} threads"]
    if not runs:
        return lines[0]
    lines += ["", "| scenario | stock | " + " | ".join(f"{impl} | speed-up" for impl in IMPLS)
              + " | peak memory stock / ours |", "|---|---|" + "---|---|" * len(IMPLS) + "---|"]
    ratios = speedups(runs)
    for scenario in sorted(runs):
        impls = runs[scenario]
        cells = [scenario, fmt_time(impls[STOCK]["stats"]["median"]) if STOCK in impls else "-"]
        for impl in IMPLS:
            if impl in impls:
                ratio = ratios.get(scenario, {}).get(impl)  # None without a stock case to divide
                cells += [fmt_time(impls[impl]["stats"]["median"]), "-" if ratio is None else f"{ratio:.2f}x"]
            else:
                cells += ["-", "-"]
        mem = [impls[i]["extra_info"].get("peak_mb") for i in (STOCK, "flash_mha") if i in impls]
        if len(mem) == 2 and mem[1]:
            cells.append(f"{mem[0]:.1f} / {mem[1]:.1f} MB ({mem[0] / mem[1]:.1f}x less)")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interleaved_speedups(interleaved):
    """{scenario: {impl: median over rounds of stock / impl}} of the interleaved cases."""
    return {scenario: info["speedup"] for scenario, info in interleaved.items()}


def interleaved_table(interleaved, label=""):
    """The interleaved cases: median time of each implementation, and the median
    over rounds of stock / implementation."""
    if not interleaved:
        return ""
    impls = [impl for impl in IMPLS if any(impl in info["seconds"] for info in interleaved.values())]
    lines = [f"{label}interleaved rounds (each runs every implementation once, in rotating order; "
             "speed-up: median over rounds of stock / implementation)", "",
             "| scenario | rounds | stock | " + " | ".join(f"{impl} | speed-up" for impl in impls) + " |",
             "|---|---|---|" + "---|---|" * len(impls)]
    for scenario in sorted(interleaved):
        info = interleaved[scenario]
        seconds, ratios = info["seconds"], info["speedup"]
        cells = [scenario, str(len(seconds["stock"])), fmt_time(statistics.median(seconds["stock"]))]
        for impl in impls:
            if impl in seconds:
                cells += [fmt_time(statistics.median(seconds[impl])), f"{ratios[impl]:.2f}x"]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(series, path):
    """Bar chart of speed-ups: ``series`` is [(label, {scenario: {impl: ratio}})]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({s for _, ratios in series for s in ratios})
    bars = [(label, impl) for label, ratios in series for impl in IMPLS
            if any(impl in ratios.get(s, {}) for s in scenarios)]
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scenarios)), 4))
    for i, (label, impl) in enumerate(bars):
        ratios = dict(series)[label]
        values = [ratios.get(s, {}).get(impl, 0.0) for s in scenarios]
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(scenarios))]
        ax.bar(xs, values, width, label=f"{label} {impl}".strip())
        for x, v in zip(xs, values):
            if v:
                ax.annotate(f"{v:.1f}x", (x, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(scenarios)), scenarios, rotation=20, ha="right")
    ax.set_ylabel("speed-up over stock (x)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--compare", help="a second JSON to show beside the first")
    parser.add_argument("--out", default=".", help="directory for report.md and speedup.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, machine, interleaved = load(args.run)
    label = "A: " if args.compare else ""
    parts = [table(runs, machine, label), interleaved_table(interleaved, label)]
    series = [("A" if args.compare else "", speedups(runs)), (f"{label}interleaved", interleaved_speedups(interleaved))]
    if args.compare:
        other, other_machine, other_interleaved = load(args.compare)
        parts += [table(other, other_machine, "B: "), interleaved_table(other_interleaved, "B: ")]
        series += [("B", speedups(other)), ("B: interleaved", interleaved_speedups(other_interleaved))]
    text = "\n\n".join(part for part in parts if part) + "\n"
    (out / "report.md").write_text(text)
    chart([(name, ratios) for name, ratios in series if ratios], out / "speedup.png")
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'speedup.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
