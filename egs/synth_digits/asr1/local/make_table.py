#!/usr/bin/env python3
"""Collect the decodings into one table (markdown + JSON) and print it.

Each --row is "label|decode dir|exp dir". The first row is the baseline: the
speed-up of a row is baseline decode time / its decode time, and "hyps = stock"
says how many of its hypotheses are token-for-token those of the first row.
A row whose decode dir has no metrics.json is shown as "not run".
"""

import argparse
import json
import os
import platform
import re
import sys
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_hyps import compare  # noqa: E402


def versions():
    out = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    for dist in ("torch", "espnet", "espnet_mha"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def trained_epochs(exp_dir):
    """Last finished epoch, from the training log (None if unknown)."""
    try:
        with open(os.path.join(exp_dir, "train.log"), encoding="utf-8") as f:
            found = re.findall(r"(\d+)epoch results:", f.read())
    except FileNotFoundError:
        return None
    return int(found[-1]) if found else None


def attention_classes(decode_dir):
    """Attention classes the decoder was built with, from the model printed in the decode log."""
    try:
        with open(os.path.join(decode_dir, "logdir", "asr_inference.1.log"), errors="replace") as f:
            return sorted(set(re.findall(r"\(layer\): (\w*MultiHeadedAttention)\(", f.read())))
    except FileNotFoundError:
        return []


def read_float(path):
    try:
        with open(path) as f:
            return float(f.read().strip())
    except FileNotFoundError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row", action="append", required=True, help="label|decode_dir|exp_dir")
    parser.add_argument("--out_md", required=True)
    parser.add_argument("--out_json", required=True)
    args = parser.parse_args()

    rows, seen_exps = [], set()
    for spec in args.row:
        label, decode_dir, exp_dir = spec.split("|")
        metrics_path = os.path.join(decode_dir, "metrics.json")
        row = {"system": label, "decode_dir": decode_dir}
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                row.update(json.load(f))
            row["epochs"] = trained_epochs(exp_dir)
            # A checkpoint decoded twice was trained once: count its training once.
            row["train_wall_s"] = (
                None if exp_dir in seen_exps
                else read_float(os.path.join(exp_dir, "train_wall_s"))
            )
            seen_exps.add(exp_dir)
            row["attention_class"] = ", ".join(attention_classes(decode_dir)) or "?"
        rows.append(row)

    base = rows[0]
    if "wer" not in base:
        sys.exit(f"Error: no baseline decoding in {base['decode_dir']}")
    for row in rows:
        if "wer" in row:
            row["speedup"] = base["decode_s"] / row["decode_s"]
            cmp = compare(base["decode_dir"], row["decode_dir"])
            row["hyps_identical"] = cmp["identical"]
            row["hyps_total"] = cmp["total"]

    header = (
        "| system | decoder attention class | epochs | WER (%) | decode time (s) | RTF "
        "| speed-up vs stock | hyps = stock | decode process wall (s) | train wall (s) |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in rows:
        if "wer" not in r:
            lines.append(f"| {r['system']} | not run |" + " |" * 8)
            continue
        same = r["hyps_identical"] == r["hyps_total"]
        train = f"{r['train_wall_s']:.0f}" if r["train_wall_s"] is not None else "-"
        lines.append(
            f"| {r['system']} | {r['attention_class']} "
            f"| {r['epochs'] if r['epochs'] is not None else '-'} "
            f"| {r['wer']:.2f} | {r['decode_s']:.2f} | {r['rtf']:.4f} "
            f"| {r['speedup']:.2f}x | {'yes' if same else 'no'} "
            f"({r['hyps_identical']}/{r['hyps_total']}) "
            f"| {r['process_wall_s']:.1f} | {train} |"
        )
    env = versions()
    lines += [
        "",
        f"Test set: {base['n_utts']} utterances, {base['n_words']} words, "
        f"{base['audio_s']:.1f} s of audio. Decoding: asr_inference, 1 job, batch 1, "
        f"CPU, {base['threads']} thread(s); decode time = encoder + beam search "
        "summed over utterances (from the log timestamps), RTF = decode time / audio.",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
    ]
    table = "\n".join(lines) + "\n"
    with open(args.out_md, "w") as f:
        f.write(table)
    with open(args.out_json, "w") as f:
        json.dump({"rows": rows, "environment": env}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
