"""The ASR-workers benchmark times one worker against one per thread and checks the evidence
(open and closed transcripts, every feature) is the same."""
from conftest import run_script
from readaloud.bench import asr_workers


def test_asr_workers_reports_speed_and_identical_evidence(tmp_path, root):
    data = tmp_path / "data"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 6, "--n-test", 2, "--seed", 2)
    out = tmp_path / "out"
    report = asr_workers.main(["--data", str(data), "--n", "5", "--repeats", "2", "--backbones", "whisper-tiny.en",
                               "--threads", "2", "--out", str(out)])
    runs = report["backbones"]["whisper-tiny.en"]
    assert len(runs) == 2 and all(r["same"] for r in runs), runs
    assert all(r["one_worker_s"] > 0 and r["workers_s"] > 0 for r in runs)
    table = (out / "asr_workers.md").read_text()
    assert f"| whisper-tiny.en | {5 / runs[0]['one_worker_s']:.2f} / " in table and "| yes |" in table
