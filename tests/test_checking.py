"""check_models' verdicts are records (what is wrong, with which seed or loss), and what to do
about a fold is read from the record; the fold count comes from the data set's fold file."""
import json

import pandas as pd
import pytest
import torch

from readaloud.checkpoints import atomic_save
from readaloud.layout import FoldPaths, fold_files
from readaloud.pipeline.checking import FoldIssue, check, retrain_commands, retrain_specs
from readaloud.prep.folds import FoldFileError, data_set_n_folds, mark_current, resolve_n_folds
from readaloud.variants import variant_config


def finished_fold(paths: FoldPaths, loss_noise: float, config: dict | None = None) -> None:
    """A fold's files as run_fold writes them, with an OOF log loss set by `loss_noise`."""
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({"state_dict": {"w": torch.zeros(1)}}, paths.checkpoint)
    score = [0, 1] * 20
    pred = [min(0.99, max(0.01, abs(s - loss_noise))) for s in score]
    pd.DataFrame({"filename": [f"{paths.fold}_{i}.wav" for i in range(40)], "score": score,
                  "pred": pred}).to_csv(paths.oof, index=False)
    cfg = config or {"seed": 5}
    paths.summary.write_text(json.dumps({"variant": paths.variant, "fold": paths.fold, "config": cfg}))


def test_every_problem_is_a_record_with_what_fixes_it(tmp_path):
    m = "model1mean"
    for fold, noise in ((0, 0.2), (1, 0.21), (2, 0.19), (3, 0.2), (4, 0.7)):  # fold 4: an outlier
        finished_fold(FoldPaths(tmp_path, m, fold), noise)
    broken = FoldPaths(tmp_path, m, 5)
    finished_fold(broken, 0.2)
    broken.checkpoint.write_bytes(b"")
    aborted = FoldPaths(tmp_path, m, 6)
    aborted.run_dir.mkdir(parents=True)
    aborted.aborted.write_text(json.dumps({"reason": "non-finite loss", "step": 12, "seed": 3}))
    FoldPaths(tmp_path, m, 7).run_dir.mkdir(parents=True)  # started, never finished; fold 8: never started
    table, todo = check(tmp_path, [m], 9)
    issues = {i.fold: i for i in todo}
    assert all(isinstance(i, FoldIssue) for i in todo)
    assert {f: i.kind for f, i in issues.items()} == {4: "outlier", 5: "broken", 6: "aborted", 7: "unfinished",
                                                      8: "missing"}
    assert issues[6].seed == 3 and issues[6].retrain_args() == ["--restart", "--seed", "4"]
    assert issues[4].loss > issues[4].median and issues[4].retrain_args() == ["--force"]
    assert issues[5].retrain_args() == ["--force"] and issues[7].retrain_args() == issues[8].retrain_args() == []
    assert str(issues[6]).startswith("aborted: non-finite loss at step 12 (seed 3)")
    assert list(table.loc[table.fold == 4, "status"]) == ["ok"], "an outlier trained fine: the table says ok"


def test_a_retrained_fold_reads_its_models_saved_config(tmp_path):
    m = "model1mean"
    trained = variant_config(m, {"epochs": 1, "threads": 1}).to_dict()
    finished_fold(FoldPaths(tmp_path, m, 0), 0.2, config=trained)
    FoldPaths(tmp_path, m, 0).config.write_text(json.dumps(trained))
    _, todo = check(tmp_path, [m], 2)
    assert [(i.fold, i.kind) for i in todo] == [(1, "missing")]
    cmd = retrain_commands(todo, 2, "data", tmp_path)[0]
    assert f"--config {FoldPaths(tmp_path, m, 0).config}" in cmd and cmd.endswith("# trained with --epochs 1")
    (variant, fold, args), = retrain_specs(todo, 2, tmp_path)
    own = FoldPaths(tmp_path, m, 1).requested_config
    assert (variant, fold, args) == (m, 1, ["--config", str(own)])
    assert json.loads(own.read_text())["epochs"] == 1, "its own copy: a sibling's retrain cannot pull it away"


def test_the_fold_count_is_the_fold_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(FoldFileError, match="run preprocess.py"):
        resolve_n_folds(data)
    assert resolve_n_folds(data, 3) == 3, "no fold file yet: the count to make"
    assert fold_files(data) == {} and not (data / "cache").exists(), "looking for fold files made no folder"
    (data / "cache").mkdir()
    (data / "cache" / "folds_2.csv").write_text("filename,fold\n")
    assert resolve_n_folds(data) == 2 and resolve_n_folds(data, 2) == 2
    with pytest.raises(FoldFileError, match="--n_folds 6 disagrees"):
        resolve_n_folds(data, 6)
    (data / "cache" / "folds_6.csv").write_text("filename,fold\n")
    with pytest.raises(FoldFileError, match="none is marked"):
        data_set_n_folds(data)
    mark_current(data, 6)
    assert resolve_n_folds(data) == 6 and resolve_n_folds(data, 2) == 2
