"""The per-member speed benchmark times each Whisper member's per-clip work at both windows and
reports clips/s from those times."""
from conftest import run_script
from readaloud.bench import member_speed


def test_member_speed_reports_both_windows(tmp_path, root, monkeypatch):
    data = tmp_path / "data"
    run_script(root, "make_demo_data.py", "--out", data, "--n-train", 4, "--n-test", 2, "--seed", 1)
    monkeypatch.setenv("READALOUD_BACKBONES", str(tmp_path / "backbones"))
    report = member_speed.main(["--data", str(data), "--n", "3", "--models", "model8decoder,model5gbm",
                                "--threads", "2", "--out", str(tmp_path / "out")])
    stages = report["members"]["model8decoder"]
    assert list(stages) == ["frozen encoder (whisper-tiny.en)"] and "model5gbm" not in report["members"]
    seconds = stages["frozen encoder (whisper-tiny.en)"]
    assert seconds["30.0"] > 0 and seconds["10.0"] > 0
    table = (tmp_path / "out" / "member_speed.md").read_text()
    assert f"| model8decoder | frozen encoder (whisper-tiny.en) | {3 / seconds['30.0']:.2f} |" in table
