"""CTranslate2 vs transformers ASR evidence (readaloud/bench/asr_paths.py) on two espeak clips.

Tolerances, from runs of the same weights (float16 in the packages, float32 in the conversion):
- transformers float32 vs CTranslate2 float32: the same arithmetic up to kernels; the largest
  difference measured was 1.8e-4 on these clips and 5e-4 on 60 children's clips (a sum of log p),
  so 1e-2 still catches a real mismatch (a wrong position, softmax range or prompt moves log p by
  far more);
- transformers float32 vs CTranslate2 int8 (the member's path): int8 moves the teacher-forced
  mean log p by 0.09 nats on these clips (0.15 on another espeak sentence; median 0.07 on
  children's clips whose transcripts agree less often), so 0.3 nats.
"""
import json

import numpy as np
import pandas as pd
import pytest

CLIPS = [("the boy can jump high", "the boy can swim high"), ("please open the door", "please open the door")]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from readaloud.audio import resample, write_wav
    from readaloud.bench import asr_paths
    from readaloud.tts import make_tts
    folder = tmp_path_factory.mktemp("asr_paths")
    tts = make_tts("espeak")
    for k, (said, _) in enumerate(CLIPS):
        write_wav(folder / f"clip{k}.wav", resample(tts.synthesize(said), tts.sample_rate, 16000))
    pd.DataFrame({"filename": [f"clip{k}.wav" for k in range(len(CLIPS))], "task": "sentence_repetition",
                  "expected_text": [asked for _, asked in CLIPS], "grade": "1"}).to_csv(
        folder / "train_metadata.csv", index=False)
    out = folder / "report"
    result = asr_paths.main(["--data", str(folder), "--backbones", "whisper-tiny.en", "--n", "2", "--threads", "2",
                             "--assets", str(folder / "assets"), "--out", str(out)])
    return result, out


def _feature(comparison: dict, name: str, stat: str) -> float:
    return comparison["features"][name][stat]


def test_both_paths_hear_the_same_and_score_alike(report):
    result, _ = report
    tiny = result["backbones"]["whisper-tiny.en"]
    assert set(tiny["paths"]) == {"ctranslate2-int8", "ctranslate2-float32", "transformers-float32"}
    assert all(p["clips"] == 2 and p["clips_per_s"] > 0 for p in tiny["paths"].values())
    int8 = tiny["comparisons"]["ctranslate2-int8 vs transformers-float32"]
    float32 = tiny["comparisons"]["ctranslate2-float32 vs transformers-float32"]
    for c in (int8, float32):
        assert c["transcripts_identical_normalised"] == 1.0, c["differing_transcripts"]
    for name in ("exp_mean_logp", "tr_mean_logp"):
        assert _feature(int8, name, "max_abs_diff") < 0.3, (name, int8["features"][name])
    for name in ("exp_mean_logp", "exp_sum_logp", "tr_sum_logp", "end_logp", "gen_avg_logprob", "no_speech_prob"):
        assert _feature(float32, name, "max_abs_diff") < 1e-2, (name, float32["features"][name])
    for name in ("exact_match", "word_edits", "phone_edits"):
        assert _feature(float32, name, "max_abs_diff") == 0, name


def test_the_swapped_word_costs_log_p_in_the_transformers_path_too(report):
    """A check that the transformers path scores the expected text, not just echoes the transcript."""
    from readaloud.audio import load_audio
    from readaloud.bench.asr_paths import TransformersWhisperEvidence
    from readaloud.members.gbm.evidence import FEATURE_NAMES
    _, out = report
    assert json.loads((out / "asr_paths.json").read_text())["n"] == 2
    text = (out / "asr_paths.md").read_text()
    assert "| transformers-float32 |" in text and "| exp_mean_logp |" in text
    model = TransformersWhisperEvidence("whisper-tiny.en", threads=2, assets=out.parent / "assets")
    audio = load_audio(out.parent / "clip0.wav")
    _, evidence = model.evidence([audio], [list(CLIPS[0])])
    own, swapped = (e.features for e in evidence[0])
    k = FEATURE_NAMES.index("exp_min_word_logp")
    assert swapped[k] < own[k] - 2.0 and np.isfinite(own).all()
