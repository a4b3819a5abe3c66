"""The plan (python -m readaloud.pipeline.plan, train.py --plan): every stage of the chosen members, measured
on a sample in a temporary folder, scaled to any size; the data folder's caches are only read."""
import hashlib
from pathlib import Path

import pytest

from conftest import preprocessed_demo, run_script
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
    try:
        out = plan.main(["--data", str(data), "--tts_dir", str(tts), "--assets", str(base / "assets"), "--sample", "6",
                         "--clips", "1000", "--test_clips", "500", "--json", str(base / "plan.json"),
                         "--asr_backbones", "whisper-tiny.en"])
    finally:
        mp.undo()
    return {"out": out, "data": data, "tts": tts, "before": before, "base": base}


def test_every_stage_of_the_members_is_planned(planned):
    names = [s["name"] for s in planned["out"]["stages"]]
    expected = ["preprocess: TTS references", "preprocess: clip features",
                "model6asr: alignment features", "model6asr: ASR evidence (whisper-tiny.en)", "model6asr: fold ears",
                "model6asr: ear copies",
                "model6asr: training", "model6asr: inference, test clips' ASR evidence (whisper-tiny.en)",
                "model6asr: inference, each fold's predictions",
                "model8decoder: frozen encoder cache (whisper-tiny.en)", "model8decoder: training",
                "model8decoder: inference, test clips' frozen encoder cache", "model8decoder: inference, each fold's predictions"]
    for stage in expected:
        assert any(n.startswith(stage) for n in names), (stage, names)
    assert not any("whisper-base" in n for n in names), "the override --asr_backbones reached the plan"
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
    hours = [plan.estimate(measured, plan.Size(n, n // 2, n, seconds, seconds, "x"), 6, 2) for n in (1000, 2000, 3000)]
    for a, b, c in zip(*hours):
        assert b.hours - a.hours == pytest.approx(c.hours - b.hours, rel=1e-9, abs=1e-12), a.stage
        assert b.hours >= a.hours > 0, a.stage
    per_clip = [r for r in hours[0] if "cache" in r.stage or "evidence" in r.stage]
    assert per_clip and all(b.hours > a.hours for a, b in zip(per_clip, [r for r in hours[1] if r.stage in
                                                                          {p.stage for p in per_clip}]))
    assert sum(r.disk_gb for r in hours[0]) > 0
    by_name = {r.stage: r for r in hours[0]}
    # tiny.en's encoder cache is one, model6asr's fold ears' and model8decoder's: counted where it is filled first
    ears = by_name[f"model6asr: {plan.FOLD_EARS_STAGE}"]
    cache = by_name["model8decoder: frozen encoder cache (whisper-tiny.en)"]
    assert ears.disk_gb > 0 and ears.hours > cache.hours, "the ears' stage fills the encoder cache"
    assert by_name["model8decoder: training"].disk_gb > 0, "the folds' checkpoints"


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
