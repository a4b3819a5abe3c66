"""CTranslate2 or transformers for the ASR evidence: the same features, which path is faster?

    python -m readaloud.bench.asr_paths --data DIR --backbones whisper-tiny.en,whisper-base --n 60 --out OUT

The ASR evidence (`readaloud.members.gbm.evidence.WhisperEvidence`) runs through CTranslate2, int8 on CPU.
The same weights also load as a transformers `WhisperForConditionalGeneration` (the converted
backbone folder of `whisper.backbones.transformers_dir`). `TransformersWhisperEvidence` computes
the evidence that way, in float32, with everything else shared: the same padded log-mel window
(10 s, or the next multiple of 10 s holding the clip), prompt
and token ids (the CTranslate2 folder's tokenizer), the same greedy decode rules (beam 1, no
timestamps, CTranslate2's suppressed tokens and step limit), teacher forcing scored as
CTranslate2's `Whisper.align` scores it (softmax over the text tokens only, ids below
<|endoftext|>), and evidence.py's own rendering and feature code on top (`WhisperEvidence.evidence`).

For N rows of DIR/train_metadata.csv (a seeded sample) each path scores every row, one clip per
call, with the same thread count, the paths taking turns row by row (so load from other processes
falls on all alike); the report gives per backbone each path's clips per second (wall time of the
evidence, audio already loaded, after one untimed warm-up clip) and CPU time, how often the
transcripts agree (as written and after normalisation) and, per feature, the correlation and the
median and largest absolute difference between paths. Nothing is cached: every path computes
every row. Written to OUT/asr_paths.md and OUT/asr_paths.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tokenizers
import torch
from tqdm.auto import tqdm
from transformers import WhisperForConditionalGeneration

from ..audio import load_audio
from . import write_report
from ..features import FeatureParams
from ..whisper.encoding import encode_window
from ..members.gbm.evidence import FEATURE_NAMES, AsrSettings, ClipDecode, WhisperEvidence
from ..whisper.asr import available_cores, model_identity
from ..whisper.backbones import NAMED_BACKBONES, backbones_root, ct2_model_dir, transformers_dir
from ..normalise import normalise_words

SEED = 0
CT2_INT8, CT2_FLOAT32, TRANSFORMERS = "ctranslate2-int8", "ctranslate2-float32", "transformers-float32"
# What is compared with what: the member's path with transformers, and int8 with float32 (same engine)
COMPARISONS = ((CT2_INT8, TRANSFORMERS), (CT2_FLOAT32, TRANSFORMERS), (CT2_INT8, CT2_FLOAT32))


class TransformersWhisperEvidence(WhisperEvidence):
    """`WhisperEvidence` computed by transformers (float32, CPU) instead of CTranslate2.

    Only the three model calls differ (`encode`, `decode`, `token_logprobs`); the rendering of
    the expected text and the features are WhisperEvidence's own. The CTranslate2 model is not
    loaded (no call to the parent's __init__): its tokenizer.json gives the same ids.
    """

    def __init__(self, backbone: str, threads: int = 0, settings: AsrSettings = AsrSettings(),
                 assets: str | Path = "assets"):
        named = backbone in NAMED_BACKBONES
        self.name = backbone if named else Path(backbone).name
        self.model_dir = ct2_model_dir(backbone, backbones_root(assets) / "ct2") if named else Path(backbone)
        if not (self.model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}: no tokenizer.json (give a named backbone or a CTranslate2 "
                                    f"Whisper folder, whose tokenizer gives the prompt and text ids)")
        self.settings = settings
        self.device, self.compute_type, self.batch_size = "cpu", "float32", 1
        self.threads = threads if threads > 0 else available_cores()
        self.transformers_dir = transformers_dir(backbone, assets)
        self.model = WhisperForConditionalGeneration.from_pretrained(self.transformers_dir,
                                                                     dtype=torch.float32).eval()
        config, generation = self.model.config, self.model.generation_config
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        self.eot = self._special("<|endoftext|>")
        sot, no_timestamps = self._special("<|startoftranscript|>"), self._special("<|notimestamps|>")
        multilingual = config.vocab_size >= 51865
        language = [self._special("<|en|>"), self._special("<|transcribe|>")] if multilingual else []
        self.start_sequence = [sot, *language]
        self.prompt = [*self.start_sequence, no_timestamps]
        no_speech = [t for t in ("<|nospeech|>", "<|nocaptions|>") if self.tokenizer.token_to_id(t) is not None]
        if not no_speech:
            raise ValueError(f"{self.model_dir}/tokenizer.json has neither <|nospeech|> nor <|nocaptions|>")
        self.no_speech = self.tokenizer.token_to_id(no_speech[0])
        self.suppress = torch.tensor(sorted(generation.suppress_tokens or []), dtype=torch.long)
        self.suppress_begin = torch.tensor(sorted(generation.begin_suppress_tokens or []), dtype=torch.long)
        self.params = FeatureParams(n_mels=config.num_mel_bins)
        self.identity = f"{self.name}_{model_identity(self.model_dir)}_transformers-float32_{settings.key()}"

    def encode(self, audios: list[np.ndarray]) -> np.ndarray:
        """Clips of one window size (`evidence` groups them): `encode_window` runs transformers'
        encoder layers on 10 and 20 s windows too, whose own forward accepts 30 s only."""
        mels = torch.from_numpy(np.stack([self.window_features(a) for a in audios]))
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return encode_window(self.model.model.encoder, mels).numpy()

    def decode(self, encoded: np.ndarray) -> list[ClipDecode]:
        """Greedy transcripts, clip by clip, following CTranslate2's rules: suppressed tokens
        masked before the log softmax, blank and end of text masked at the first step, at most
        min(max_length / 2, max_length - prompt + 1) steps; the score is the sum of the chosen
        tokens' log p (end of text included) over the number of text tokens."""
        limit = self.settings.max_length
        steps = min(limit // 2, limit - len(self.prompt) + 1)
        out = []
        with torch.inference_mode():
            for row in torch.from_numpy(np.ascontiguousarray(encoded)).split(1):
                result = self.model.model.decoder(input_ids=torch.tensor([self.prompt]), encoder_hidden_states=row,
                                                  use_cache=True)
                no_speech_prob = float(torch.softmax(self.model.proj_out(result.last_hidden_state[0, 0]), -1)[
                    self.no_speech])
                ids, total = [], 0.0
                for step in range(steps):
                    logits = self.model.proj_out(result.last_hidden_state[0, -1]).clone()
                    logits[self.suppress] = -torch.inf
                    if step == 0:
                        logits[self.suppress_begin] = -torch.inf
                    logp = torch.log_softmax(logits, -1)
                    token = int(torch.argmax(logp))
                    total += float(logp[token])
                    if token == self.eot:
                        break
                    ids.append(token)
                    result = self.model.model.decoder(input_ids=torch.tensor([[token]]), encoder_hidden_states=row,
                                                      past_key_values=result.past_key_values, use_cache=True)
                text_ids = [t for t in ids if t < self.eot]
                out.append(ClipDecode(self.tokenizer.decode(text_ids).strip(), text_ids,
                                      {"gen_avg_logprob": total / len(ids) if ids else -np.inf,
                                       "no_speech_prob": no_speech_prob}))
        return out

    def token_logprobs(self, encoded: np.ndarray, rows: list[int], sequences: list[list[int]]) -> list[np.ndarray]:
        """Teacher-forced log p of each sequence after the prompt, softmax over the text tokens
        (ids below <|endoftext|>), as CTranslate2's `text_token_probs`; one batch, right-padded
        (the decoder is causal, so padding after a sequence changes nothing in it)."""
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(sequences)
        todo = [k for k, s in enumerate(sequences) if s]
        if not todo:
            return out
        width = len(self.prompt) + max(len(sequences[k]) for k in todo)
        ids = torch.full((len(todo), width), self.eot, dtype=torch.long)
        for b, k in enumerate(todo):
            ids[b, :len(self.prompt) + len(sequences[k])] = torch.tensor(self.prompt + sequences[k])
        memory = torch.from_numpy(np.ascontiguousarray(encoded[[rows[k] for k in todo]]))
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            hidden = self.model.model.decoder(input_ids=ids, encoder_hidden_states=memory).last_hidden_state
            logp = torch.log_softmax(self.model.proj_out(hidden)[..., :self.eot].double(), -1)
        first = len(self.prompt) - 1      # the <|notimestamps|> position predicts the first text token
        for b, k in enumerate(todo):
            target = torch.tensor(sequences[k])
            out[k] = logp[b, first + torch.arange(len(target)), target].numpy().astype(np.float32)
        return out


# ---- the comparison --------------------------------------------------------------------------------

def sample_rows(data: Path, n: int) -> pd.DataFrame:
    """n rows of train_metadata.csv (seeded), each with expected text and a readable clip."""
    path = data / "train_metadata.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: --data needs a folder in the competition layout")
    meta = pd.read_csv(path, dtype={"filename": str})
    for column in ("filename", "expected_text"):
        if column not in meta.columns:
            raise SystemExit(f"{path}: no {column!r} column (columns: {', '.join(meta.columns)})")
    meta = meta[meta["expected_text"].notna()]
    return meta.sample(n=min(n, len(meta)), random_state=SEED).reset_index(drop=True)


def run_paths(models: dict[str, WhisperEvidence], audios: list[np.ndarray], texts: list[str], desc: str) -> dict:
    """Every row's features and transcript through each model, and each model's time.

    The paths take turns row by row (after one untimed warm-up clip each), so load from other
    processes on a shared machine falls on all of them alike; wall and CPU seconds are both kept.
    """
    for model in models.values():
        model.evidence(audios[:1], [texts[:1]])
    runs = {label: {"X": np.full((len(texts), len(FEATURE_NAMES)), np.nan, np.float32), "transcripts": [],
                    "seconds": 0.0, "cpu_seconds": 0.0} for label in models}
    for row, (audio, text) in enumerate(tqdm(list(zip(audios, texts)), desc=desc, unit="clip")):
        for label, model in models.items():
            run = runs[label]
            wall, cpu = time.perf_counter(), time.process_time()
            decodes, evidence = model.evidence([audio], [[text]])
            run["seconds"] += time.perf_counter() - wall
            run["cpu_seconds"] += time.process_time() - cpu
            run["X"][row] = evidence[0][0].features
            run["transcripts"].append(decodes[0].transcript)
    return runs


def compare(a: dict, b: dict) -> dict:
    """Transcript agreement and, per feature, correlation and absolute differences of two paths."""
    same = [x == y for x, y in zip(a["transcripts"], b["transcripts"])]
    same_norm = [normalise_words(x) == normalise_words(y) for x, y in zip(a["transcripts"], b["transcripts"])]
    features = {}
    for k, name in enumerate(FEATURE_NAMES):
        x, y = a["X"][:, k].astype(np.float64), b["X"][:, k].astype(np.float64)
        finite = np.isfinite(x) & np.isfinite(y)
        nan_mismatch = int((np.isnan(x) != np.isnan(y)).sum())
        diff = np.abs(x[finite] - y[finite])
        varies = finite.sum() > 2 and np.std(x[finite]) > 0 and np.std(y[finite]) > 0
        features[name] = {"corr": float(np.corrcoef(x[finite], y[finite])[0, 1]) if varies else None,
                          "median_abs_diff": float(np.median(diff)) if diff.size else None,
                          "max_abs_diff": float(diff.max()) if diff.size else None,
                          "rows_compared": int(finite.sum()), "nan_in_one_only": nan_mismatch}
    return {"transcripts_identical": float(np.mean(same)),
            "transcripts_identical_normalised": float(np.mean(same_norm)),
            "differing_transcripts": [(x, y) for x, y, s in zip(a["transcripts"], b["transcripts"], same_norm)
                                      if not s],
            "features": features}


def compare_backbone(backbone: str, audios: list[np.ndarray], texts: list[str], threads: int,
                     assets: str | Path, ct2_float32: bool = True) -> dict:
    """Run every path of one backbone over the rows and compare them pairwise."""
    # one clip at a time on all threads (workers=1), like the transformers path it is compared with
    models = {CT2_INT8: WhisperEvidence(backbone, device="cpu", compute_type="int8", threads=threads, workers=1),
              TRANSFORMERS: TransformersWhisperEvidence(backbone, threads=threads, assets=assets)}
    if ct2_float32:
        models[CT2_FLOAT32] = WhisperEvidence(backbone, device="cpu", compute_type="float32", threads=threads,
                                              workers=1)
    runs = run_paths(models, audios, texts, backbone)
    paths = {label: {"clips": len(texts), "seconds": round(r["seconds"], 2), "cpu_seconds": round(r["cpu_seconds"], 2),
                     "clips_per_s": len(texts) / r["seconds"]} for label, r in runs.items()}
    comparisons = {f"{a} vs {b}": compare(runs[a], runs[b]) for a, b in COMPARISONS if a in runs and b in runs}
    return {"paths": paths, "comparisons": comparisons}


# ---- the report ------------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [f"# ASR evidence: CTranslate2 vs transformers on {report['data']}", "",
             f"{report['n']} rows of train_metadata.csv (seed {SEED}), {report['threads']} threads, "
             f"one clip per call, the member's padded window (10 s, or the next multiple of 10 s that holds the clip); clips/s = rows / wall time of the evidence (audio loaded, "
             f"after one warm-up clip; the paths take turns row by row). CPU s: the process's CPU time.", ""]
    for backbone, result in report["backbones"].items():
        lines += [f"## {backbone}", "", "| path | clips/s (wall) | wall s | CPU s |", "| --- | --- | --- | --- |"]
        lines += [f"| {label} | {p['clips_per_s']:.2f} | {p['seconds']:.1f} | {p['cpu_seconds']:.1f} |"
                  for label, p in result["paths"].items()]
        for pair, c in result["comparisons"].items():
            lines += ["", f"**{pair}**: transcripts identical {100 * c['transcripts_identical']:.1f}%, "
                      f"identical after normalisation {100 * c['transcripts_identical_normalised']:.1f}%", "",
                      "| feature | correlation | median abs diff | max abs diff |", "| --- | --- | --- | --- |"]
            lines += [f"| {name} | {_fmt(f['corr'], 4)} | {_fmt(f['median_abs_diff'])} | {_fmt(f['max_abs_diff'])} |"
                      for name, f in c["features"].items()]
            lines += [f"- differs: {a!r} / {b!r}" for a, b in c["differing_transcripts"][:5]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder in the competition layout (train_metadata.csv)")
    p.add_argument("--backbones", default="whisper-tiny.en,whisper-base",
                   help="comma-separated named backbones or CTranslate2 Whisper folders")
    p.add_argument("--n", type=int, default=60, help="rows of train_metadata.csv to score (seeded sample)")
    p.add_argument("--out", default=None, help="report folder (default: <data>/asr_paths)")
    p.add_argument("--threads", type=int, default=2, help="threads of every path (0: every core this process may use)")
    p.add_argument("--assets", default="assets", help="where converted backbones live (<assets>/backbones)")
    p.add_argument("--no_ct2_float32", action="store_true", help="skip CTranslate2 float32 (int8 vs transformers only)")
    args = p.parse_args(argv)
    data = Path(args.data)
    out = Path(args.out) if args.out else data / "asr_paths"
    rows = sample_rows(data, args.n)
    audios = [load_audio(data / name) for name in rows["filename"]]
    texts = [" ".join(str(t).split()) for t in rows["expected_text"]]
    threads = args.threads if args.threads > 0 else available_cores()
    report = {"data": str(data), "n": len(rows), "threads": threads, "files": rows["filename"].tolist(),
              "backbones": {}}
    for backbone in [b.strip() for b in args.backbones.split(",") if b.strip()]:
        report["backbones"][backbone] = compare_backbone(backbone, audios, texts, threads, args.assets,
                                                         not args.no_ct2_float32)
    return write_report(out, "asr_paths", report, markdown(report))


if __name__ == "__main__":
    main()
