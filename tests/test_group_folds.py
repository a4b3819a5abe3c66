"""Speaker-grouped folds (preprocess.py --groups): a group never spans two folds, the split is
balanced and reproducible, the fold file records the scheme, a clip without a group is a named
error, and get_config's automatic blend treats grouped folds as unheard speakers."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_script
from readaloud.audio import write_wav
from readaloud.metrics import sigmoid
from readaloud.pipeline.ensemble import build_config
from readaloud.prep.folds import (ClipGroups, assign_group_folds, load_or_create_folds, read_groups,
                                  split_groups)


def random_children(seed: int, n_groups: int = 40) -> tuple[pd.DataFrame, pd.Series]:
    """Clips of children with 1-30 clips each, two tasks, each child with its own success rate."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        skill = rng.uniform(0.2, 0.9)
        for _ in range(int(rng.integers(1, 31))):
            rows.append((f"c{len(rows)}.wav", rng.choice(["words", "sentences"]), int(rng.random() < skill),
                         f"child{g:02d}"))
    df = pd.DataFrame(rows, columns=["filename", "task", "score", "group"])
    return df[["filename", "task", "score"]], df["group"]


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 4), (3, 6), (4, 10)])
def test_group_folds_never_split_a_group_and_are_balanced(seed, k):
    meta, groups = random_children(seed)
    folds = assign_group_folds(meta, groups, k)
    assert split_groups(folds, groups) == []
    assert pd.crosstab(groups, folds).gt(0).sum(axis=1).eq(1).all(), "each group in exactly one fold"
    sizes = folds.value_counts().reindex(range(k), fill_value=0)
    assert (sizes > 0).all(), sizes
    largest_group = groups.value_counts().max()
    assert sizes.max() - sizes.min() <= largest_group, f"sizes {sizes.tolist()} (largest group {largest_group})"
    rate = meta["score"].groupby(folds).mean()
    if k <= 4:  # with ~10+ children a fold, the folds' success rates stay near the whole set's
        assert (rate - meta["score"].mean()).abs().max() < 0.1, rate


def test_group_folds_are_deterministic_whatever_the_row_order():
    meta, groups = random_children(7)
    first = assign_group_folds(meta, groups, 4)
    assert (assign_group_folds(meta, groups, 4) == first).all()
    order = np.random.default_rng(0).permutation(len(meta))
    shuffled = assign_group_folds(meta.iloc[order], groups.iloc[order], 4)
    assert (shuffled.sort_index() == first).all()


def test_fewer_groups_than_folds_is_an_error():
    meta, groups = random_children(0, n_groups=3)
    with pytest.raises(ValueError, match="cannot split 3 groups into 4 folds"):
        assign_group_folds(meta, groups, 4)


def test_fold_file_records_groups_and_refuses_a_split_group(tmp_path):
    meta, groups = random_children(5)
    groups_csv = tmp_path / "children.csv"
    pd.DataFrame({"filename": meta["filename"], "group": groups}).to_csv(groups_csv, index=False)
    clip_groups = read_groups(groups_csv)
    assert clip_groups.column == "group"
    folds = load_or_create_folds(tmp_path, meta, 3, groups=clip_groups)
    scheme = json.loads((tmp_path / "cache" / "folds_3.json").read_text())
    assert scheme["fold_by"] == "groups" and scheme["group_column"] == "group"
    assert (load_or_create_folds(tmp_path, meta, 3) == folds).all(), "read back without the groups file"
    assert (load_or_create_folds(tmp_path, meta, 3, groups=clip_groups) == folds).all()
    with pytest.raises(ValueError, match="holds groups folds, not stratified"):
        load_or_create_folds(tmp_path, meta, 3, "stratified")
    regrouped = ClipGroups(groups_csv, "group", {f: f"g{i % 2}" for i, f in enumerate(meta["filename"])})
    with pytest.raises(ValueError, match="splits 2 groups"):
        load_or_create_folds(tmp_path, meta, 3, groups=regrouped)


