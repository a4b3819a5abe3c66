"""The closed-limit benchmark runs on a tiny demo set and reports what it measured."""
import json
import subprocess
import sys


def test_closed_limit_benchmark_times_both_limits_and_counts_the_changes(tmp_path, root):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "make_demo_data.py", "--out", str(data), "--n-train", "12", "--n-test", "2",
                    "--seed", "4"], cwd=root, check=True, capture_output=True)
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, "-m", "readaloud.bench.closed_limit", "--data", str(data), "--n", "8",
                          "--backbones", "whisper-tiny.en", "--out", str(out)],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "closed_limit.json").read_text())
    r = report["backbones"]["whisper-tiny.en"]
    assert report["n"] == 8 and r["clips"] == 8
    assert r["unlimited_s"] > 0 and r["limited_s"] > 0
    assert r["mean_tokens_limited"] <= r["mean_tokens_unlimited"], "a limit never lengthens a transcript"
    assert r["features_changed"] <= r["changed"] <= r["clips"] and r["loops"] <= r["clips"]
    assert "| whisper-tiny.en | 8 |" in (out / "closed_limit.md").read_text()
