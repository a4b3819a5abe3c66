"""A CTranslate2 Whisper folder loaded offline, and the expected text written as Whisper writes it.

Shared by the members that read a real Whisper: model6asr's evidence (members/gbm/evidence.py), the
CTranslate2 window encoder (whisper/encoding.py) and model8decoder (members/decoder/decoder.py, which
teacher-forces `render_expected`'s pieces). The ctranslate2 package is imported when first needed.
"""
from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

from .backbones import BackboneError
from ..normalise import matched_pairs, normalise_tokens, surface_words

SENTENCE_MARKS = ".?!"  # a sentence-final mark: the rendering's last piece loses it (the caller adds its own)


def ct2_engine():
    """The ctranslate2 module, imported when first needed (importing the package needs no engine), or
    an error saying how to get it."""
    try:
        import ctranslate2
    except ImportError as exc:
        raise BackboneError("the ASR evidence and the CTranslate2 encoder need the package 'ctranslate2', which is "
                            "not installed. To fix: pip install ctranslate2==4.8.5 (a packed submission ships it "
                            "under assets/vendor)") from exc
    return ctranslate2


def resolve_device(device: str = "auto", compute_type: str = "auto") -> tuple[str, str]:
    """("cuda", "float16") when a CUDA device is visible (or asked for), else ("cpu", "int8")."""
    if device == "auto":
        device = "cuda" if ct2_engine().get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if compute_type == "auto":
        compute_type = "float16" if device == "cuda" else "int8"
    return device, compute_type


def load_ct2_whisper(model_dir: str | Path, device: str, compute_type: str, inter_threads: int = 1,
                     intra_threads: int = 0):
    """`ctranslate2.models.Whisper`, leaving torch's thread count as it was. Loading a model sets the
    calling thread's OpenMP thread count, which torch shares, to the model's intra_threads: a
    process that had loaded the ASR models (one thread per clip) ran every later torch step on one
    thread (model8decoder's encoder cache in train.py after model6asr, its inference folds in infer.py
    too; docs/architecture.md, "A CTranslate2 load set torch's thread count")."""
    torch = sys.modules.get("torch")   # not imported: nothing to keep
    threads = torch.get_num_threads() if torch is not None else None
    try:
        return ct2_engine().models.Whisper(str(model_dir), device=device, compute_type=compute_type,
                                          inter_threads=inter_threads, intra_threads=intra_threads)
    finally:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@lru_cache(maxsize=8)
def _content_hash(model_bin: str, size: int, mtime_ns: int, config: bytes) -> str:
    digest = hashlib.sha1(config)
    with open(model_bin, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def model_identity(model_dir: Path) -> str:
    """A short id of the weights in a CTranslate2 folder (hash of model.bin and config.json)."""
    model_bin = model_dir / "model.bin"
    stat = model_bin.stat()
    return _content_hash(str(model_bin), stat.st_size, stat.st_mtime_ns, (model_dir / "config.json").read_bytes())


def render_expected(expected: str, transcript: str) -> tuple[list[str], list[list[int]]]:
    """Pieces of the expected text to teacher-force, and the expected words each stands for.

    A run of expected words whose normalised tokens all match (one minimal-edit alignment) a run of
    transcript words, with nothing else in either run, is written as the transcript writes it
    ("seven two nine" heard as "7, 2, 9." -> "7,", "2,", "9"; "kate" -> "Kate"); other words stay
    as given, the first capitalised, a lone "i" as "I". The last piece loses a sentence-final mark
    (the rendering adds its own).
    """
    e_words, t_words = surface_words(expected), surface_words(transcript)
    e_tok, t_tok = normalise_tokens(expected), normalise_tokens(transcript)
    pairs = matched_pairs([t.text for t in e_tok], [t.text for t in t_tok])
    blocks = _agreeing_blocks(e_tok, t_tok, pairs)
    pieces: list[str] = []
    piece_words: list[list[int]] = []
    i = 0
    while i < len(e_words):
        block = blocks.get(i)
        if block is not None:
            (e0, e1), (t0, t1) = block
            pieces.append(" ".join(t_words[t0:t1 + 1]))
            piece_words.append(list(range(e0, e1 + 1)))
            i = e1 + 1
        else:
            word = e_words[i]
            if word.lower() in ("i", "i'm", "i'll", "i've", "i'd"):
                word = "I" + word[1:]
            pieces.append(word[:1].upper() + word[1:] if not pieces else word)
            piece_words.append([i])
            i += 1
    if pieces:
        pieces[-1] = pieces[-1].rstrip(SENTENCE_MARKS) or pieces[-1]
    return pieces, piece_words


def _agreeing_blocks(e_tok, t_tok, pairs) -> dict[int, tuple[tuple[int, int], tuple[int, int]]]:
    """{first expected word: ((e0, e1), (t0, t1))} for runs of words that agree completely."""
    e_of_t = {j: i for i, j in pairs}
    t_of_e = dict(pairs)
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    def union(a, b):
        parent[find(a)] = find(b)
    for tok_list, side in ((e_tok, "e"), (t_tok, "t")):
        for tok in tok_list:
            for w in range(tok.first, tok.last + 1):
                union((side, tok.first), (side, w))
    for i, j in pairs:
        union(("e", e_tok[i].first), ("t", t_tok[j].first))
    groups: dict = {}
    for side, tok_list in (("e", e_tok), ("t", t_tok)):
        for k, tok in enumerate(tok_list):
            groups.setdefault(find((side, tok.first)), []).append((side, k))
    blocks = {}
    for members in groups.values():
        e_idx = [k for s, k in members if s == "e"]
        t_idx = [k for s, k in members if s == "t"]
        if not e_idx or not t_idx:
            continue
        if any(k not in t_of_e for k in e_idx) or any(k not in e_of_t for k in t_idx):
            continue  # something in this stretch disagrees
        e_span = (min(e_tok[k].first for k in e_idx), max(e_tok[k].last for k in e_idx))
        t_span = (min(t_tok[k].first for k in t_idx), max(t_tok[k].last for k in t_idx))
        blocks[e_span[0]] = (e_span, t_span)
    return blocks
