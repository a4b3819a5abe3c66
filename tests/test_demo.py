"""readaloud.demo / make_demo_data.py: layout, content and determinism of the synthetic data."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from readaloud.demo import generator as demo
from readaloud.tts import EspeakTTS

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST, SEED = 40, 12, 0
CSV_FILES = ("train_metadata.csv", "train_labels.csv", "test_metadata.csv", "test_labels.csv",
             "submission_format.csv")


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".csv", ".wav", ".json")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    demo.generate_demo_data(out, n_train=N_TRAIN, n_test=N_TEST, seed=SEED, workers=1, progress=False)
    return out


def test_files_and_columns_follow_the_competition_layout(dataset):
    for name in CSV_FILES + ("demo_info.json",):
        assert (dataset / name).is_file(), name
    columns = {"metadata": ["filename", "task", "expected_text", "grade"], "labels": ["filename", "score"]}
    train_meta, train_labels = read_csv(dataset / "train_metadata.csv"), read_csv(dataset / "train_labels.csv")
    test_meta, test_labels = read_csv(dataset / "test_metadata.csv"), read_csv(dataset / "test_labels.csv")
    submission = read_csv(dataset / "submission_format.csv")
    assert train_meta[0] == test_meta[0] == columns["metadata"]
    assert train_labels[0] == test_labels[0] == submission[0] == columns["labels"]
    assert len(train_meta[1]) == len(train_labels[1]) == N_TRAIN
    assert len(test_meta[1]) == len(test_labels[1]) == len(submission[1]) == N_TEST
    assert [r["filename"] for r in train_meta[1]] == [r["filename"] for r in train_labels[1]]
    assert [r["filename"] for r in test_meta[1]] == [r["filename"] for r in test_labels[1]]
    assert [r["filename"] for r in submission[1]] == [r["filename"] for r in test_meta[1]]
    assert {r["score"] for r in submission[1]} == {"0"}


def test_rows_hold_valid_values_and_every_wav_is_readable(dataset):
    meta = read_csv(dataset / "train_metadata.csv")[1] + read_csv(dataset / "test_metadata.csv")[1]
    labels = read_csv(dataset / "train_labels.csv")[1] + read_csv(dataset / "test_labels.csv")[1]
    names = [r["filename"] for r in meta]
    assert len(set(names)) == len(names)
    assert all(len(n) == 12 and n.endswith(".wav") and n[:8].isalpha() and n[:8].islower() for n in names)
    assert {r["task"] for r in meta} == set(demo.TASKS)
    assert {r["grade"] for r in meta} == set(demo.GRADES)
    assert {r["score"] for r in labels} == {"0", "1"}
    assert all(r["expected_text"].strip() for r in meta)
    assert sorted(p.name for p in dataset.glob("*.wav")) == sorted(names)
    for name in names:
        info = sf.info(str(dataset / name))
        assert (info.channels, info.subtype, info.format) == (1, "PCM_16", "WAV")
        assert info.samplerate in demo.SAMPLE_RATES
        audio, _ = sf.read(str(dataset / name), dtype="float32")
        assert 0.4 < audio.size / info.samplerate < 20 and np.max(np.abs(audio)) > 0.001


def test_demo_info_records_what_was_generated(dataset):
    info = json.loads((dataset / "demo_info.json").read_text())
    assert info["seed"] == SEED and info["generator_version"] == demo.GENERATOR_VERSION
    assert info["counts"]["train"] == N_TRAIN and info["counts"]["test"] == N_TEST
    assert info["label_flip_rate"] == demo.DEFAULT_FLIP_RATE
    flipped = info["labels_flipped"]
    assert flipped["total"] == flipped["train"] + flipped["test"]
    assert info["label_flip_rate_observed"] == pytest.approx(flipped["total"] / (N_TRAIN + N_TEST), abs=1e-4)
    assert set(info["error_rate_model"]) == set(demo.TASKS)
    assert set(info["error_rate_observed"]["by_grade"]) <= set(demo.GRADES)
    assert info["voices"]["distinct"] > 5
    labels = read_csv(dataset / "train_labels.csv")[1] + read_csv(dataset / "test_labels.csv")[1]
    assert info["score_rate"] == pytest.approx(np.mean([int(r["score"]) for r in labels]), abs=1e-4)


def test_same_arguments_give_identical_bytes_whatever_the_worker_count(dataset, tmp_path):
    reference = snapshot(dataset)
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        demo.generate_demo_data(out, n_train=N_TRAIN, n_test=N_TEST, seed=SEED, workers=workers, progress=False)
        again = snapshot(out)
        assert again.keys() == reference.keys()
        different = [name for name in reference if again[name] != reference[name]]
        assert not different, f"workers={workers}: {different[:5]}"


def test_another_seed_gives_another_data_set(dataset, tmp_path):
    demo.generate_demo_data(tmp_path, n_train=N_TRAIN, n_test=N_TEST, seed=SEED + 1, progress=False)
    assert (tmp_path / "train_metadata.csv").read_bytes() != (dataset / "train_metadata.csv").read_bytes()
    assert not set(p.name for p in tmp_path.glob("*.wav")) & set(p.name for p in dataset.glob("*.wav"))


def test_existing_data_set_is_kept_unless_overwrite(tmp_path):
    demo.generate_demo_data(tmp_path, n_train=4, n_test=2, seed=3, progress=False)
    old = set(p.name for p in tmp_path.glob("*.wav"))
    with pytest.raises(FileExistsError, match="overwrite"):
        demo.generate_demo_data(tmp_path, n_train=4, n_test=2, seed=4, progress=False)
    demo.generate_demo_data(tmp_path, n_train=3, n_test=1, seed=4, overwrite=True, progress=False)
    new = set(p.name for p in tmp_path.glob("*.wav"))
    assert len(new) == 4 and new != old  # stale clips of the first run are gone


@pytest.mark.parametrize("kwargs", [{"n_train": 0, "n_test": 0}, {"workers": 0}, {"flip_rate": 0.7}])
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        demo.generate_demo_data(tmp_path, **{"n_train": 2, "n_test": 1, **kwargs}, progress=False)


def load_cli():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_writes_and_then_refuses_to_overwrite(tmp_path, capsys):
    cli = load_cli()
    argv = ["--out", str(tmp_path / "d"), "--n-train", "5", "--n-test", "2", "--seed", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "correct rate" in out and "5 train + 2 test" in out
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0


def test_content_lists_are_large_and_clean():
    assert min(len(demo.DELETION_ITEMS), len(demo.BLENDING_ITEMS), len(demo.SENTENCES)) >= 40
    nonwords = demo.nonword_items()
    assert len(nonwords) >= 60 and len(set(nonwords)) == len(nonwords)
    assert not set(nonwords) & demo._REAL_WORDS
    assert all(w.isalpha() and w.islower() for w in nonwords)
    for item in demo.DELETION_ITEMS:
        assert item.response != item.word and item.distractor not in (item.response, item.word)


def test_error_rates_fall_with_grade_and_average_near_forty_percent():
    for task in demo.TASKS:
        rates = [demo.error_rate(task, grade) for grade in demo.GRADES]
        assert rates == sorted(rates, reverse=True)
    assert demo.error_rate("nonword_repetition", "1") > demo.error_rate("blending", "1")
    mean = np.mean([demo.error_rate(t, g) for t in demo.TASKS for g in demo.GRADES])
    assert 0.35 <= mean <= 0.45


def test_wrong_answers_differ_from_the_expected_response():
    rng = np.random.default_rng(0)
    speaker = EspeakTTS("en-us")
    for word in demo.nonword_items()[:25]:
        kind, (said,) = demo._nonword(rng, word, False, speaker)
        assert speaker.phonemize(said) != speaker.phonemize(word), (word, kind, said)
    for sentence in demo.SENTENCES:
        for _ in range(3):
            _, (said,) = demo._sentence(rng, sentence, False)
            assert said != sentence
    for item in demo.BLENDING_ITEMS[:10]:
        kind, parts = demo._blending(rng, item, False, speaker)
        assert parts != [item.word] and all(parts)
