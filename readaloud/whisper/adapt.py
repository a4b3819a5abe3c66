"""An ear adapted to the training voices: a Whisper whose decoder is fine-tuned on clips scored 1.

Whisper was trained on adult speech; young readers (and accents it rarely heard) come back as other
words, and every member that reads a frozen Whisper takes that for a wrong answer. Fine-tuning on
the children themselves is the field's largest lever. Here the encoder stays frozen (its output is
cached once per clip: whisper/encoder_cache.py EncoderCache, the clip + a margin) and the decoder's
layers learn, by token cross-entropy, to write each correct clip's expected text as Whisper would
write it (" Honey likes cake."). Token and position embeddings stay as they are (the embedding is
most of the weights and also the output projection: fine-tuning it on a thousand sentences would
teach the vocabulary of those sentences).

The result is saved as a CTranslate2 Whisper folder (int8, like the named backbones), so the ASR
evidence (members/gbm/evidence.py) decodes with it exactly as with a pretrained Whisper, reading the
same cached encoder output it was trained on. Which clips an ear may hear is the caller's business:
members/gbm/fold_ears.py trains one per fold on the other folds' clips only.

Same recipe, rows and weights, same ear: the batches are drawn from a generator seeded by the
recipe, torch's generator is seeded too, and the CPU kernels of one machine are deterministic.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .asr import render_expected
from .encoding import run_layers
from .teacher_forcing import teacher_forced_states

log = logging.getLogger(__name__)
EAR_VERSION = 1
EAR_RECORD = "ear.json"
TOP_FILE = "encoder_top.safetensors"   # an ear's adapted top encoder layers (recipe.encoder_layers > 0)
TOP_CONFIG = "encoder_top_config.json"  # ... and the transformers config they are built from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json")


@dataclass(frozen=True)
class EarRecipe:
    """How an ear adapts (chosen on the children's grouped out-of-fold figures: docs/members.md, "Fold ears")."""
    backbone: str = "whisper-tiny.en"
    epochs: int = 3
    lr: float = 3e-5
    batch_size: int = 8
    margin_s: float = 1.0      # the cached encoder output it trains on and decodes from: the clip + this
    window_s: float = 10.0     # the frozen encoder's padded window (the shortest; longer clips get more)
    seed: int = 0
    copies: int = 1            # ear copies (members/gbm/ear_augment.py) of each clip it trains on: other vocal
                               # tracts, so that a few training voices teach it less of themselves
    encoder_layers: int = 0    # the encoder's top layers that adapt too (0: the decoder only): the layers below
                               # are cached once per clip (torch), the top ones run per ear (AdaptedMemory)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.copies < 0 or self.encoder_layers < 0:
            raise ValueError(f"an ear needs epochs >= 1, batch_size >= 1, lr > 0, copies >= 0 and encoder_layers "
                             f">= 0, got {self}")

    def key(self) -> str:
        fields = asdict(self)
        if not self.encoder_layers:   # the key of the ears made before the option
            fields.pop("encoder_layers")
        blob = json.dumps({**fields, "version": EAR_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def target_ids(tokenizer, prompt: list[int], eot: int, text: str) -> list[int]:
    """The prompt, the expected text as Whisper writes it (render_expected: first word capitalised,
    a final period) and <|endoftext|>."""
    pieces, _ = render_expected(str(text), "")
    ids = [i for p in pieces for i in tokenizer.encode(" " + p, add_special_tokens=False).ids]
    return [*prompt, *ids, *tokenizer.encode(".", add_special_tokens=False).ids, eot]


def _batch_loss(decoder, memory, names: list[str], sequences: list[list[int]], n_prompt: int, eot: int,
                training: bool, top: "EncoderTop | None" = None) -> torch.Tensor:
    """Mean token cross-entropy of the sequences after their prompt, each over its clip's memory (through
    the adapted top encoder layers, `top`, when the memory is what the layers below them output)."""
    mems = [torch.from_numpy(np.asarray(memory.get(n), np.float32)) for n in names]
    T, L = max(len(m) for m in mems), max(len(s) for s in sequences)
    mem = torch.zeros(len(mems), T, mems[0].shape[1])
    mem_mask = torch.zeros(len(mems), T, dtype=torch.bool)
    ids = torch.full((len(sequences), L), eot, dtype=torch.long)
    target = torch.full((len(sequences), L - 1), -100, dtype=torch.long)
    for i, (m, s) in enumerate(zip(mems, sequences)):
        mem[i, :len(m)], mem_mask[i, :len(m)] = m, True
        ids[i, :len(s)] = torch.tensor(s)
        target[i, n_prompt - 1: len(s) - 1] = torch.tensor(s[n_prompt:])   # no loss on the prompt
    if top is not None:
        mem = top(mem, mem_mask)
    states = teacher_forced_states(decoder, mem, mem_mask, ids[:, :-1], training)
    logits = states @ decoder.embed_tokens.weight.T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def length_batches(names: list[str], lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Row indices in batches of similar memory length (less padding), in a random order: a shuffle,
    then windows of 8 batches sorted by length and cut."""
    order = rng.permutation(len(names))
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start: start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[s: s + batch_size].tolist() for s in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class EncoderTop(torch.nn.Module):
    """The encoder's top layers and its final layer norm, over the cached output of the layers below
    ([B, n, D] with a mask of the real positions): what an ear with recipe.encoder_layers adapts."""

    def __init__(self, layers, layer_norm):
        super().__init__()
        self.layers, self.layer_norm = torch.nn.ModuleList(layers), layer_norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(run_layers(x.to(self.layer_norm.weight.dtype), mask, self.layers))

    @classmethod
    def of(cls, model, n: int) -> "EncoderTop":
        """The top `n` layers of a transformers Whisper model's encoder (its own modules: training them trains it)."""
        encoder = model.model.encoder
        return cls(list(encoder.layers[len(encoder.layers) - n:]), encoder.layer_norm)


def load_top(folder: Path) -> EncoderTop | None:
    """A saved ear's adapted top encoder layers (its TOP_FILE, safetensors), None for a decoder-only ear."""
    from safetensors.torch import load_file
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer
    recipe = ear_recipe(folder)
    if not recipe.encoder_layers:
        return None
    config = WhisperConfig.from_json_file(str(Path(folder) / TOP_CONFIG))
    top = EncoderTop([WhisperEncoderLayer(config) for _ in range(recipe.encoder_layers)],
                     torch.nn.LayerNorm(config.d_model))
    top.load_state_dict(load_file(str(Path(folder) / TOP_FILE)))
    return top.eval()


@dataclass
class AdaptedMemory:
    """What a decoder-only ear's memory is, for an ear whose top encoder layers adapted: the cached output of the
    layers below (`lower`: an EncoderCache or PairedMemory) through that ear's top layers, computed when asked
    for (one layer over the clip + margin: cheap beside the decode)."""
    lower: object
    top: EncoderTop

    @property
    def store(self):
        return self.lower.store

    def __contains__(self, name: str) -> bool:
        return name in self.lower

    def ensure(self, names, progress: bool = True) -> int:
        return self.lower.ensure(names, progress)

    def length(self, name: str) -> int:
        return self.lower.length(name)

    def get(self, name: str) -> np.ndarray:
        x = torch.from_numpy(np.asarray(self.lower.get(name), np.float32))[None]
        with torch.inference_mode():
            return self.top(x, torch.ones(x.shape[:2], dtype=torch.bool))[0].numpy()


def fine_tune_decoder(recipe: EarRecipe, memory, rows: pd.DataFrame, progress: bool = True):
    """tiny.en (or the recipe's backbone) with its decoder layers (and recipe.encoder_layers top encoder
    layers, over `memory` holding what the layers below them output) fine-tuned on `rows` (filename,
    expected_text: clips scored 1 whose memory is in `memory`). Returns the transformers model."""
    import tokenizers
    from transformers import WhisperForConditionalGeneration
    from .backbones import transformers_dir
    folder = Path(transformers_dir(recipe.backbone))
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    decoder = model.model.decoder
    model.requires_grad_(False)
    top = EncoderTop.of(model, recipe.encoder_layers) if recipe.encoder_layers else None
    trained = [p for module in (*decoder.layers, decoder.layer_norm, *([top] if top is not None else []))
               for p in module.parameters()]
    for p in trained:
        p.requires_grad_(True)
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    special = {t: tokenizer.token_to_id(t) for t in ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>",
                                                      "<|en|>", "<|transcribe|>")}
    multilingual = model.config.vocab_size >= 51865
    prompt = [special["<|startoftranscript|>"], *([special["<|en|>"], special["<|transcribe|>"]] if multilingual else []),
              special["<|notimestamps|>"]]
    eot = special["<|endoftext|>"]
    names = rows["filename"].astype(str).tolist()
    sequences = [target_ids(tokenizer, prompt, eot, t) for t in rows["expected_text"]]
    lengths = np.array([memory.length(n) for n in names])
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=0.0)
    model.train()
    steps = sum(len(range(0, len(names), recipe.batch_size)) for _ in range(recipe.epochs))
    bar = tqdm(total=steps, desc=f"ear ({recipe.backbone}, {len(names)} clips)", unit="batch", disable=not progress,
               leave=False)
    for epoch in range(recipe.epochs):
        total = 0.0
        batches = length_batches(names, lengths, recipe.batch_size, rng)
        for batch in batches:
            loss = _batch_loss(decoder, memory, [names[i] for i in batch], [sequences[i] for i in batch],
                               len(prompt), eot, training=True, top=top)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            bar.update(1)
        log.info("ear %s: epoch %d of %d, token cross-entropy %.4f", recipe.key(), epoch + 1, recipe.epochs,
                 total / max(1, len(names)))
    bar.close()
    return model.eval()


def save_ct2(model, recipe: EarRecipe, target: Path, record: dict) -> Path:
    """The fine-tuned model as a CTranslate2 Whisper folder (int8 weights, the backbone's tokenizer),
    written beside `target` and renamed into place, with `ear.json` (recipe and what it trained on)."""
    from ctranslate2.converters import TransformersConverter
    from .backbones import transformers_dir
    source = Path(transformers_dir(recipe.backbone))
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        model.save_pretrained(work / "transformers")
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, work / "transformers" / name)
        TransformersConverter(str(work / "transformers"), copy_files=["tokenizer.json"]).convert(
            str(work / "ct2"), quantization="int8", force=True)
        if recipe.encoder_layers:   # what its decodes read the cached lower layers through (load_top)
            from safetensors.torch import save_file
            top = EncoderTop.of(model, recipe.encoder_layers)
            save_file({k: v.detach().contiguous() for k, v in top.state_dict().items()}, str(work / "ct2" / TOP_FILE))
            model.config.to_json_file(str(work / "ct2" / TOP_CONFIG))
        (work / "ct2" / EAR_RECORD).write_text(json.dumps({"recipe": asdict(recipe), "key": recipe.key(), **record},
                                                          indent=1))
        if target.exists():   # another process finished the same ear first: identical, keep it
            return target
        (work / "ct2").replace(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def is_ear(folder: Path) -> bool:
    return (Path(folder) / "model.bin").is_file() and (Path(folder) / EAR_RECORD).is_file()


def ear_recipe(folder: Path) -> EarRecipe:
    """The recipe a saved ear was made by (its ear.json, written by save_ct2)."""
    return EarRecipe(**json.loads((Path(folder) / EAR_RECORD).read_text())["recipe"])
