"""Code-execution entry point: predicts data/ with the packed ensemble, writes submission.csv.

Runs from the unpacked submission.zip with `data/` beside it; needs no network. Everything
it uses ships in the zip: readaloud/ (code), assets/ (weights, model_configs.json) and
assets/vendor/ (espeak-ng library and voices for the TTS references).
"""
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


def main() -> int:
    from readaloud.pipeline.inference import run_inference, write_fallback_submission
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import espeakng_loader
    logging.info("espeak-ng from %s", Path(espeakng_loader.__file__).parent)
    data = Path(os.environ.get("READALOUD_DATA", HERE / "data"))
    out = Path(os.environ.get("READALOUD_OUT", HERE / "submission.csv"))
    limit = float(os.environ["READALOUD_TIME_LIMIT"]) if "READALOUD_TIME_LIMIT" in os.environ else None
    tts_dir = Path(tempfile.gettempdir()) / "readaloud-tts"
    try:
        result = run_inference(data, HERE / "assets", tts_dir, out, time_limit=limit, progress=False)
        logging.info("wrote %s (%d rows, %d checkpoints, %.0fs)", out, result["rows"],
                     result["checkpoints_used"], result["seconds"])
        return 2 if "error" in result else 0
    except Exception:
        logging.exception("inference failed: writing task priors")
        write_fallback_submission(data, HERE / "assets", out)
        return 2


if __name__ == "__main__":
    sys.exit(main())
