#!/usr/bin/env python3
"""Check that two decodings of the same set produced identical hypotheses.

Compares the token ids (1best_recog/token_int, collected as <dir>/token_int)
utterance by utterance, and reports the largest difference of the hypothesis
scores as information.
"""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score import read_table  # noqa: E402


def _score(text):
    """Parse a 1best_recog/score value; ESPnet writes e.g. "tensor(-2.7378)"."""
    match = re.search(r"-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", text)
    if match is None:
        raise ValueError(f"no number in score {text!r}")
    return float(match.group(0))


def compare(ref_dir, hyp_dir):
    """Return {'identical': int, 'total': int, 'differ': [keys], 'max_score_diff': float}."""
    ref = read_table(os.path.join(ref_dir, "token_int"))
    hyp = read_table(os.path.join(hyp_dir, "token_int"))
    differ = sorted(k for k in ref if ref[k] != hyp.get(k))
    ref_score = read_table(os.path.join(ref_dir, "score"))
    hyp_score = read_table(os.path.join(hyp_dir, "score"))
    score_diffs = [
        abs(_score(ref_score[k]) - _score(hyp_score[k]))
        for k in ref_score
        if k in hyp_score and k not in differ
    ]
    return {
        "identical": len(ref) - len(differ),
        "total": len(ref),
        "differ": differ,
        "max_score_diff": max(score_diffs, default=0.0),
    }


def str2bool(value):
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value == "true"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref_dir", required=True)
    parser.add_argument("--hyp_dir", required=True)
    parser.add_argument("--require_identical", type=str2bool, default=True)
    args = parser.parse_args()

    result = compare(args.ref_dir, args.hyp_dir)
    with open(os.path.join(args.hyp_dir, "compare_to_stock.json"), "w") as f:
        json.dump(dict(result, ref_dir=args.ref_dir), f, indent=2)
    print(
        f"{result['identical']}/{result['total']} hypotheses identical to {args.ref_dir} "
        f"(largest score difference among them: {result['max_score_diff']:.3g})"
    )
    if result["differ"]:
        print(f"differing utterances: {' '.join(result['differ'][:20])}")
        if args.require_identical:
            sys.exit("Error: hypotheses differ from the stock decoding")


if __name__ == "__main__":
    main()
