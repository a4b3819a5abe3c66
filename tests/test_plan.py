"""The plan (python -m readaloud.pipeline.plan, train.py --plan): every stage of the chosen members, measured
on a sample in a temporary folder, scaled to any size; the data folder's caches are only read."""
import hashlib
from pathlib import Path

import pytest

from conftest import preprocessed_demo, run_script
from readaloud.members.gbm import fold_ears
from readaloud.pipeline import plan


def listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planned(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("plan")
    data, tts = preprocessed_demo(root, base, 16, 8, seed=1)
    before = listing(data), listing(tts)
    mp = pytest.MonkeyPatch()
    mp.setenv("READALOUD_BACKBONES", str(base / "backbones"))
    tunings = []
    real = fold_ears.fine_tune_decoder
    mp.setattr(fold_ears, "fine_tune_decoder", lambda *a, **k: tunings.append(len(a[2])) or real(*a, **k))
    try:
        out = plan.main(["--data", str(data), "--tts_dir", str(tts), "--assets", str(base / "assets"), "--sample", "6",
                         "--clips", "1000", "--test_clips", "500", "--json", str(base / "plan.json"),
                         "--asr_backbones", "whisper-tiny.en"])
    finally:
        mp.undo()
    return {"out": out, "data": data, "tts": tts, "before": before, "base": base, "tunings": tunings}


def test_every_stage_of_the_members_is_planned(planned):
    names = [s["name"] for s in planned["out"]["stages"]]
    expected = ["preprocess: TTS references", "preprocess: clip features",
                "model6asr: alignment features", "model6asr: ASR evidence (whisper-tiny.en)",
                "model6asr: fold ears: encoder cache (whisper-tiny.en", "model6asr: fold ears: ear copies of the clips",
                "model6asr: fold ears: fine-tuning K + 1 ears", "model6asr: fold ears: each clip decoded by its fold's ear",
                "model6asr: ear copies",
                "model6asr: training", "model6asr: inference, test clips' ASR evidence (whisper-tiny.en)",
                "model6asr: inference, test clips' fold ears: encoder cache",
                "model6asr: inference, test clips' fold ears: each clip decoded",
                "model6asr: inference, each fold's predictions",
                "model8decoder: frozen encoder cache (whisper-tiny.en)", "model8decoder: training",
                "model8decoder: inference, test clips' frozen encoder cache", "model8decoder: inference, each fold's predictions"]
    for stage in expected:
        assert any(n.startswith(stage) for n in names), (stage, names)
    assert not any("whisper-base" in n for n in names), "the override --asr_backbones reached the plan"
    assert not any("inference" in n and ("fine-tuning" in n or "copies" in n) for n in names), "training-only work"
    folder, scaled = planned["out"]["tables"]
    assert [r["stage"] for r in folder["rows"]] == names and [r["stage"] for r in scaled["rows"]] == names
    assert scaled["size"]["train"] == 1000 and scaled["size"]["test"] == 500
    assert folder["size"]["train"] == 16 and folder["size"]["test"] == 8
    assert (planned["base"] / "plan.json").exists()


def test_hours_grow_linearly_with_the_clips_and_disk_is_counted(planned):
    out = planned["out"]
    measured = plan.Measured([plan.Stage(**s) for s in out["stages"]], out["sample"]["train_seconds"],
                             out["sample"]["test_seconds"])
    seconds = out["sample"]["train_seconds"]
    hours = [plan.estimate(measured, plan.Size(n, n // 2, n, seconds, seconds, "x", 0.6), 6, 2)
             for n in (1000, 2000, 3000)]
    for a, b, c in zip(*hours):
        assert b.hours - a.hours == pytest.approx(c.hours - b.hours, rel=1e-9, abs=1e-12), a.stage
        assert b.hours >= a.hours > 0, a.stage
    per_clip = [r for r in hours[0] if "cache" in r.stage or "evidence" in r.stage]
    assert per_clip and all(b.hours > a.hours for a, b in zip(per_clip, [r for r in hours[1] if r.stage in
                                                                          {p.stage for p in per_clip}]))
    assert sum(r.disk_gb for r in hours[0]) > 0
    by_name = [{r.stage.split(" (")[0]: r for r in table} for table in hours]
    # tiny.en's encoder cache is one, model6asr's fold ears' and model8decoder's: counted where it is filled first
    cache = [t["model6asr: fold ears: encoder cache"] for t in by_name]
    assert 0 < cache[0].disk_gb < cache[1].disk_gb, "each clip's encoder output"
    assert by_name[0]["model8decoder: frozen encoder cache"].hours < cache[0].hours, "filled by the ears' stage"
    # an ear is a folder whatever its clips: K + 1 ears and the published one, the same at 1000 and 3000 clips
    ears = [t["model6asr: fold ears: fine-tuning K + 1 ears"] for t in by_name]
    assert ears[0].disk_gb > 0 and ears[2].disk_gb == ears[0].disk_gb and ears[2].hours > ears[0].hours
    assert by_name[0]["model8decoder: training"].disk_gb > 0, "the folds' checkpoints"


def test_fold_ears_cost_a_start_up_and_a_folder_per_ear_and_a_pass_per_clip_and_epoch():
    stage = plan.Stage("ears", "ears", per_unit_s=0.02, fixed_s=5.0, bytes_per_unit=0.0, scale="none",
                       fixed_bytes=4e7, epochs=3, copies=1)
    measured = plan.Measured([stage], [3.0], [3.0])
    for folds in (4, 6):
        row, = plan.estimate(measured, plan.Size(1000, 500, 100, [3.0], [3.0], "x", 0.6), folds, 2)
        # ear k trains on the clips scored 1 outside fold k, the ear of every fold on all: K x 600 clips, each
        # beside its copy, 3 epochs
        assert row.hours * 3600 == pytest.approx((folds + 1) * 5.0 + 0.02 * 3 * folds * 600 * 2)
        assert row.disk_gb * 1e9 == pytest.approx((folds + 2) * 4e7)


def test_the_fold_ears_are_fine_tuned_only_where_their_cost_is_measured(planned):
    # one ear on one batch a pass, one on three (the cost per clip), then the sample's K + 1 ears, which every
    # later stage (the ear copies, the fold, inference) reads: new ears there would count ear folders as per-clip disk
    from readaloud.members.gbm.fold_ears import recipe_of
    batch = recipe_of(plan.variant_config("model6asr").model).batch_size
    assert planned["tunings"][:2] == [batch, 3 * batch], planned["tunings"]
    assert len(planned["tunings"]) == 2 + plan.SAMPLE_FOLDS + 1, planned["tunings"]


def test_the_data_folder_and_references_are_not_written(planned):
    assert (listing(planned["data"]), listing(planned["tts"])) == planned["before"]
    assert not list(Path(planned["base"]).glob("assets/*.pth")), "nothing trained into --assets"


def test_a_missing_data_folder_is_named(tmp_path, root):
    for args in (["-m", "readaloud.pipeline.plan"], ["train.py", "--plan"]):
        proc = run_script(root, *args, "--data", tmp_path / "nowhere", ok=False)
        assert proc.returncode == 2 and f"no data folder {tmp_path / 'nowhere'}" in proc.stderr, proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_script(root, "-m", "readaloud.pipeline.plan", "--data", tmp_path / "empty", ok=False)
    assert proc.returncode == 2 and "train_metadata.csv" in proc.stderr, proc.stderr
