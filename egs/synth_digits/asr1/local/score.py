#!/usr/bin/env python3
"""Score one decoding: word error rate and decoding speed.

WER = (substitutions + deletions + insertions) / reference words, from the
word-level edit distance of each hypothesis against its reference.

Decoding time is read from the asr_inference log, whose lines carry
millisecond timestamps: an utterance starts at its "speech length:" line
(logged before the encoder runs) and ends at the last log line before the next
utterance starts ("best hypo: ..." from the beam search). The sum of these spans
is the time spent in encoder + beam search, without Python start-up, model
loading and data loading; the real-time factor is that time over the audio
duration. The wall time of the whole process is reported beside it.
"""

import argparse
import datetime
import json
import re

import editdistance

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \(")


def read_table(path):
    """Read a Kaldi-style 'key value...' file into {key: value string}."""
    table = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition(" ")
            if key:
                table[key] = value.strip()
    return table


def utterance_spans(log_path):
    """Return the per-utterance decoding times (s) found in an asr_inference log."""
    spans, start, last = [], None, None
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _STAMP.match(line)
            if not m:
                continue
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            if "speech length: " in line:
                if start is not None:
                    spans.append((last - start).total_seconds())
                start = t
            last = t
    if start is not None:
        spans.append((last - start).total_seconds())
    return spans


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", required=True, help="reference text (Kaldi format)")
    parser.add_argument("--hyp", required=True, help="hypothesis text (Kaldi format)")
    parser.add_argument("--utt2dur", required=True)
    parser.add_argument("--log", required=True, help="asr_inference log")
    parser.add_argument("--process_wall_s", type=float, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True, help="metrics json to write")
    args = parser.parse_args()

    ref, hyp, durs = read_table(args.ref), read_table(args.hyp), read_table(args.utt2dur)
    missing = sorted(set(ref) - set(hyp))
    if missing:
        raise SystemExit(f"{len(missing)} utterances have no hypothesis, e.g. {missing[:3]}")
    errors = sum(editdistance.eval(ref[k].split(), hyp[k].split()) for k in ref)
    n_words = sum(len(ref[k].split()) for k in ref)
    n_sent_err = sum(ref[k].split() != hyp[k].split() for k in ref)
    spans = utterance_spans(args.log)
    if len(spans) != len(ref):
        raise SystemExit(
            f"found {len(spans)} decoded utterances in {args.log}, expected {len(ref)}: "
            "was asr_inference run with --log_level INFO?"
        )
    audio_s = sum(float(durs[k]) for k in ref)
    decode_s = sum(spans)
    metrics = {
        "n_utts": len(ref),
        "n_words": n_words,
        "word_errors": errors,
        "wer": 100.0 * errors / n_words,
        "ser": 100.0 * n_sent_err / len(ref),
        "audio_s": round(audio_s, 3),
        "decode_s": round(decode_s, 3),
        "rtf": decode_s / audio_s,
        "process_wall_s": args.process_wall_s,
        "process_rtf": args.process_wall_s / audio_s,
        "threads": args.threads,
    }
    with open(args.out, "w") as f:
        json.dump(metrics, f, indent=2)
    print(
        f"WER {metrics['wer']:.2f}% ({errors}/{n_words}), SER {metrics['ser']:.1f}%, "
        f"decode {decode_s:.2f} s for {audio_s:.1f} s of audio (RTF {metrics['rtf']:.4f}), "
        f"process wall {args.process_wall_s:.1f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
