"""Predict the test set with the fitted ensemble and write submission.csv (works offline).

    python infer.py [--data data] [--assets assets] [--out submission.csv] [--device auto] [--time_limit S]
                    [--explain [FILE]] [--report DIR]

Rows and order follow data/submission_format.csv. With data/test_labels.csv present the test
log loss is printed (ensemble, each model, and the task prior). --explain also writes, per row,
the expected words with Whisper's probability of each, the transcript and the least likely word
(FILE .csv or .jsonl; default <out>_explain.csv), after the submission: its failure is logged,
never the submission's. --report DIR writes DIR/index.html, a page for the people who check the
scores (readaloud/pipeline/review.py: per row the clip, the words coloured by probability, the
transcript, the ensemble's and each member's score; marks downloaded as corrections.csv for
preprocess.py --corrections), also after the submission and never at its cost.
"""
import argparse
import json
import logging
import sys

from readaloud.cli import add_common, add_ray_options
from readaloud.pipeline.inference import run_inference, write_fallback_submission
from readaloud.ray_jobs import read_rows, run_inference_on_ray


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common(p)
    p.add_argument("--out", default="submission.csv")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--time_limit", type=float, default=None, help="seconds; fewer models when time runs short")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--rows", default=None, help="only the submission rows listed in this CSV (a filename column)")
    add_ray_options(p, unit="shard")  # --ray [ADDRESS]: the rows split over Ray tasks, merged into one --out
    p.add_argument("--ray_shards", type=int, default=None, help="shards with --ray (default: as many as run at once)")
    p.add_argument("--explain", nargs="?", const="", default=None, metavar="FILE",
                   help="per-word evidence per row (.csv or .jsonl; default <out>_explain.csv)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="a review page DIR/index.html: each row's clip, words by probability, scores, marks")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.ray is not None:
            result = run_inference_on_ray(args.data, args.assets, args.tts_dir, args.out, args.device, args.time_limit,
                                          args.ray, args.ray_shards, args.cpus_per_shard, args.gpus_per_shard,
                                          progress=not args.no_progress)
        else:
            result = run_inference(args.data, args.assets, args.tts_dir, args.out, args.device, args.time_limit,
                                   progress=not args.no_progress, rows=read_rows(args.rows) if args.rows else None)
    except Exception:  # the file must exist whatever happened: priors, and a non-zero exit
        logging.exception("inference failed; writing a fallback submission of task priors")
        try:
            n = write_fallback_submission(args.data, args.assets, args.out)
            print(f"wrote {args.out}: {n} rows of task priors (no model prediction could be made)")
        except Exception:
            logging.exception("could not even write a fallback submission")
        sys.exit(2)
    print(f"wrote {result['submission']}: {result['rows']} rows from {result['checkpoints_used']}/"
          f"{result['checkpoints_listed']} checkpoints ({', '.join(result['models_used']) or 'none'}), "
          f"{result['fallback_rows']} prior fallbacks, {result['seconds']:.1f}s")
    if "test_logloss" in result:
        print(f"test log loss: ensemble {result['test_logloss']:.4f} | prior {result['test_logloss_prior']:.4f}")
        for m, v in sorted(result["test_logloss_single"].items()):
            print(f"  {m:14} {v:.4f}")
    with open(str(args.out) + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if args.explain is not None:
        explain(args)
    if args.report is not None:
        report(args, result)
    if "error" in result:
        print(result["error"], file=sys.stderr)
        sys.exit(2)


def explain(args) -> None:
    """infer.py --explain, after the submission is written: a failure is logged, nothing more."""
    try:
        from readaloud.pipeline.explain import explain_path, write_explanations  # here: even a broken import is logged
        done = write_explanations(args.data, args.assets, args.explain or explain_path(args.out), args.out,
                                  args.device, progress=not args.no_progress)
        print(f"wrote {done['explain']}: {done['explained']}/{done['rows']} rows explained ({done['backbone']})")
    except Exception:
        logging.exception("--explain failed (the submission is written and unaffected)")


def report(args, result: dict) -> None:
    """infer.py --report DIR, after the submission is written: a failure is logged, nothing more."""
    try:
        from readaloud.pipeline.review import write_review  # here: even a broken import is logged
        done = write_review(args.data, args.assets, args.report, args.out, result, args.device,
                            progress=not args.no_progress)
        print(f"wrote {done['report']}: {done['rows']} rows, {done['explained']} with word probabilities"
              f" ({done['backbone'] or 'none'}), {done['labelled']} labelled, members: "
              f"{', '.join(done['members']) or 'ensemble only'}")
    except Exception:
        logging.exception("--report failed (the submission is written and unaffected)")


if __name__ == "__main__":
    main()
