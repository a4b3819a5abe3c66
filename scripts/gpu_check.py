"""Check the GPU path in a few minutes on a machine with CUDA: tiny demo data, every variant one
update on the GPU, train.py's launcher with CUDA (exec'd folds; forked ones forced, only
reported), two folds sharing one GPU through Ray, and inference on the GPU (in one process, and
in two Ray shards sharing the GPU). Nothing here has been run on a GPU by the project's authors
(their machine has none): run it and read its report before trusting a long GPU run.

    python scripts/gpu_check.py [--work DIR] [--keep] [--probe_clips 400] [--cpu_dry_run]

Every fold is started with `--device cuda`, so a fold that cannot reach the GPU fails instead of
quietly training on the CPU, and its train.log must name the device `cuda`. Mixed precision
(bf16 where supported, else fp16 with a gradient scaler) is what every neural fold on CUDA runs.
--probe_clips N also trains one default-size fold on N clips with and without batches built
ahead (--prefetch) and reports seconds and the GPU's mean utilisation (nvidia-smi), to see
whether data loading keeps the GPU busy. --cpu_dry_run runs the same steps on the CPU (to
check the script itself; it proves nothing about CUDA). Exit code 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from readaloud.variants import VARIANTS  # noqa: E402 (after the repo is on the path)

NEURAL_LOG_DEVICE = ", {device}, "  # the fold's "fold K: N train / M valid clips, ..., <device>, ..." line


class Check:
    """Runs the steps, times them, and keeps what each found for the report."""

    def __init__(self, work: Path, device: str):
        self.work, self.device, self.steps = work, device, []

    def run(self, name: str, *args, env: dict | None = None, ok_codes=(0,)) -> subprocess.CompletedProcess:
        start = time.time()
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
        ok = proc.returncode in ok_codes
        self.steps.append({"step": name, "ok": ok, "seconds": round(time.time() - start, 1),
                           "exit": proc.returncode})
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({time.time() - start:.0f}s)", flush=True)
        if not ok:
            print((proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).rstrip(), flush=True)
        return proc

    def expect(self, name: str, ok: bool, detail: str = "") -> bool:
        self.steps.append({"step": name, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    def fold_device(self, assets: Path, variant: str, fold: int) -> None:
        """A neural fold's train.log names the device it trained on."""
        if variant_arch(variant) == "gbm":
            return
        log = assets / "runs" / f"{variant}_{fold}" / "train.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        self.expect(f"{variant}_{fold} trained on {self.device}", NEURAL_LOG_DEVICE.format(device=self.device) in text,
                    "" if text else f"{log} missing")


def variant_arch(variant: str) -> str:
    from readaloud.variants import variant_config
    return variant_config(variant, {}).model.arch


def cuda_facts(check: Check, dry_run: bool) -> dict:
    import torch
    facts = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available()}
    if facts["cuda"]:
        facts |= {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  "bf16": torch.cuda.is_bf16_supported()}
        dtype = torch.bfloat16 if facts["bf16"] else torch.float16
        with torch.autocast("cuda", dtype=dtype):
            y = torch.randn(64, 64, device="cuda") @ torch.randn(64, 64, device="cuda")
        check.expect(f"autocast on CUDA computes in {dtype}", y.dtype == dtype, str(y.dtype))
    print(json.dumps(facts), flush=True)
    if not dry_run:
        check.expect("CUDA available to torch", facts["cuda"],
                     "" if facts["cuda"] else "install a CUDA build of torch 2.13.0 for this machine's driver")
    return facts


