"""Options a command does not know pass on whole, even when they are the prefix of one it does:
`--tts piper` (a config key) is not `--tts_dir piper`. argparse's abbreviations did exactly that in
the benchmarks, train.py and train_model*.py, so a Piper run silently trained with espeak
references and a tts_dir named "piper"."""
import importlib.util
import textwrap

import pytest

from readaloud.bench import children, loso, quality
from readaloud.pipeline import fold_run


class Stop(Exception):
    pass


def test_quality_passes_tts_to_train_and_keeps_its_tts_dir(tmp_path, monkeypatch):
    commands = []

    def fake_run(*args):
        commands.append(list(args))
        if args[0] == "get_config.py":
            raise Stop
        return 0.0

    monkeypatch.setattr(quality, "_run", fake_run)
    (tmp_path / "test_labels.csv").write_text("filename,score\n")
    with pytest.raises(Stop):
        quality.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--models", "model7whisper",
                      "--tts", "piper"])
    train = next(c for c in commands if c[0] == "train.py")
    assert train[train.index("--tts") + 1] == "piper"
    assert train[train.index("--tts_dir") + 1].endswith("/tts_data")   # the default, resolved


def test_children_and_loso_pass_tts_on(tmp_path, monkeypatch):
    seen = []

    def fake_quality(argv):
        seen.append(argv)
        raise Stop

    monkeypatch.setattr(quality, "main", fake_quality)
    monkeypatch.setattr(children, "build_set", lambda *a: tmp_path)
    monkeypatch.setattr(children, "held_out_check", lambda data: None)
    with pytest.raises(Stop):
        children.main(["--out", str(tmp_path / "kids"), "--tts", "piper"])
    argv = seen[-1]
    assert argv[argv.index("--tts") + 1] == "piper"
    assert argv[argv.index("--tts_dir") + 1] == str((tmp_path / "kids" / "tts").resolve())

    builder = tmp_path / "builder.py"
    builder.write_text(textwrap.dedent("""
        import argparse, pathlib
        p = argparse.ArgumentParser()
        for o in ("--recordings",): p.add_argument(o, nargs="+")
        for o in ("--train-speakers", "--test-speakers", "--n-train", "--n-test", "--seed", "--out"): p.add_argument(o)
        out = pathlib.Path(p.parse_args().out); out.mkdir(parents=True, exist_ok=True)
        (out / "test_labels.csv").write_text("filename,score\\n")
    """))
    with pytest.raises(Stop):
        loso.main(["--recordings", str(tmp_path), "--speakers", "a,b", "--out", str(tmp_path / "loso"),
                   "--builder", str(builder), "--tts", "piper"])
    assert seen[-1][-2:] == ["--tts", "piper"]


def test_train_entry_points_read_tts_as_a_config_key(root, monkeypatch):
    captured = {}

    def fake_run_fold(variant, fold, data, assets, tts_dir, overrides, *args, **kwargs):
        captured.update(tts_dir=tts_dir, overrides=overrides)

    monkeypatch.setattr(fold_run, "run_fold", fake_run_fold)
    fold_run.train_variant_main("model7whisper", ["--fold", "0", "--tts", "piper"])
    assert captured["overrides"] == {"tts": "piper"} and captured["tts_dir"] == "tts_data"

    spec = importlib.util.spec_from_file_location("train_entry", root / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    def fake_parse(extra):
        captured["train_rest"] = list(extra)
        raise Stop

    monkeypatch.setattr(train, "resolve_n_folds", lambda data, n: 2)
    monkeypatch.setattr(train, "parse_overrides", fake_parse)
    monkeypatch.setattr("sys.argv", ["train.py", "--models", "model7whisper", "--tts", "piper"])
    with pytest.raises(Stop):
        train.main()
    assert captured["train_rest"] == ["--tts", "piper"]
