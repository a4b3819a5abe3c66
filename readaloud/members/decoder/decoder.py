"""A real Whisper's decoder teacher-forced on the expected text (`model.arch = "whisperdec"`): the
1st-place design of the "Goodnight Moon" challenge on pretrained weights.

The encoder (whisper-tiny.en, whisper-base, any --backbone) runs once per clip on a zero-padded
window of 10 s (or the next multiple of 10 s that holds the clip, at most Whisper's 30 s:
features.whisper_window_s; real-length input wrecks its transcripts, a padded 10 s window does not,
and it encodes faster than 30 s); its output is cached in float16 (`EncoderCache`, a FeatureStore
beside the clip features, named by the engine, the encoder's weights and the input settings), so an
epoch runs only the decoder and the head. The engine (`make_window_encoder`, `--decoder_encoder`):
CTranslate2 at float32 when the backbone has a CTranslate2 folder (the same numbers as the
transformers encoder, faster on CPU; whisper/encoding.py), else the transformers encoder. With
`--decoder_ear_layers N` the cache holds the output of the layers below the top N (torch), and
those top layers and the final layer norm train inside the fold: the ear adapts to the fold's
children, never to a clip it scores.

The decoder reads the English prompt (English-only model: <|startoftranscript|><|notimestamps|>;
multilingual: <|startoftranscript|><|en|><|transcribe|><|notimestamps|>; ids from the backbone's
tokenizer) + the expected text as Whisper writes it (whisper/asr.py render_expected: a leading
space, the first letter capitalised, then ".") and predicts each expected token and the end of
text. Per token: log p of the expected token, its margin over the best other token, the entropy;
pooled (mean, min, max) -> MLP with task and grade embeddings -> one logit (`--decoder_head_states
true` also gives the head the mean of the decoder's last states, which let it memorise the
children's texts: docs/members.md). The loss is BCE on the score + ctc_weight x the token
cross-entropy of the expected text on clips scored 1 (it teaches the decoder children's voices).
The decoder's layers train at --lr (the lowest decoder_frozen_layers do not; its embeddings never
do), the head at lr x head_lr_scale.

The cached encoder output is cut to the clip + `memory_margin_s` (the decoder's cross-attention then
sees only those positions; Whisper still encoded the whole window): the cross-attention's keys and
values, recomputed every epoch, cost far less, and the log p it yields ranks clips as the full
window's does (the measurement behind the 1 s default: docs/members.md). `--memory_margin_s -1` keeps
the whole window (where a GPU makes the cost moot).

The decoder runs in our own loop like members/encdec/encdec.py, so the cross-attention gets a padding
mask (WhisperDecoder.forward, transformers 5.23, hands its layers none). A fold's checkpoint holds
only its trained weights: the frozen ones are the backbone's, named by their hash and read from the
backbone when it loads.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from ...audio import SAMPLE_RATE
from ...checkpoints import CheckpointError
from ...config import ConfigError, ModelConfig, RunConfig
from ...features import FeatureParams
from ...prep.dataset import Categories
from ...prep.prepare import TrainingInputs
from ...text import Vocab
from ...whisper.asr import render_expected
from ...whisper.encoder_cache import EncoderCache, clip_window, encode_clips
from ...whisper.encoding import (Ct2WindowEncoder, TorchWindowEncoder, WindowEncoder, lower_layers_encoder,
                                 weights_key)
from ...whisper.backbones import ct2_folder, transformers_dir
from ..base import FoldData, TestInputs
from ..pair.encoder import (FeatureScaler, SpeechEncoderModel, load_pretrained_encoder, load_pretrained_whisper,
                            make_head)
from ..encdec.encdec import logp_pools, token_pools
from ...whisper.teacher_forcing import teacher_forced_states
from ..pair.neural import NeuralMember, NeuralPredictor, pick_device, predict_logits
from .vocab_scores import masked_target_logp, masked_token_scores

log = logging.getLogger("readaloud.train")
N_TOKEN_FEATURES = 9
N_CONTRAST_FEATURES = 3      # decoder_contrast: mean, min and sum / 10 of log p(clip) - log p(silence) per token
NULL_CLIP_S = 1.0            # decoder_contrast: the silent clip whose encoding stands for "no speech"
MAX_TEXT_TOKENS = 200        # longer expected texts are cut (the decoder has 448 positions)


# ---- the encoder's cached output ------------------------------------------------------------------

def encoder_weights_key(encoder: WhisperEncoder) -> str:
    """A hash of the encoder's weights: another backbone is another cache."""
    return weights_key([("", encoder)])


