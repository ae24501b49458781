"""Offline text-to-speech through the libespeak-ng bundled in `espeakng-loader`.

The PyPI package `espeakng-loader` ships `libespeak-ng.so` and its voice data;
nothing from the system (no Debian espeak-ng) is needed. We drive the C API
with ctypes in synchronous mode and collect the samples in a Python callback.

Determinism: the output is a pure function of the call sequence inside one
process. espeak-ng keeps some synthesis state (e.g. pitch/phase) across calls,
even across `espeak_Terminate`, so the same text can come out a few samples
different depending on what was spoken before. A fixed generation order
therefore gives byte-identical corpora run after run; `local/data.py` relies
on that and never parallelises synthesis.
"""

import ctypes
import os
from typing import List

import numpy as np

# Enum values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1  # words per minute, 80..450
_PARAM_VOLUME = 2
_PARAM_PITCH = 3  # base pitch, 0..100
_PARAM_RANGE = 4  # pitch range, 0..100
_PARAM_WORDGAP = 7  # extra pause between words, units of 10 ms

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class EspeakTTS:
    """One espeak-ng engine (the library is a process-wide singleton).

    Args:
        seed: seed for espeak-ng's internal random generator (used by the
            klatt voices' noise source).

    Raises:
        RuntimeError: if the bundled library cannot be initialised.
    """

    def __init__(self, seed: int = 0):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_dir = os.path.dirname(espeakng_loader.get_data_path())
        self.sample_rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data_dir.encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError(
                f"espeak_Initialize failed (returned {self.sample_rate}) "
                f"with data directory {data_dir}"
            )
        self._chunks: List[np.ndarray] = []
        # Keep a reference: ctypes would free the trampoline otherwise.
        self._callback = _CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))

    def _collect(self, wav, n_samples, _events):
        if n_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0

    def synth(
        self,
        text: str,
        voice: str,
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        word_gap: int = 0,
    ) -> np.ndarray:
        """Speak `text` and return int16 samples at `self.sample_rate`.

        Args:
            text: plain text, e.g. "three one four".
            voice: espeak-ng voice name with optional variant, e.g. "en-us+f2".
            rate: speaking rate in words per minute.
            pitch: base pitch 0..100.
            pitch_range: pitch range 0..100.
            word_gap: extra pause between words in units of 10 ms.

        Returns:
            (n_samples,) int16 array.

        Raises:
            ValueError: if espeak-ng rejects the voice or produces no audio.
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice named {voice!r}")
        for param, value in (
            (_PARAM_RATE, rate),
            (_PARAM_PITCH, pitch),
            (_PARAM_RANGE, pitch_range),
            (_PARAM_WORDGAP, word_gap),
            (_PARAM_VOLUME, 100),
        ):
            self._lib.espeak_SetParameter(param, int(value), 0)
        self._chunks = []
        data = text.encode()
        self._lib.espeak_Synth(
            data, ctypes.c_size_t(len(data) + 1), 0, _POS_CHARACTER, 0,
            _CHARS_UTF8, None, None,
        )
        self._lib.espeak_Synchronize()
        if not self._chunks:
            raise ValueError(f"espeak-ng produced no audio for {text!r} ({voice})")
        return np.concatenate(self._chunks)
