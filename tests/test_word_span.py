"""The words-never-trained-on builder (bench/word_span.py): training items say only training words
by training speakers, test items only test words by the held-out speaker, wrong items are wrong,
and bad word sets are refused naming what is wrong."""
import wave

import numpy as np
import pandas as pd
import pytest

from readaloud.bench import word_span


def _recordings(folder, speakers=("a", "b", "c"), words="0123456789", rate=8000):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in speakers:
        for w in words:
            for take in range(2):
                audio = (3000 * np.sin(np.arange(rate // 4) * (0.05 + 0.01 * int(w))) + rng.normal(0, 50, rate // 4))
                with wave.open(str(folder / f"{w}_{s}_{take}.wav"), "wb") as f:
                    f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate)
                    f.writeframes(audio.astype(np.int16).tobytes())
    return folder


def test_test_words_never_occur_in_training(tmp_path):
    rec = _recordings(tmp_path / "rec")
    out = word_span.main(["--recordings", str(rec), "--train-speakers", "a,b", "--test-speakers", "c",
                          "--n-train", "80", "--n-test", "40", "--out", str(tmp_path / "set")])
    train = pd.read_csv(out / "train_metadata.csv").merge(pd.read_csv(out / "train_labels.csv"), on="filename")
    test = pd.read_csv(out / "test_metadata.csv").merge(pd.read_csv(out / "test_labels.csv"), on="filename")
    train_words = {w for t in train["expected_text"] for w in t.split()}
    test_words = {w for t in test["expected_text"] for w in t.split()}
    assert train_words <= {"zero", "one", "two", "three", "four"} and test_words <= {"five", "six", "seven", "eight", "nine"}
    assert not train_words & test_words
    assert 0.25 < train["score"].mean() < 0.75 and 0.2 < test["score"].mean() < 0.8
    assert pd.read_csv(out / "submission_format.csv")["filename"].tolist() == test["filename"].tolist()
    assert all((out / f).exists() for f in [*train["filename"], *test["filename"]])
    again = word_span.main(["--recordings", str(rec), "--train-speakers", "a,b", "--test-speakers", "c",
                            "--n-train", "80", "--n-test", "40", "--out", str(tmp_path / "again")])
    assert pd.read_csv(again / "test_metadata.csv").equals(pd.read_csv(out / "test_metadata.csv"))  # seeded


def test_a_wrong_response_is_never_the_expected_one():
    import random
    rng = random.Random(0)
    words = ["5", "6", "7"]
    for _ in range(500):
        said = [rng.choice(words) for _ in range(rng.choice([1, 2, 3, 4, 5]))]
        wrong = word_span.wrong_response(said, words, rng)
        assert wrong != said and set(wrong) <= set(words)


def test_bad_word_sets_are_refused(tmp_path, capsys):
    rec = _recordings(tmp_path / "rec", words="01234567")
    with pytest.raises(SystemExit):
        word_span.main(["--recordings", str(rec), "--train-speakers", "a", "--test-speakers", "c",
                        "--train-words", "0,1,5", "--test-words", "5,6", "--out", str(tmp_path / "x")])
    assert "5" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"speaker 'c' has no recording of word\(s\) 8, 9"):
        word_span.main(["--recordings", str(rec), "--train-speakers", "a", "--test-speakers", "c",
                        "--out", str(tmp_path / "y")])