def make_window_encoder(mc: ModelConfig, device: torch.device,
                   encoder: WhisperEncoder | Callable[[], WhisperEncoder]) -> WindowEncoder:
    """What encodes the frozen encoder's windows (`--decoder_encoder`): CTranslate2 at float32 when
    the backbone has a CTranslate2 folder (named backbones, faster-whisper folders; auto), the
    same numbers as the transformers encoder, faster on CPU (whisper/encoding.py), else the
    transformers encoder itself (`encoder`, or a function that loads it). With decoder_ear_layers,
    the torch encoder's layers below the adapted ones."""
    if mc.decoder_ear_layers > 0:   # the layers below the adapted ones: only torch gives their output
        if mc.decoder_encoder == "ctranslate2":
            raise ConfigError("--decoder_ear_layers caches the layers below the adapted ones, which only the torch "
                              "encoder gives: use --decoder_encoder auto or torch")
        encoder = encoder if isinstance(encoder, nn.Module) else encoder()
        if len(encoder.layers) < mc.decoder_ear_layers:
            raise ConfigError(f"--decoder_ear_layers {mc.decoder_ear_layers}: the encoder has {len(encoder.layers)} layers")
        return lower_layers_encoder(encoder, mc.decoder_ear_layers, device)
    folder = ct2_folder(mc.backbone) if mc.decoder_encoder in ("auto", "ctranslate2") else None
    if mc.decoder_encoder == "ctranslate2" and folder is None:
        raise ConfigError(f"--decoder_encoder ctranslate2: backbone {mc.backbone!r} has no CTranslate2 folder "
                          f"(a named backbone or a folder with model.bin); use auto or torch")
    if folder is not None:
        return Ct2WindowEncoder(folder, device.type, mc.decoder_encoder_compute, torch.get_num_threads())
    encoder = encoder if isinstance(encoder, nn.Module) else encoder()
    return TorchWindowEncoder(encoder, device, encoder_weights_key(encoder))


# ---- the network ------------------------------------------------------------------------------------

def backbone_tokenizer_json(backbone: str) -> str:
    """The backbone's tokenizer.json as text (saved in checkpoints, so inference needs no backbone)."""
    resolved = transformers_dir(backbone)
    path = Path(resolved) / "tokenizer.json"
    if path.is_file():
        return path.read_text()
    from transformers import WhisperTokenizerFast
    return WhisperTokenizerFast.from_pretrained(resolved).backend_tokenizer.to_str()