class GpuSampler:
    """Mean GPU utilisation (%) from nvidia-smi, sampled every half second while active."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                self.samples.append(float(out[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="folder for the tiny data and assets (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--probe_clips", type=int, default=0, help="also time a default-size fold on this many clips")
    p.add_argument("--cpu_dry_run", action="store_true", help="the same steps on the CPU (checks the script only)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="readaloud_gpu_check_"))
    device = "cpu" if args.cpu_dry_run else "cuda"
    check = Check(work, device)
    facts = cuda_facts(check, args.cpu_dry_run)
    if not args.cpu_dry_run and not facts["cuda"]:
        return finish(check, work, facts, args.keep)
    data, tts, assets = work / "data", work / "tts", work / "assets"
    common = ["--data", data, "--tts_dir", tts, "--assets", assets, "--n_folds", 2]
    one_step = ["--epochs", 1, "--max_updates", 1, "--device", device]
    check.run("demo data (48 + 14 clips)", "make_demo_data.py", "--out", data, "--n-train", 48, "--n-test", 14,
              "--seed", 3, "--overwrite")
    check.run("preprocess", "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 2)

    gpus = [] if args.cpu_dry_run else ["--gpus", "0"]
    check.run(f"every variant ({len(VARIANTS)}), fold 0, one update, --gpus", "train.py", *common,
              "--models", ",".join(VARIANTS), "--folds", 0, "--jobs", 1, *gpus, *one_step)
    for v in VARIANTS:
        check.fold_device(assets, v, 0)
    check.run("launcher on a CUDA machine without --gpus (exec'd folds), 2 jobs", "train.py", *common,
              "--models", "model1mean,model5gbm", "--folds", 1, "--jobs", 2, *one_step)
    check.fold_device(assets, "model1mean", 1)
    forked = check.run("informative: READALOUD_LAUNCH=fork forced with CUDA (the fork server never touches CUDA)",
                       "train.py", *common, "--models", "model3mapd", "--folds", 1, "--jobs", 1, *one_step,
                       env={"READALOUD_LAUNCH": "fork"}, ok_codes=(0, 1))
    check.steps[-1]["finished"] = forked.returncode == 0
    ray_assets = work / "assets_ray"
    share = ["--gpus_per_fold", 0.5] if not args.cpu_dry_run else []
    check.run("Ray: two folds sharing one GPU (--gpus_per_fold 0.5)", "train.py", "--data", data, "--tts_dir", tts,
              "--assets", ray_assets, "--n_folds", 2, "--models", "model1mean", "--ray", "--cpus_per_fold", 1,
              *share, *one_step)
    for fold in (0, 1):
        check.fold_device(ray_assets, "model1mean", fold)
    check.run("check_models", "check_models.py", "--data", data, "--assets", assets, "--n_folds", 2,
              "--models", "model1mean,model5gbm", ok_codes=(0, 1))
    check.run("get_config", "get_config.py", "--data", data, "--assets", assets, "--models", "model1mean,model5gbm")
    infer = check.run("infer.py --device " + device, "infer.py", "--data", data, "--assets", assets, "--tts_dir", tts,
                      "--out", work / "submission.csv", "--device", device, "--no_progress")
    if infer.returncode == 0:
        rows = sum(1 for _ in open(work / "submission.csv")) - 1
        check.expect("submission has the test set's 14 rows", rows == 14, f"{rows} rows")
    shard_share = ["--gpus_per_shard", 0.5] if not args.cpu_dry_run else []
    fanned = check.run("infer.py --ray: two shards sharing the GPU", "infer.py", "--data", data, "--assets", assets,
                       "--tts_dir", tts, "--out", work / "submission_ray.csv", "--device", device, "--ray",
                       "--ray_shards", 2, *shard_share, "--no_progress")
    if infer.returncode == 0 and fanned.returncode == 0:
        import pandas as pd
        a, b = pd.read_csv(work / "submission.csv"), pd.read_csv(work / "submission_ray.csv")
        gap = float((a["score"] - b["score"]).abs().max())
        check.expect("sharded submission: same rows and order, scores within 1e-2 (bf16 batches differ)",
                     a["filename"].tolist() == b["filename"].tolist() and gap < 1e-2, f"largest difference {gap:.2e}")
    if args.probe_clips:
        probe(check, work, device, args.probe_clips)
    return finish(check, work, facts, args.keep)


def probe(check: Check, work: Path, device: str, clips: int) -> None:
    """One default-size model1mean fold, one epoch, with and without batches built ahead."""
    data, tts = work / "probe_data", work / "tts"
    check.run(f"probe data ({clips} clips)", "make_demo_data.py", "--out", data, "--n-train", clips, "--n-test", 4,
              "--seed", 4, "--overwrite")
    check.run("probe preprocess", "preprocess.py", "--data", data, "--tts_dir", tts, "--n_folds", 2, "--workers", 2)
    for prefetch in (2, 0):
        with GpuSampler() as gpu:
            run = check.run(f"probe fold, --prefetch {prefetch}", "train_model1mean.py", "--fold", 0, "--n_folds", 2,
                            "--data", data, "--tts_dir", tts, "--assets", work / f"probe_assets_{prefetch}",
                            "--epochs", 1, "--device", device, "--prefetch", prefetch, "--no_progress", "--quiet")
        check.steps[-1]["gpu_utilisation_mean"] = gpu.mean()
        print(f"     seconds {check.steps[-1]['seconds']}, mean GPU utilisation {gpu.mean()}%", flush=True)
        if run.returncode != 0:
            break


def finish(check: Check, work: Path, facts: dict, keep: bool) -> int:
    failed = [s["step"] for s in check.steps if not s["ok"]]
    report = {"facts": facts, "steps": check.steps, "failed": failed}
    out = Path.cwd() / "gpu_check.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{len(check.steps) - len(failed)}/{len(check.steps)} checks passed; report: {out}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
