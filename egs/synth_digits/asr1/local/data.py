#!/usr/bin/env python3
"""Generate the synth_digits corpus: spoken digit strings, 16 kHz mono wav.

Every utterance is 2-5 digits ("THREE ONE FOUR") spoken by one of 20 espeak-ng
voices (8 English accents x male/female/klatt variants) with a random speaking
rate, pitch, pitch range and word gap, then resampled to 16 kHz, given a random
gain, leading/trailing silence and white noise at a random SNR.

Held-out variety: a digit string belongs to exactly one split (chosen by a
CRC32 of the string), so no test or dev string is ever seen in training.
Voices are shared between the splits.

Writes Kaldi-style data directories <out>/{train,dev,test}/ with wav.scp,
text, utt2spk, spk2utt and utt2dur; wavs go to <out>/wav/<split>/.
Deterministic: the same arguments give byte-identical files.
"""

import argparse
import math
import os
import sys
import zlib
from collections import defaultdict

import numpy as np
import soundfile
from scipy.signal import resample_poly

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from espeak_tts import EspeakTTS  # noqa: E402

WORDS = ["ZERO", "ONE", "TWO", "THREE", "FOUR", "FIVE", "SIX", "SEVEN", "EIGHT", "NINE"]

# (speaker id, espeak-ng voice). Accents x variants; ids stay Kaldi-friendly.
SPEAKERS = [
    ("s01", "en-us+m1"), ("s02", "en-us+f1"), ("s03", "en-us+m3"),
    ("s04", "en-us+f3"), ("s05", "en+m2"), ("s06", "en+f2"),
    ("s07", "en+m4"), ("s08", "en-gb-scotland+m5"), ("s09", "en-gb-scotland+f4"),
    ("s10", "en-gb-x-rp+m6"), ("s11", "en-gb-x-rp+f5"), ("s12", "en-029+m7"),
    ("s13", "en-029+f1"), ("s14", "en-us-nyc+m2"), ("s15", "en-us-nyc+f2"),
    ("s16", "en-gb-x-gbclan+m3"), ("s17", "en-gb-x-gbcwmd+f3"),
    ("s18", "en-us+klatt"), ("s19", "en+klatt3"), ("s20", "en-gb-x-rp+klatt2"),
]

SPLITS = ("train", "dev", "test")
FS = 16000


def split_of(digits: str) -> str:
    """Assign a digit string to a split: about 10% test, 10% dev, 80% train."""
    bucket = zlib.crc32(digits.encode()) % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


def draw_digits(rng: np.random.RandomState, split: str) -> str:
    """Draw a 2-5 digit string that belongs to `split`."""
    while True:
        n = rng.randint(2, 6)
        digits = "".join(str(d) for d in rng.randint(0, 10, size=n))
        if split_of(digits) == split:
            return digits


def render(tts: EspeakTTS, rng: np.random.RandomState, digits: str, voice: str):
    """Speak `digits` with random prosody and channel; return float32 @16 kHz."""
    text = " ".join(WORDS[int(d)].lower() for d in digits)
    raw = tts.synth(
        text,
        voice,
        rate=rng.randint(130, 221),
        pitch=rng.randint(30, 71),
        pitch_range=rng.randint(30, 71),
        word_gap=rng.choice([0, 0, 1, 2, 4]),
    )
    g = math.gcd(FS, tts.sample_rate)  # espeak-ng speaks at 22050 Hz
    x = resample_poly(raw.astype(np.float64) / 32768.0, FS // g, tts.sample_rate // g)
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.3, 0.9)
    lead, trail = (int(rng.uniform(0.05, 0.3) * FS) for _ in range(2))
    x = np.concatenate([np.zeros(lead), x, np.zeros(trail)])
    snr_db = rng.uniform(15.0, 40.0)
    noise_rms = np.sqrt(np.mean(x**2)) / (10 ** (snr_db / 20))
    x = x + rng.normal(0.0, noise_rms, size=x.shape)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def write_split(out: str, split: str, utts):
    """Write one Kaldi data dir; `utts` is a list of (uttid, spk, path, text, dur)."""
    d = os.path.join(out, split)
    os.makedirs(d, exist_ok=True)
    utts = sorted(utts)
    spk2utt = defaultdict(list)
    with open(f"{d}/wav.scp", "w") as wav_scp, open(f"{d}/text", "w") as text_f, \
            open(f"{d}/utt2spk", "w") as u2s, open(f"{d}/utt2dur", "w") as u2d:
        for uttid, spk, path, text, dur in utts:
            wav_scp.write(f"{uttid} {path}\n")
            text_f.write(f"{uttid} {text}\n")
            u2s.write(f"{uttid} {spk}\n")
            u2d.write(f"{uttid} {dur:.4f}\n")
            spk2utt[spk].append(uttid)
    with open(f"{d}/spk2utt", "w") as f:
        for spk in sorted(spk2utt):
            f.write(f"{spk} {' '.join(spk2utt[spk])}\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data", help="output directory")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--n_train", type=int, default=2400)
    parser.add_argument("--n_dev", type=int, default=200)
    parser.add_argument("--n_test", type=int, default=200)
    args = parser.parse_args()

    tts = EspeakTTS(seed=args.seed)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "speakers.txt"), "w") as f:
        f.writelines(f"{spk} {voice}\n" for spk, voice in SPEAKERS)

    # One generator per split: the dev/test draws (strings, voices, prosody) do not
    # depend on --n_train (their audio can differ by a few samples, since espeak-ng
    # carries some state from one utterance to the next).
    for split_index, (split, n) in enumerate(
        zip(SPLITS, (args.n_train, args.n_dev, args.n_test))
    ):
        rng = np.random.RandomState(args.seed * 10 + split_index)
        wav_dir = os.path.join(out, "wav", split)
        os.makedirs(wav_dir, exist_ok=True)
        utts, total = [], 0.0
        for i in range(n):
            spk, voice = SPEAKERS[rng.randint(len(SPEAKERS))]
            digits = draw_digits(rng, split)
            x = render(tts, rng, digits, voice)
            uttid = f"{spk}-{split}{i:05d}"
            path = os.path.join(wav_dir, f"{uttid}.wav")
            soundfile.write(path, x, FS, subtype="PCM_16")
            text = " ".join(WORDS[int(c)] for c in digits)
            utts.append((uttid, spk, path, text, len(x) / FS))
            total += len(x) / FS
        write_split(out, split, utts)
        print(f"{split}: {n} utterances, {total / 60:.1f} min of audio -> {out}/{split}")


if __name__ == "__main__":
    main()
