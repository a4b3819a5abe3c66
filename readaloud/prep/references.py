"""Reference speech for expected texts: TTS once per unique text, cached in `tts_data/`.

`tts_data/<engine-id>/` holds one wav per text, `index.csv` (text -> file) and the texts'
log-mel store. The engine id (voice, rate, ...) names the folder, so changing the TTS never
mixes references, and a rerun synthesizes only texts it has not seen.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..audio import SAMPLE_RATE, load_audio, resample, write_wav
from ..checkpoints import atomic_csv
from ..features import FeatureParams, FeatureStore, clip_features, file_lock
from ..text import normalise_text
from ..tts import make_tts

log = logging.getLogger(__name__)
DEFAULT_TTS = "espeak:en-us+f3"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "tts"


class ReferenceBank:
    """Synthesized references (wav + features) for expected texts, keyed by normalised text."""

    def __init__(self, tts_dir: str | Path = "tts_data", tts_spec: str = DEFAULT_TTS,
                 params: FeatureParams = FeatureParams()):
        self.tts_spec, self.params = tts_spec, params
        self._tts = None
        self.root = Path(tts_dir) / _slug(tts_spec)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.csv"
        self.index: dict[str, str] = {}
        if self.index_path.exists():
            df = pd.read_csv(self.index_path, dtype=str, keep_default_na=False)
            self.index = dict(zip(df["text"], df["file"]))
        self.store = FeatureStore(self.root, f"features_{params.key()}", params)

    @property
    def tts(self):
        if self._tts is None:  # lazily: a complete cache needs no TTS engine at all
            self._tts = make_tts(self.tts_spec)
        return self._tts

    def missing(self, texts) -> list[str]:
        keys = {normalise_text(t) for t in texts}
        return sorted(k for k in keys if k not in self.store or k not in self.index)

    def ensure(self, texts, progress: bool = True) -> int:
        """Synthesize and featurize every text not cached yet; returns how many were made."""
        if not self.missing(texts):
            return 0
        with file_lock(self.root / ".bank.lock"):
            self.__init__(self.root.parent, self.tts_spec, self.params)  # reread what others made
            return self._ensure_locked(self.missing(texts), progress)

    def _ensure_locked(self, todo: list[str], progress: bool) -> int:
        made = []

        def generate():
            for key in tqdm(todo, desc=f"TTS {self.tts_spec}", disable=not progress, unit="text"):
                if key in self.index and (self.root / self.index[key]).exists():
                    audio = load_audio(self.root / self.index[key])
                else:
                    raw = np.asarray(self.tts.synthesize(key), dtype=np.float32)
                    audio = resample(raw, self.tts.sample_rate, SAMPLE_RATE)
                    if audio.size < SAMPLE_RATE // 20:
                        raise RuntimeError(f"TTS {self.tts_spec} produced no audio for {key!r}")
                    name = hashlib.sha1(key.encode()).hexdigest()[:16] + ".wav"
                    write_wav(self.root / name, audio)
                    self.index[key] = name
                made.append(key)
                if len(made) % 256 == 0:
                    self._save_index()
                yield key, clip_features(audio, self.params)

        try:
            self.store.add_many(generate())
        finally:
            self._save_index()
        return len(made)

    def _save_index(self) -> None:
        atomic_csv(pd.DataFrame(sorted(self.index.items()), columns=["text", "file"]), self.index_path)

    def features(self, text: str) -> np.ndarray:
        return self.store.get(normalise_text(text))

    def length(self, text: str) -> int:
        return self.store.length(normalise_text(text))