def test_another_fold_seed_is_another_grouping_recorded_and_kept(tmp_path):
    """--fold_seed: the same children drawn into other folds (each child still whole), the seed
    recorded beside the file; reading needs no seed, and asking for another one is refused."""
    meta, groups = random_children(6)
    groups_csv = tmp_path / "children.csv"
    pd.DataFrame({"filename": meta["filename"], "group": groups}).to_csv(groups_csv, index=False)
    clip_groups = read_groups(groups_csv)
    first = load_or_create_folds(tmp_path / "a", meta, 4, groups=clip_groups)
    other = load_or_create_folds(tmp_path / "b", meta, 4, groups=clip_groups, seed=7)
    assert not split_groups(other, groups)
    together = pd.crosstab(groups, other)
    assert (together.gt(0).sum(axis=1) == 1).all(), "a child in two folds"
    assert not (pd.crosstab(groups, first).values.argmax(1) == together.values.argmax(1)).all(), \
        "another seed drew the same folds"
    assert json.loads((tmp_path / "b" / "cache" / "folds_4.json").read_text())["seed"] == 7
    assert (load_or_create_folds(tmp_path / "b", meta, 4) == other).all()
    assert (load_or_create_folds(tmp_path / "b", meta, 4, seed=7) == other).all()
    with pytest.raises(ValueError, match="drawn with seed 7, not 42"):
        load_or_create_folds(tmp_path / "b", meta, 4, seed=42)
    with pytest.raises(ValueError, match="drawn with seed 42, not 7"):
        load_or_create_folds(tmp_path / "a", meta, 4, seed=7)


def test_speakers_csv_is_read_by_its_speaker_column(tmp_path):
    path = tmp_path / "speakers.csv"
    path.write_text("filename,speaker,change\na.wav,0001,own\nb.wav,0001,swap\nc.wav,0007,drop\n")
    groups = read_groups(path)
    assert groups.column == "speaker" and groups.of == {"a.wav": "0001", "b.wav": "0001", "c.wav": "0007"}
    path.write_text("filename,child\na.wav,x\n")
    with pytest.raises(ValueError, match="needs columns 'filename' and 'group'"):
        read_groups(path)
    path.write_text("filename,group\na.wav,x\na.wav,y\n")
    with pytest.raises(ValueError, match="gives a.wav more than one group"):
        read_groups(path)


def test_a_clip_missing_from_the_groups_file_is_named(tmp_path):
    meta, groups = random_children(2, n_groups=6)
    groups_csv = tmp_path / "groups.csv"
    pd.DataFrame({"filename": meta["filename"], "group": groups}).iloc[3:].to_csv(groups_csv, index=False)
    with pytest.raises(ValueError, match=r"groups\.csv names no group for 3 of .*first: c0\.wav, c1\.wav, c2\.wav"):
        load_or_create_folds(tmp_path, meta, 2, groups=read_groups(groups_csv))
    assert not (tmp_path / "cache" / "folds_2.csv").exists()


def test_preprocess_names_missing_clips_before_any_work(tmp_path, root):
    data = tmp_path / "data"
    data.mkdir()
    names = [f"{i}.wav" for i in range(4)]
    pd.DataFrame({"filename": names, "task": "t", "expected_text": "cat", "grade": "1"}).to_csv(
        data / "train_metadata.csv", index=False)
    pd.DataFrame({"filename": names, "score": [0, 1, 0, 1]}).to_csv(data / "train_labels.csv", index=False)
    for f in names:
        write_wav(data / f, np.zeros(1600, np.float32))
    (tmp_path / "groups.csv").write_text("filename,speaker,change\n0.wav,a,own\n1.wav,b,own\n")
    res = run_script(root, "preprocess.py", "--data", data, "--tts_dir", tmp_path / "tts", "--n_folds", 2,
                     "--groups", tmp_path / "groups.csv", ok=False)
    assert res.returncode != 0
    assert "groups.csv names no group for 2 of 4 training clips (first: 2.wav, 3.wav)" in res.stderr, res.stderr
    assert list(data.glob("cache/*.index.csv")) == [] and not (tmp_path / "tts").exists(), "failed before work"
    res = run_script(root, "preprocess.py", "--data", data, "--groups", tmp_path / "groups.csv",
                     "--fold_by", "voice", ok=False)
    assert res.returncode == 2 and "cannot be combined with --fold_by voice" in res.stderr


def test_auto_blend_treats_grouped_folds_as_unheard_speakers(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 90)
    for f in range(3):
        idx = np.arange(f, 90, 3)
        z = 3 * (2 * y[idx] - 1) + rng.normal(0, 1, idx.size)
        pd.DataFrame({"filename": [f"{i}.wav" for i in idx], "fold": f, "task": "t", "grade": "1", "score": y[idx],
                      "logit": z, "pred": sigmoid(z)}).to_csv(tmp_path / f"modela_{f}_oof.csv", index=False)
        (tmp_path / f"modela_{f}.pth").write_bytes(b"x")
        (tmp_path / f"modela_{f}.json").write_text(json.dumps({"variant": "modela", "fold": f}))
    data = tmp_path / "data"
    (data / "cache").mkdir(parents=True)
    assert build_config(tmp_path, data_dir=data)["blend"] == "convex", "no fold file: stratified"
    (data / "cache" / "folds_3.json").write_text(json.dumps({"fold_by": "groups", "n_folds": 3}))
    cfg = build_config(tmp_path, data_dir=data)
    assert cfg["blend"] == "logit" and cfg["fold_by"] == "groups"
