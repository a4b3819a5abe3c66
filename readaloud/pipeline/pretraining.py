"""A head start the project can make itself: phoneme CTC pretraining of the small encoder.

No pretrained speech model can be downloaded here, and BCE on yes/no labels alone does not
teach a fresh encoder to hear. Synthetic speech is unlimited and labelled: texts (the item
bank's words, sentences and nonwords, plus the training texts) are spoken by random
child-like espeak voices with noise, and the encoder learns to recognise their phonemes.
The result is saved with `save_pretrained`, so the variants load it through the very same
`--backbone` / `from_pretrained` path as a real Whisper checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..audio import SAMPLE_RATE, resample
from ..checkpoints import atomic_csv, atomic_write
from ..config import ModelConfig
from ..demo.generator import lexicon, speak_like_a_child
from ..features import FeatureParams, FeatureStore, clip_features
from ..layout import BACKBONE_HEADS, BACKBONE_VOCAB
from ..members.pair.pair import PairClassifier, multi_hot, segment_presence
from ..prep.dataset import bucket_batches
from ..text import Vocab, normalise_text

log = logging.getLogger("readaloud.pretrain")
DIGITS = "zero one two three four five six seven eight nine".split()


@dataclass
class PretrainConfig:
    n_utterances: int = 6000
    epochs: int = 6
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    batch_max_frames: int = 6000
    max_batch_size: int = 48
    seed: int = 0
    holdout: float = 0.04          # share of utterances kept back to measure phoneme error rate


def corpus_texts(extra: list[str] | tuple = ()) -> list[str]:
    """Texts to speak: the demo item bank, digits, and any texts given (e.g. training texts)."""
    texts = {normalise_text(t) for t in list(lexicon()) + DIGITS + list(extra) if str(t).strip()}
    return sorted(texts)


def _sample_text(texts: list[str], rng: np.random.Generator) -> str:
    """Mostly one text; sometimes a short run of words or digits, for longer utterances."""
    r = rng.random()
    if r < 0.7:
        return texts[int(rng.integers(len(texts)))]
    words = [w for w in texts if " " not in w]
    if r < 0.85:
        return " ".join(words[int(rng.integers(len(words)))] for _ in range(int(rng.integers(2, 4))))
    return " ".join(DIGITS[int(rng.integers(10))] for _ in range(int(rng.integers(1, 6))))


def _speak(args: tuple[int, int, str, FeatureParams]) -> tuple[str, str, np.ndarray]:
    seed, index, text, params = args
    rng = np.random.default_rng([seed, index])
    audio, sr = speak_like_a_child(text, rng, sample_rate=params.sample_rate)
    audio = resample(audio.astype(np.float32) / 32768.0, sr, SAMPLE_RATE)
    return f"u{index:07d}", text, clip_features(audio, params)


def build_corpus(out_dir: str | Path, texts: list[str], n: int, seed: int = 0, workers: int = 2,
                 params: FeatureParams = FeatureParams(), progress: bool = True) -> tuple[FeatureStore, pd.DataFrame]:
    """n synthetic utterances (features + text), made once and cached in out_dir/corpus."""
    root = Path(out_dir) / "corpus"
    store = FeatureStore(root, "utterances", params)
    index_path = root / "index.csv"
    index = pd.read_csv(index_path, dtype=str, keep_default_na=False) if index_path.exists() else \
        pd.DataFrame(columns=["key", "text"])
    index = index[index["key"].isin(store.keys())]
    rng = np.random.default_rng(seed)
    plan = [(seed, i, _sample_text(texts, rng), params) for i in range(n)]
    todo = [p for p in plan if f"u{p[1]:07d}" not in store]
    if todo:
        rows = []

        def produced():
            if workers > 1:
                with mp.get_context("spawn").Pool(workers) as pool:
                    yield from pool.imap(_speak, todo, chunksize=32)
            else:
                yield from map(_speak, todo)

        def frames():
            for key, text, feats in tqdm(produced(), total=len(todo), desc="synthetic speech",
                                         unit="utt", disable=not progress):
                rows.append((key, text))
                yield key, feats

        try:
            store.add_many(frames())
        finally:
            index = pd.concat([index, pd.DataFrame(rows, columns=["key", "text"])]).drop_duplicates("key")
            index = index[index["key"].isin(store.keys())]
            atomic_csv(index, index_path)
    wanted = {f"u{i:07d}" for i in range(n)}
    return store, index[index["key"].isin(wanted)].reset_index(drop=True)


class CTCEncoder(torch.nn.Module):
    """The classifier's encoder (same class, same forward) with a phoneme CTC head."""

    def __init__(self, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.body = PairClassifier(model_cfg, 1, 1, vocab_size)

    def forward(self, feats, frame_mask):
        hidden, mask = self.body.encode(feats, frame_mask)
        bag = self.body.bag_head(hidden).float() if self.body.bag_head is not None else None
        return F.log_softmax(self.body.ctc_head(hidden).float(), dim=-1), mask, bag

    def loss(self, feats, frame_mask, targets, target_lengths) -> torch.Tensor:
        """CTC + the phoneme-presence (bag) loss, the same objectives the classifier keeps."""
        lp, mask, bag = self(feats, frame_mask)
        n = mask.sum(1)
        loss = F.ctc_loss(lp.transpose(0, 1), targets, n, target_lengths, zero_infinity=True)
        if bag is not None:
            pres = segment_presence(bag, torch.zeros_like(n), n)[:, 1:]
            want = multi_hot(targets, target_lengths, bag.shape[-1]).float()[:, 1:]
            loss = loss + self.body.cfg.bag_weight * F.binary_cross_entropy_with_logits(pres, want)
        return loss


def _batch(store: FeatureStore, keys: list[str], targets: list[list[int]], step: int):
    """Pad utterances to the batch's longest; each keeps a whole number of positions."""
    arrays = [store.get(k)[: max(step, store.length(k) // step * step)] for k in keys]
    n = max(a.shape[0] for a in arrays)
    feats = np.empty((len(arrays), n, arrays[0].shape[1]), np.float32)
    mask = np.zeros((len(arrays), n), bool)
    for b, a in enumerate(arrays):
        feats[b, : a.shape[0]] = a
        feats[b, a.shape[0]:] = a.min()
        mask[b, : a.shape[0]] = True
    flat = torch.tensor([t for ts in targets for t in ts], dtype=torch.long)
    return torch.from_numpy(feats), torch.from_numpy(mask), flat, torch.tensor([len(t) for t in targets])


def edit_distance(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    best = log_probs.argmax(-1).cpu().numpy()
    out = []
    for row, n in zip(best, lengths.cpu().numpy()):
        seq, last = [], 0
        for t in row[:n]:
            if t != last and t != 0:
                seq.append(int(t))
            last = t
        out.append(seq)
    return out


def pretrain_encoder(out_dir: str | Path, model_cfg: ModelConfig = ModelConfig(),
                     cfg: PretrainConfig = PretrainConfig(), extra_texts: list[str] | tuple = (),
                     workers: int = 2, threads: int = 0, progress: bool = True, force: bool = False) -> dict:
    """Build the corpus, train encoder + CTC head, save a Whisper checkpoint in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done_path = out_dir / "pretraining.json"
    settings = {"model": asdict(model_cfg), "pretrain": asdict(cfg), "n_extra_texts": len(set(extra_texts))}
    if done_path.exists() and not force:
        done = json.loads(done_path.read_text())
        if done.get("settings") == settings:
            print(f"pretrained encoder up to date in {out_dir} (phoneme error rate {done['holdout_per']:.3f}); "
                  f"--force to redo")
            return done
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    texts = corpus_texts(extra_texts)
    store, index = build_corpus(out_dir, texts, cfg.n_utterances, cfg.seed, workers, progress=progress)
    t_corpus = time.time() - t0
    vocab = Vocab.build(list(index["text"]) + texts, "phoneme")
    keys = index["key"].tolist()
    targets = [vocab.encode(t) for t in index["text"]]
    lengths = np.array([store.length(k) for k in keys])
    step = 2 * model_cfg.position_pool
    ok = np.array([len(t) > 0 and lengths[i] // step >= 2 * len(t) for i, t in enumerate(targets)])
    order = np.random.default_rng(cfg.seed).permutation(len(keys))
    n_hold = max(1, int(cfg.holdout * len(keys)))
    hold = [i for i in order[:n_hold] if ok[i]]
    train = np.array([i for i in order[n_hold:] if ok[i]])

    model = CTCEncoder(model_cfg, len(vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    n_batches = len(bucket_batches(lengths[train], cfg.batch_max_frames, cfg.max_batch_size, True, 0))
    total = cfg.epochs * n_batches
    warm = max(1, int(cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        te = time.time()
        batches = bucket_batches(lengths[train], cfg.batch_max_frames, cfg.max_batch_size, True, seed=cfg.seed + epoch)
        total_loss, seen = 0.0, 0
        for idx in tqdm(batches, desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False):
            rows = train[idx]
            feats, mask, flat, tl = _batch(store, [keys[i] for i in rows], [targets[i] for i in rows], step)
            loss = model.loss(feats, mask, flat, tl)
            if not torch.isfinite(loss):
                opt.zero_grad(set_to_none=True)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(rows)
            seen += len(rows)
        per = phoneme_error_rate(model, store, [keys[i] for i in hold], [targets[i] for i in hold], step)
        history.append({"epoch": epoch + 1, "train_ctc": total_loss / max(1, seen), "holdout_per": per,
                        "seconds": time.time() - te})
        log.info("pretrain epoch %d/%d: CTC %.3f, held-out phoneme error rate %.3f (%.0fs)",
                 epoch + 1, cfg.epochs, total_loss / max(1, seen), per, time.time() - te)
    save_backbone(model, vocab, out_dir)
    pd.DataFrame(history).to_csv(out_dir / "pretrain_metrics.csv", index=False)
    result = {"settings": settings, "holdout_per": history[-1]["holdout_per"], "history": history,
              "n_utterances": len(keys), "n_texts": len(texts), "corpus_seconds": t_corpus,
              "seconds": time.time() - t0, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "torch_threads": torch.get_num_threads()}
    atomic_write(done_path, json.dumps(result, indent=1))
    return result


@torch.inference_mode()
def phoneme_error_rate(model: CTCEncoder, store: FeatureStore, keys: list[str], targets: list[list[int]],
                       step: int) -> float:
    model.eval()
    errors = total = 0
    for s in range(0, len(keys), 32):
        feats, mask, _, _ = _batch(store, keys[s: s + 32], targets[s: s + 32], step)
        lp, hmask, _ = model(feats, mask)
        for hyp, ref in zip(greedy_decode(lp, hmask.sum(1)), targets[s: s + 32]):
            errors += edit_distance(hyp, ref)
            total += len(ref)
    return errors / max(1, total)


def save_backbone(model: CTCEncoder, vocab: Vocab, out_dir: Path) -> None:
    """A WhisperModel checkpoint (save_pretrained) + the CTC head and its phoneme vocabulary."""
    from safetensors.torch import save_file
    from transformers import WhisperModel
    body = model.body
    whisper = WhisperModel(body.whisper_config)
    whisper.encoder.load_state_dict(body.encoder.state_dict())
    whisper.save_pretrained(out_dir)
    heads = {"ctc": body.ctc_head, "bag": body.bag_head}
    save_file({f"{name}.{p}": getattr(h, p).detach().contiguous() for name, h in heads.items() if h is not None
               for p in ("weight", "bias")}, str(out_dir / BACKBONE_HEADS))
    (out_dir / BACKBONE_VOCAB).write_text(json.dumps(vocab.to_dict()))