class WhisperDecoderClassifier(SpeechEncoderModel):
    """P(score = 1 | the clip's cached Whisper encoding, the expected text's tokens, task, grade)."""
    pretrained_prefixes = ("encoder.", "decoder.")

    def __init__(self, cfg: ModelConfig, n_tasks: int, n_grades: int, vocab_size: int,
                 whisper_config: WhisperConfig | None = None, encoder: WhisperEncoder | None = None,
                 decoder: WhisperDecoder | None = None, tokenizer_json: str = ""):
        if whisper_config is None and encoder is None:
            raise ConfigError("model.arch whisperdec teacher-forces a pretrained Whisper's decoder: give a --backbone "
                              "(whisper-tiny.en, whisper-base, a Whisper folder or hub id)")
        super().__init__(cfg, whisper_config, encoder)
        self.encoder.requires_grad_(False)  # run once per clip and cached (EncoderCache)
        if cfg.decoder_ear_layers > len(self.encoder.layers):
            raise ConfigError(f"--decoder_ear_layers {cfg.decoder_ear_layers}: the encoder has "
                              f"{len(self.encoder.layers)} layers")
        for module in self.ear_modules():   # the ear: the top layers adapt inside the fold (the cache holds below)
            module.requires_grad_(True)
        if decoder is None:
            decoder = (WhisperDecoder(self.whisper_config) if whisper_config is not None
                       else load_pretrained_whisper(cfg.backbone).get_decoder())
        self.decoder = decoder
        n_layers = len(decoder.layers)
        if cfg.decoder_frozen_layers > n_layers:
            raise ValueError(f"--decoder_frozen_layers {cfg.decoder_frozen_layers}: the decoder has {n_layers} layers")
        for module in (decoder.embed_tokens, decoder.embed_positions, *decoder.layers[: cfg.decoder_frozen_layers]):
            module.requires_grad_(False)
        dim = self.whisper_config.d_model
        self.task_emb = nn.Embedding(n_tasks + 1, cfg.task_dim)   # index 0: unknown
        self.grade_emb = nn.Embedding(n_grades + 1, cfg.grade_dim)
        n_evidence = N_TOKEN_FEATURES + (N_CONTRAST_FEATURES if cfg.decoder_contrast else 0)
        self.token_norm = FeatureScaler(n_evidence)
        states_dim = dim if cfg.decoder_head_states else 0
        self.head = make_head(cfg, states_dim + cfg.task_dim + cfg.grade_dim + n_evidence)
        self.evidence_head = nn.Linear(n_evidence, 1)  # direct path: usable from the first updates
        self._null_memory: torch.Tensor | None = None  # decoder_contrast: the silent clip's encoding (derived)
        self._window_encoders: dict[str, WindowEncoder] = {}   # per device (make_window_encoder)
        self.tokenizer_json = ""
        if tokenizer_json or whisper_config is None:
            self.set_tokenizer(tokenizer_json or backbone_tokenizer_json(cfg.backbone))

    # ---- tokens ---------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer_json: str) -> None:
        self.tokenizer_json = tokenizer_json
        self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        multilingual = self.whisper_config.vocab_size >= 51865  # English-only Whisper has 51864 tokens
        language = ["<|en|>", "<|transcribe|>"] if multilingual else []
        self.prompt = [self._special(t) for t in ("<|startoftranscript|>", *language, "<|notimestamps|>")]
        self.eot = self._special("<|endoftext|>")

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the backbone's tokenizer has no {token} token")
        return token_id

    def expected_tokens(self, text: str) -> tuple[list[int], list[int]]:
        """The expected text's BPE ids as Whisper writes it (" Honey likes cake.") and, per id, the
        index of the expected word it spells (-1: the final mark)."""
        pieces, piece_words = render_expected(str(text), "")
        ids, word_of = [], []
        for piece, words in zip(pieces, piece_words):
            piece_ids = self.tokenizer.encode(" " + piece, add_special_tokens=False).ids
            ids += piece_ids
            word_of += [words[0]] * len(piece_ids)
        mark = self.tokenizer.encode(".", add_special_tokens=False).ids
        return (ids + mark)[:MAX_TEXT_TOKENS], (word_of + [-1] * len(mark))[:MAX_TEXT_TOKENS]

    # ---- forward --------------------------------------------------------------------------------
    def ear_modules(self) -> list[nn.Module]:
        """The encoder's top cfg.decoder_ear_layers layers and its final layer norm (none at 0)."""
        n = self.cfg.decoder_ear_layers
        return [*self.encoder.layers[len(self.encoder.layers) - n:], self.encoder.layer_norm] if n else []

    def ear(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """The cached memory through the adapted top encoder layers (padded positions masked out of their
        attention), or as it is when the whole encoder is frozen."""
        if not self.cfg.decoder_ear_layers:
            return memory
        top = self.encoder.layers[len(self.encoder.layers) - self.cfg.decoder_ear_layers:]
        dtype = self.encoder.layer_norm.weight.dtype
        return self.encoder.layer_norm(self.run_layers(memory.to(dtype), memory_mask, top))

    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Decoder states [B, L, D]: causal self-attention, cross-attention to the unmasked memory only."""
        return teacher_forced_states(self.decoder, self.ear(memory, memory_mask), memory_mask, inputs, self.training)

    def token_scores(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per target position [B, L]: log p of the target, its margin over the best other token,
        entropy; computed where `mask` is set only (0 elsewhere), in few passes (vocab_scores.py)."""
        return masked_token_scores(states, self.decoder.embed_tokens.weight, targets, mask)


    def silent_logp(self, batch: dict, k: int) -> torch.Tensor:
        """[B, n tokens + 1] log p of the targets given the silent clip (0 past the text). It depends
        on the tokens alone, so a text that several clips of the batch share (a screener asks every
        child the same items) is decoded once; the decoder has no dropout (Whisper's is 0), so this
        changes no number."""
        inputs, targets, kept = batch["dec_inputs"], batch["dec_targets"], batch["token_mask"]
        rows, inverse = torch.unique(torch.cat([inputs, targets], dim=1), dim=0, return_inverse=True)
        unique_inputs, unique_targets = rows[:, : inputs.shape[1]], rows[:, inputs.shape[1]:]
        unique_kept = torch.zeros((len(rows), kept.shape[1]), dtype=torch.bool, device=kept.device)
        unique_kept[inverse] = kept                      # rows with one text have one mask
        null = self.null_memory(batch["memory"]).expand(len(rows), -1, -1)
        null_mask = torch.ones(null.shape[:2], dtype=torch.bool, device=null.device)
        null_states = self.decode(null, null_mask, unique_inputs)[:, k - 1:]
        return masked_target_logp(null_states, self.decoder.embed_tokens.weight, unique_targets, unique_kept)[inverse]

    def window_encoder(self, device: torch.device) -> WindowEncoder:
        """What encodes this model's frozen-encoder windows on `device` (make_window_encoder)."""
        if str(device) not in self._window_encoders:
            self._window_encoders[str(device)] = make_window_encoder(self.cfg, torch.device(device), self.encoder)
        return self._window_encoders[str(device)]

    def null_memory(self, like: torch.Tensor) -> torch.Tensor:
        """[1, T, D] the frozen encoder's output for NULL_CLIP_S of silence, encoded by EncoderCache's
        own steps and engine (encode_clips, window_encoder): what the decoder hears when nobody
        speaks. Computed once from the encoder's weights (not saved in checkpoints)."""
        if self._null_memory is None or self._null_memory.device != like.device:
            silence = np.zeros(int(NULL_CLIP_S * SAMPLE_RATE), np.float32)
            mel = clip_window(silence, FeatureParams(n_mels=self.whisper_config.num_mel_bins),
                              self.cfg.decoder_window_s)
            (_, encoded), = encode_clips(self.window_encoder(self.encoder.conv1.weight.device), [mel], [silence.size],
                                         self.cfg.memory_margin_s)
            self._null_memory = torch.from_numpy(encoded.astype(np.float32))[None].to(like.device)
        return self._null_memory.to(like.dtype)

    def forward(self, batch: dict) -> dict:
        k = batch["n_prompt"]
        states = self.decode(batch["memory"], batch["memory_mask"], batch["dec_inputs"])[:, k - 1:]
        mask = batch["token_mask"]                        # [B, n tokens + 1]: the text's tokens and end of text
        s = self.token_scores(states, batch["dec_targets"], mask)
        tok, margin, ent = s["logp"], s["margin"], s["entropy"]
        n = mask.sum(1).clamp(min=1).float()
        pools = [
            *token_pools(tok, margin, mask, n),
            (ent * mask).sum(1) / n, ent.masked_fill(~mask, -1e4).max(1).values,
            tok.gather(1, (n.long() - 1)[:, None]).squeeze(1),             # log p(end of text after the text)
            torch.log(n),
        ]
        if self.cfg.decoder_contrast:
            # the same tokens with the silent clip's memory: whatever the decoder expects of the text
            # without hearing it (its language model, shifted by fine-tuning on the training texts)
            # cancels in the difference
            pools += logp_pools(tok - self.silent_logp(batch, k), mask, n)
        feats = torch.stack(pools, dim=1)
        evidence = self.token_norm(feats).to(states.dtype)
        parts = [self.task_emb(batch["task"]), self.grade_emb(batch["grade"]), evidence]
        if self.cfg.decoder_head_states:
            m = mask[..., None].to(states.dtype)
            parts.insert(0, (states * m).sum(1) / m.sum(1).clamp(min=1.0))
        logits = self.head(torch.cat(parts, dim=-1)).squeeze(-1) + self.evidence_head(evidence).squeeze(-1)
        return {"logits": logits, "token_log_probs": tok, "token_mask": mask, "token_nll": -(tok * mask).sum(1) / n}

    def loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BCE on batch["target"] (the label, smoothed by the trainer) + ctc_weight x the decoder's
        token cross-entropy of the expected text on clips scored 1 (logged as `ctc`; `bag` is 0)."""
        bce = F.binary_cross_entropy_with_logits(out["logits"].float(), batch["target"])
        zero = torch.zeros((), device=bce.device)
        tokens = self.auxiliary_loss(out, batch) if self.cfg.ctc_weight > 0 else zero
        return bce + self.cfg.ctc_weight * tokens, {"bce": bce, "ctc": tokens, "bag": zero}

    def auxiliary_loss(self, out: dict, batch: dict) -> torch.Tensor:
        """Mean token cross-entropy (per clip averaged over its tokens) of the clips scored 1."""
        correct = (batch["label"] > 0.5).float()
        return (out["token_nll"].float() * correct).sum() / correct.sum().clamp(min=1.0)


# ---- rows -> batches -----------------------------------------------------------------------------

class DecoderDataset:
    """Rows of a metadata table as the decoder network reads them: the clip's cached encoding and
    the prompt + expected text's tokens. Rows whose clip cannot be read are skipped (`skipped`)."""

    def __init__(self, meta: pd.DataFrame, data_dir: str | Path, model: WhisperDecoderClassifier, cfg: RunConfig,
                 cats: Categories, device: torch.device | None = None, progress: bool = True):
        device = device or pick_device(cfg.device)
        self.cache = EncoderCache(model.window_encoder(device), model.whisper_config, data_dir,
                                  cfg.model.memory_margin_s, cfg.model.decoder_window_s)
        made = self.cache.ensure(meta["filename"].astype(str), progress=progress)
        if made:
            log.info("Whisper encoder: %d clips encoded into %s", made, self.cache.store.data_path)
        usable = meta["filename"].map(lambda f: f in self.cache) & meta["expected_text"].map(
            lambda t: isinstance(t, str) and bool(t.strip()))
        self.skipped = meta.loc[~usable, "filename"].tolist()
        self.meta = meta.loc[usable].reset_index(drop=True)
        self.prompt, self.eot = list(model.prompt), model.eot
        self.texts = [model.expected_tokens(t) for t in self.meta["expected_text"]]
        self.task_ids = np.array([cats.task_id(t) for t in self.meta["task"]], dtype=np.int64)
        self.grade_ids = np.array([cats.grade_id(g) for g in self.meta["grade"]], dtype=np.int64)
        self.labels = self.meta["score"].to_numpy(np.float32) if "score" in self.meta else None
        self.lengths = np.array([self.cache.length(f) for f in self.meta["filename"]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.meta)

    def item(self, i: int) -> dict:
        return {"memory": self.cache.get(self.meta["filename"].iloc[i]), "text": self.texts[i][0],
                "task": self.task_ids[i], "grade": self.grade_ids[i],
                "label": None if self.labels is None else self.labels[i]}

    def collate(self, items: list[dict], spec_augment=None, rng: np.random.Generator | None = None) -> dict:
        """Memory padded to the longest (masked), inputs prompt + text (padded with end of text),
        targets the text + end of text from the prompt's last position on."""
        if spec_augment is not None:
            raise ConfigError("model.arch whisperdec: SpecAugment cannot apply to cached encoder outputs")
        n_mem = max(it["memory"].shape[0] for it in items)
        width = items[0]["memory"].shape[1]
        memory = np.zeros((len(items), n_mem, width), np.float32)
        memory_mask = np.zeros((len(items), n_mem), bool)
        k, n_text = len(self.prompt), max(len(it["text"]) for it in items)
        inputs = np.full((len(items), k + n_text), self.eot, np.int64)
        targets = np.full((len(items), n_text + 1), self.eot, np.int64)
        token_mask = np.zeros((len(items), n_text + 1), bool)
        for b, it in enumerate(items):
            t, text = it["memory"].shape[0], it["text"]
            memory[b, :t], memory_mask[b, :t] = it["memory"], True
            inputs[b, :k], inputs[b, k: k + len(text)] = self.prompt, text
            targets[b, : len(text)] = text          # targets[b, len(text)]: end of text
            token_mask[b, : len(text) + 1] = True
        batch = {"memory": torch.from_numpy(memory), "memory_mask": torch.from_numpy(memory_mask),
                 "dec_inputs": torch.from_numpy(inputs), "dec_targets": torch.from_numpy(targets),
                 "token_mask": torch.from_numpy(token_mask), "n_prompt": k,
                 "task": torch.tensor([int(it["task"]) for it in items]),
                 "grade": torch.tensor([int(it["grade"]) for it in items])}
        if items[0]["label"] is not None:
            batch["label"] = torch.tensor([float(it["label"]) for it in items])
        return batch


# ---- the member ------------------------------------------------------------------------------------

@dataclass
class DecoderPredictor(NeuralPredictor):
    """A loaded fold: test clips are encoded once into the data folder's cache (every fold shares it)."""

    def predict(self, inputs: TestInputs) -> np.ndarray:
        ds = DecoderDataset(inputs.rows, inputs.data_dir, self.model, self.cfg, self.cats, self.device,
                            progress=inputs.progress)
        logits = predict_logits(self.model, ds, self.device, self.cfg.data.batch_max_frames,
                                self.cfg.data.max_batch_size, progress=inputs.progress)
        return inputs.scatter(logits, ds.meta["filename"])


def frozen_backbone_names(model: WhisperDecoderClassifier) -> set[str]:
    """The state_dict names of the pretrained weights training left as the backbone gave them."""
    return {name for name, p in model.named_parameters()
            if not p.requires_grad and name.startswith(model.pretrained_prefixes)}


def tensors_hash(state: dict[str, torch.Tensor], names) -> str:
    h = hashlib.sha1()
    for name in sorted(names):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


@lru_cache(maxsize=2)
def backbone_state(backbone: str) -> dict[str, torch.Tensor]:
    """The pretrained Whisper's encoder and decoder weights under this model's state_dict names, loaded
    once per process (every fold of a backbone shares them)."""
    whisper = load_pretrained_whisper(backbone)
    return {**{f"encoder.{k}": v for k, v in whisper.get_encoder().state_dict().items()},
            **{f"decoder.{k}": v for k, v in whisper.get_decoder().state_dict().items()}}


@lru_cache(maxsize=8)
def backbone_hash(backbone: str, names: tuple[str, ...]) -> str:
    return tensors_hash(backbone_state(backbone), names)


def with_frozen_backbone(ck: dict) -> dict[str, torch.Tensor]:
    """A slim checkpoint's state_dict completed with the frozen weights of its backbone, checked by hash:
    another backbone's weights would give other numbers, so they are refused."""
    try:
        frozen = json.loads(ck["frozen_backbone"])
        backbone, names = frozen["backbone"], set(frozen["names"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"not a usable whisperdec checkpoint (frozen_backbone: {exc})") from exc
    pretrained = backbone_state(backbone)
    missing = sorted(names - set(pretrained))
    if missing or backbone_hash(backbone, tuple(sorted(names))) != frozen["hash"]:
        raise CheckpointError(f"its frozen weights come from backbone {backbone!r}, and the {backbone!r} found here "
                              f"differs ({'lacks ' + ', '.join(missing[:3]) if missing else 'other values'}): install "
                              f"the backbone it was trained with, or retrain the fold")
    return {**{k: pretrained[k] for k in names}, **ck["state_dict"]}


class WhisperDecoderMember(NeuralMember):
    family = "whisperdec"
    model_class = WhisperDecoderClassifier
    takes_text_negatives = True   # a text is only tokens: nothing is made for it in advance

    def dataset(self, meta, data: FoldData, model: WhisperDecoderClassifier, vocab: Vocab) -> DecoderDataset:
        dc = data.cfg.data
        if dc.aug_prob > 0 or dc.spec_time_masks > 0 or dc.spec_freq_masks > 0:
            raise ConfigError("model.arch whisperdec reads cached encoder outputs: input augmentation "
                              "(--aug_prob, --spec_time_masks, --spec_freq_masks) cannot apply; set them to 0")
        return DecoderDataset(meta, data.data_dir, model, data.cfg, data.cats, progress=data.progress)

    def prepare_shared(self, inputs: TrainingInputs, cfgs: list[RunConfig], data_dir: Path,
                       progress: bool = True) -> None:
        """Every training clip's encoding, once, before parallel folds start."""
        for cfg in cfgs:
            backbone = cfg.model.backbone   # the transformers encoder is loaded only if it is the engine
            engine = make_window_encoder(cfg.model, pick_device(cfg.device), lambda: load_pretrained_encoder(backbone))
            config = WhisperConfig.from_pretrained(transformers_dir(backbone))
            cache = EncoderCache(engine, config, data_dir, cfg.model.memory_margin_s, cfg.model.decoder_window_s)
            made = cache.ensure(inputs.meta["filename"].astype(str), progress=progress)
            log.info("Whisper encoder of %s: %d clips encoded", cfg.model.backbone, made)

    def payload(self, model: WhisperDecoderClassifier, vocab: Vocab) -> dict:
        """The trained weights only: the frozen backbone weights (encoder, token and position embeddings,
        frozen decoder layers) are the backbone's own, so they are named by their hash and taken from the
        backbone when the fold loads, not saved again in every fold."""
        out = {**super().payload(model, vocab), "tokenizer": model.tokenizer_json}
        frozen = frozen_backbone_names(model)
        out["state_dict"] = {k: v for k, v in out["state_dict"].items() if k not in frozen}
        out["frozen_backbone"] = json.dumps({"backbone": model.cfg.backbone, "names": sorted(frozen),
                                             "hash": tensors_hash(model.state_dict(), frozen)})
        return out

    def load(self, ck: dict, device) -> DecoderPredictor:
        if "frozen_backbone" in ck:
            ck = {**ck, "state_dict": with_frozen_backbone(ck)}
        loaded = super().load(ck, device)
        try:
            loaded.model.set_tokenizer(ck["tokenizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"not a usable {self.family} checkpoint (tokenizer: {exc})") from exc
        return DecoderPredictor(loaded.model, loaded.cfg, loaded.vocab, loaded.cats, loaded.priors, loaded.device)
