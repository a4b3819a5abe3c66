"""Code-execution entry point: predicts data/ with the packed ensemble, writes submission.csv.

Runs from the unpacked submission.zip with `data/` beside it; needs no network, and of the runtime
only the packages in requirements-runtime.txt (beside this file). Everything else ships in the zip:
readaloud/ (code), assets/ (checkpoints, model_configs.json), assets/backbones/ (the Whisper
weights the members read) and assets/vendor/ (the CTranslate2 engine; espeak-ng's library and
voices). Whatever fails, imports included, a valid submission.csv is written: task priors where no
model could predict, 0.5 where not even the priors can be read.
"""
import csv
import logging
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "assets" / "vendor"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("READALOUD_BACKBONES", str(HERE / "assets" / "backbones"))
# The kernels the Makefile pins for training and infer.py (torch, MKL and oneDNN, CTranslate2's too): set
# before either is imported, so the runtime computes the numbers the training machine's infer.py did
# (without them the int8 ASR kernels differ, and a tree split can turn on a feature's last digits)
for _name, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
    os.environ.setdefault(_name, _value)


def write_half_submission(data: Path, out: Path) -> None:
    """The submission format's rows at 0.5, with the standard library alone (nothing else could run)."""
    with open(data / "submission_format.csv", newline="") as f:
        names = [row["filename"] for row in csv.DictReader(f)]
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "score"])
        writer.writerows([name, 0.5] for name in names)
    os.replace(tmp, out)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = Path(os.environ.get("READALOUD_DATA", HERE / "data"))
    out = Path(os.environ.get("READALOUD_OUT", HERE / "submission.csv"))
    limit = float(os.environ["READALOUD_TIME_LIMIT"]) if "READALOUD_TIME_LIMIT" in os.environ else None
    tts_dir = Path(tempfile.gettempdir()) / "readaloud-tts"
    try:
        from readaloud.pipeline.inference import run_inference
        for module in ("espeakng_loader", "ctranslate2"):   # the vendored copies: say which were found
            try:
                logging.info("%s from %s", module.split("_")[0].replace("espeakng", "espeak-ng"),
                             Path(__import__(module).__file__).parent)
            except ImportError as exc:
                logging.warning("%s is not importable (%s): the members that need it are dropped", module, exc)
        result = run_inference(data, HERE / "assets", tts_dir, out, time_limit=limit, progress=False)
        logging.info("wrote %s (%d rows, %d of %d checkpoints, %.0fs)", out, result["rows"],
                     result["checkpoints_used"], result["checkpoints_listed"], result["seconds"])
        return 2 if "error" in result else 0
    except Exception:
        logging.exception("inference failed: writing task priors")
    try:
        from readaloud.pipeline.inference import write_fallback_submission
        write_fallback_submission(data, HERE / "assets", out)
    except Exception:
        logging.exception("no task priors either: writing 0.5 for every row")
        write_half_submission(data, out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
