"""Typed run configuration with command-line overrides.

A variant is a `RunConfig` with a few fields changed (see variants.py). Any field can be
overridden from the command line by its dotted path (`--optim.weight_decay 0.01`) or, when
unambiguous, its bare name (`--lr 2e-5`). Unknown keys and values of the wrong type are
refused with a message naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    arch: str = "pair"             # the member family (members/registry.py): pair: encoder over
                                   # [TTS | pause | response] + classifier (members/pair/pair.py); encdec: 1st-place
                                   # encoder-decoder teacher-forced on expected_text; gbm: gradient
                                   # boosting on alignment features (no neural network); whisperdec: a
                                   # pretrained Whisper's decoder teacher-forced on it (members/decoder/decoder.py)
    backbone: str = ""             # "" = small randomly initialised Whisper below; else path or hub id
    d_model: int = 128             # encoder width (ignored with a backbone)
    encoder_layers: int = 3
    encoder_heads: int = 4
    ffn_dim: int = 512
    n_mels: int = 80
    max_source_positions: int = 1500   # 30 s; inputs are cropped to twice this many frames
    dropout: float = 0.0           # encoder dropout (CPU runs are compute-bound, not overfitting)
    position_pool: int = 2         # average encoder positions in pairs after Whisper's conv stem
                                   # (40 ms each, half the transformer cost); 1 for a real Whisper
                                   # (variant_config sets it from --backbone unless given)
    freeze_layers: int = 0         # with a backbone: conv stem + the lowest N encoder layers frozen; the pair
                                   # runs them on each half alone (positions from 0) and, without input
                                   # augmentation, caches their outputs once (float16, members/pair/frozen.py)
    pooling: str = "mean"          # mean | attention | attention_mean
    head_layers: int = 1           # 1 = linear; 2 = hidden layer + GELU + dropout
    head_hidden: int = 256
    head_dropout: float = 0.1
    task_dim: int = 8
    grade_dim: int = 4
    pause_frames: int = 20         # silence between the TTS reference and the response (10 ms each)
    ctc_weight: float = 0.5        # auxiliary CTC on the expected text's phonemes (0 = off)
    ctc_unit: str = "phoneme"      # phoneme | char
    bag_weight: float = 1.0        # auxiliary "which phonemes are said" (multiple-instance BCE; 0 = off)
    score_features: bool = True    # feed CTC match scores and durations to the head
    match_features: bool = True    # reference/response cross-similarity (coverage, precision) to the head
    match_dim: int = 64            # learned projection the similarities are measured in
    ear_evidence: bool = False     # pair only: the head also reads what the fold ear (model6asr's, the asr_ear_*
                                   # options) hears, each row by the ear of its own fold (members/pair/ear.py)
    # encdec only
    decoder_layers: int = 2        # transformer decoder layers over the expected text's tokens
    # whisperdec only (members/decoder/decoder.py: a real Whisper's decoder teacher-forced on the expected text)
    decoder_frozen_layers: int = 0     # the lowest N decoder layers do not train (token/position embeddings never do)
    decoder_encoder: str = "auto"      # whisperdec: what runs the frozen encoder for its cache: ctranslate2 (float32,
                                       # the same numbers, faster on CPU; needs the backbone's CTranslate2
                                       # folder), torch, or auto (ctranslate2 when there is such a folder)
    decoder_encoder_compute: str = "float32"  # whisperdec on ctranslate2: its compute type (int8: faster, other numbers)
    memory_margin_s: float = 1.0       # the cached encoder output is cut to the clip + this margin (< 0: all 30 s)
    decoder_window_s: float = 10.0     # the frozen encoder reads a clip in the smallest multiple of this that
                                       # holds it (up to Whisper's 30 s): 10 s for the frozen ear's transcripts
    decoder_ear_layers: int = 0        # whisperdec: the top N encoder layers and its final layer norm train inside
                                       # each fold (the ear adapts to the fold's children); the cache holds the
                                       # output of the layers below, run by torch; 0: the whole encoder is frozen
    decoder_head_states: bool = True   # the head also reads the mean of the decoder's last states (False: only
                                       # the per-token evidence, task and grade: less to memorise texts by)
    decoder_contrast: bool = False     # also teacher-force on the encoding of silence and give the head each
                                       # token's log p minus its log p there (what the audio adds over the
                                       # decoder's own expectation of the text, which fine-tuning shifts)
    # gbm only (scikit-learn HistGradientBoostingClassifier on alignment features)
    gbm_max_iter: int = 300
    gbm_learning_rate: float = 0.05
    gbm_max_leaf_nodes: int = 15
    gbm_min_samples_leaf: int = 20
    gbm_l2: float = 1.0
    gbm_features: str = "alignment"   # alignment | asr | alignment+asr: the feature table the trees read
                                      # (asr: evidence of a pretrained Whisper per clip, members/gbm/evidence.py)
    asr_backbones: str = "whisper-tiny.en"  # gbm with asr: comma-separated named backbones
                                            # (whisper-tiny.en, whisper-base) or CTranslate2 Whisper folders
    gbm_ear_copies: int = 0           # gbm: perturbed copies of each training clip, same label and fold, so the
                                      # trees see clips the Whisper ear mishears (members/gbm/ear_augment.py); 0 = none
    gbm_ear_share: float = 1.0        # gbm: the share of training clips that get ear copies (picked by file name)
    asr_closed_vocab: bool = False    # gbm with asr: also a greedy decode that may write only the task's words,
                                      # compared with the expected text (members/gbm/closed.py); model6asr sets it
    asr_closed_logp: bool = False     # gbm with the closed vocabulary: also the closed transcript's teacher-forced
                                      # log p and the expected text's margin over it (members/gbm/closed.py;
                                      # off with asr_closed_vocab off); model6asr sets it
    asr_loop_features: bool = False   # gbm with asr: also how far each transcript (open, and closed with the
                                      # closed vocabulary) loops and how near its best-matching start is to the
                                      # expected text (members/gbm/loops.py)
    asr_prompt_logp: bool = False     # gbm with the closed vocabulary: also the expected text's log p after a prompt
                                      # of the task's words (members/gbm/prompted.py; scored in the ASR pass)
    asr_agreement: bool = False        # gbm: how far each other backbone's transcripts (open, and closed with
                                       # asr_closed_vocab) are from the first backbone's: a voice the ears cannot
                                       # place comes out as different words from each
    asr_prompt_per_clip: bool = False  # with asr_prompt_logp: a task whose words do not fit in a prompt (sentences)
                                       # gets a prompt of each clip's own expected words instead of none
    asr_new_word_trees: bool = False   # with the closed vocabulary: a second set of trees without the blocks the
                                       # task's training words shape (closed decode, task-word prompt) scores the
                                       # rows whose expected text has a word the training texts lack
                                       # (members/gbm/closed.py, new_word_rows; off with asr_closed_vocab off)
    asr_fold_vocabulary: bool = False  # with the closed vocabulary: a fold's held-out rows are decoded over its
                                       # training folds' words plus their own (what a test row gets), not over
                                       # every training text's, so the OOF figure sees new words as a test would
    asr_fold_ears: bool = False        # gbm with asr: also the evidence of a Whisper whose decoder is fine-tuned
                                       # inside each fold on the other folds' clips scored 1 (members/gbm/fold_ears.py)
    asr_ear_backbone: str = "whisper-tiny.en"  # what the fold ears adapt (a named backbone or CTranslate2 folder)
    asr_ear_epochs: int = 3            # fold ears: epochs of decoder fine-tuning
    asr_ear_lr: float = 3e-5           # fold ears: AdamW learning rate
    asr_ear_copies: int = 1            # fold ears: ear copies of each clip an ear trains on (other vocal tracts)
    asr_ear_seed: int = 0              # fold ears: the seed of each ear's batch order (how far an ear's own draw moves
                                       # the figures; the trees use no randomness)
    asr_ear_agreement: bool = False    # fold ears: also how far the ear's transcript is from the first backbone's
                                       # (a voice the frozen Whisper mishears and the ear hears: they disagree)
    asr_ear_encoder_layers: int = 0    # fold ears: the encoder's top layers that adapt too (0: the decoder only)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    head_lr_scale: float = 5.0     # everything but the encoder (heads, embeddings) learns this much faster
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_ratio: float = 0.08     # fraction of all updates spent warming up linearly
    schedule: str = "cosine"       # cosine | inverse_sqrt | plateau | constant (all after linear warmup)
    plateau_factor: float = 0.5    # plateau: multiply the learning rate by this ...
    plateau_patience: int = 1      # ... after this many evaluations without improvement
    min_lr_ratio: float = 0.02
    grad_clip: float = 1.0
    update_freq: int = 1           # gradient accumulation: batches per optimizer step
    label_smoothing: float = 0.0


@dataclass
class DataConfig:
    batch_max_frames: int = 6000   # padded frames per batch (10 ms each): batches are built by size
    max_batch_size: int = 64
    task_dropout: float = 0.05     # share of training items shown with an unknown task/grade
    text_negatives: int = 0        # per training row scored 1, rows of the same clip with a changed text
                                   # scored 0 (prep/text_negatives.py; the whisperdec family)
    prefetch: int = -1             # batches built ahead in a background thread (-1: 2 on GPU, 0 on CPU)
    spec_time_masks: int = 2       # SpecAugment on the response only (0 = off)
    spec_time_width: int = 12
    spec_freq_masks: int = 2
    spec_freq_width: int = 8
    # waveform-style augmentation of the response, done on its cached log-mel (augment.py);
    # each is applied to a training item with probability aug_prob, 0 switches one off
    aug_prob: float = 0.0
    aug_warp: float = 0.0          # vocal-tract/pitch: frequency axis warped by a factor in [1-w, 1+w]
    aug_stretch: float = 0.0       # tempo: time axis stretched by a factor in [1-s, 1+s]
    aug_noise_snr: float = 0.0     # noise added at an SNR (dB) drawn from [snr, snr + 20] (0 = off)
    aug_gain_db: float = 0.0       # response level shifted by up to this many dB relative to the reference
    aug_cutouts: int = 0           # extra silenced stretches (dropped words or syllables), up to this many


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 12
    max_updates: int = 0           # stop after this many optimizer updates (0 = no limit)
    eval_every: int = 0            # also validate every N updates (0 = at epoch ends only)
    patience: int = 4              # evaluations without improvement before stopping (select=best only)
    stop_epoch: int = 0            # stop after this epoch of the --epochs schedule (the learning rate still
                                   # follows --epochs); 0, or --epochs at or below it, = run them all. With
                                   # select=last: one fixed stop for every fold instead of each fold's
                                   # held-out clips choosing its epoch
    average_last: int = 1          # with select=last: keep the mean of the weights at the ends of the last K
                                   # epochs run (checkpoint averaging; 1 = the last epoch's weights alone)
    select: str = "best"           # which weights a neural fold keeps: "best" = the evaluation with the lowest
                                   # held-out log loss (early stopping on the fold's own held-out clips);
                                   # "last" = the weights after the last epoch, the held-out clips only
                                   # scored for the curves, so the out-of-fold figure chose nothing
    tensorboard: bool = True       # TensorBoard logs in assets/runs/<variant>_<fold>/tensorboard
    wandb: bool = False            # Weights & Biases (offline mode unless WANDB_API_KEY is set)
    wandb_project: str = "readaloud"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    threads: int = 0               # torch CPU threads (0 = leave to torch / train.py)
    tts: str = "espeak:en-us+f3"   # reference TTS engine spec (see readaloud.tts.make_tts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


class ConfigError(ValueError):
    pass


def _leaves(cfg, prefix: str = "") -> dict[str, tuple[object, dataclasses.Field]]:
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, path + "."))
        else:
            out[path] = (cfg, f)
    return out


def _convert(key: str, raw, typ):
    if typ in ("bool", bool):
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in {"1", "true", "yes", "on"}:
            return True
        if s in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"--{key}: expected true/false, got {raw!r}")
    for name, conv in (("int", int), ("float", float), ("str", str)):
        if typ in (name, conv):
            try:
                value = conv(raw)
                if conv is int and isinstance(raw, float) and not raw.is_integer():
                    raise ValueError
                return value
            except (TypeError, ValueError):
                raise ConfigError(f"--{key}: expected {name}, got {raw!r}") from None
    raise ConfigError(f"--{key}: unsupported field type {typ}")


def apply_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """Return a copy of `cfg` with `overrides` (dotted path or unique leaf name -> value)."""
    cfg = RunConfig.from_dict(cfg.to_dict())
    leaves = _leaves(cfg)
    by_name: dict[str, list[str]] = {}
    for path in leaves:
        by_name.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    for key, raw in overrides.items():
        key = key.replace("-", "_")
        if key in leaves:
            path = key
        elif len(by_name.get(key, [])) == 1:
            path = by_name[key][0]
        elif key in by_name:
            raise ConfigError(f"--{key} is ambiguous: use one of {', '.join('--' + p for p in by_name[key])}")
        else:
            close = difflib.get_close_matches(key, list(leaves) + list(by_name), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint}")
        owner, f = leaves[path]
        setattr(owner, f.name, _convert(path, raw, f.type))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    choices = {"model.pooling": ("mean", "attention", "attention_mean"),
               "model.ctc_unit": ("phoneme", "char"),
               "optim.schedule": ("cosine", "inverse_sqrt", "plateau", "constant"),
               "select": ("best", "last"),
               "device": ("auto", "cpu", "cuda")}
    leaves = _leaves(cfg)
    for path, allowed in choices.items():
        owner, f = leaves[path]
        value = getattr(owner, f.name)
        if value not in allowed and not (path == "device" and str(value).startswith("cuda:")):
            raise ConfigError(f"--{path}: {value!r} is not one of {allowed}")
    for path in ("optim.lr", "epochs", "data.batch_max_frames", "optim.update_freq", "model.head_layers",
                 "model.position_pool"):
        owner, f = leaves[path]
        if getattr(owner, f.name) <= 0:
            raise ConfigError(f"--{path} must be positive, got {getattr(owner, f.name)!r}")
    if cfg.stop_epoch < 0:
        raise ConfigError(f"--stop_epoch must be 0 (run every epoch) or more, got {cfg.stop_epoch!r}")
    if cfg.average_last < 1:
        raise ConfigError(f"--average_last must be 1 or more (epochs whose weights are averaged), got {cfg.average_last!r}")
    if cfg.average_last > 1 and cfg.select != "last":
        raise ConfigError(f"--average_last {cfg.average_last} averages the last epochs' weights in place of choosing "
                          "one: it goes with --select last")
    if cfg.select == "last" and cfg.optim.schedule == "plateau":
        raise ConfigError("--select last keeps the last epoch's weights so that the held-out clips choose nothing; "
                          "--optim.schedule plateau lowers the learning rate on their log loss: use cosine, "
                          "inverse_sqrt or constant with it")
    if cfg.model.decoder_frozen_layers < 0:
        raise ConfigError(f"--model.decoder_frozen_layers must be 0 or more, got {cfg.model.decoder_frozen_layers!r}")
    if cfg.model.decoder_ear_layers < 0:
        raise ConfigError(f"--model.decoder_ear_layers must be 0 or more, got {cfg.model.decoder_ear_layers!r}")
    if cfg.model.freeze_layers < 0:
        raise ConfigError(f"--model.freeze_layers must be 0 or more, got {cfg.model.freeze_layers!r}")
    if cfg.model.decoder_encoder not in ("auto", "ctranslate2", "torch"):
        raise ConfigError(f"--model.decoder_encoder must be auto, ctranslate2 or torch, got {cfg.model.decoder_encoder!r}")
    if cfg.model.decoder_encoder_compute not in ("float32", "int8", "int8_float32", "float16", "int8_float16"):
        raise ConfigError(f"--model.decoder_encoder_compute must be a CTranslate2 compute type (float32, int8, "
                          f"int8_float32, float16, int8_float16), got {cfg.model.decoder_encoder_compute!r}")
    if cfg.model.gbm_ear_copies < 0:
        raise ConfigError(f"--model.gbm_ear_copies must be 0 or more, got {cfg.model.gbm_ear_copies!r}")
    if not 0 <= cfg.model.asr_ear_encoder_layers <= 32:
        raise ConfigError(f"--model.asr_ear_encoder_layers must be 0 (the decoder only) or a number of the encoder's "
                          f"top layers, got {cfg.model.asr_ear_encoder_layers!r}")
    if cfg.model.asr_ear_epochs < 1 or not cfg.model.asr_ear_lr > 0 or cfg.model.asr_ear_copies < 0:
        raise ConfigError(f"--model.asr_ear_epochs must be 1 or more, --model.asr_ear_lr positive and "
                          f"--model.asr_ear_copies 0 or more, got {cfg.model.asr_ear_epochs!r}, "
                          f"{cfg.model.asr_ear_lr!r} and {cfg.model.asr_ear_copies!r}")
    if not 0 < cfg.model.gbm_ear_share <= 1:
        raise ConfigError(f"--model.gbm_ear_share must be in (0, 1], got {cfg.model.gbm_ear_share!r}")


def backbone_input_settings(backbone: str) -> dict:
    """What a backbone's layers were trained on, read from its folder without loading it:
    {"position_pool": ..., "n_mels": ... (when the folder says)}.

    A folder made by pretrain.py records its model settings (pretraining.json); anything else
    (a named Whisper, a transformers or CTranslate2 folder, a hub id) is a real Whisper, whose
    layers see every position of its conv stem (position_pool 1).
    """
    folder = Path(backbone).expanduser()
    pretraining = folder / "pretraining.json"
    if pretraining.is_file():
        model = json.loads(pretraining.read_text()).get("settings", {}).get("model", {})
        return {"position_pool": int(model.get("position_pool", 2)), "n_mels": int(model.get("n_mels", 80))}
    settings: dict = {"position_pool": 1}
    for name, key in (("config.json", "num_mel_bins"), ("preprocessor_config.json", "feature_size")):
        path = folder / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get(key)
            except ValueError:
                value = None
            if isinstance(value, int):
                settings["n_mels"] = value
                break
    return settings


def _from_dict(cls, d: dict):
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in hints:
            raise ConfigError(f"unknown config key {k!r} for {cls.__name__}")
        sub = hints[k].default_factory if hints[k].default_factory is not dataclasses.MISSING else None
        if isinstance(v, dict) and sub is not None:
            kwargs[k] = _from_dict(sub, v)
        else:
            kwargs[k] = v
    return cls(**kwargs)


RunConfig.from_dict = classmethod(lambda cls, d: _from_dict(cls, d))  # type: ignore[attr-defined]


RUNTIME_KEYS = {"threads"}  # set per job by the runner, not part of what a fold learns


def saved_config_dict(path: str | Path) -> dict:
    """The config saved in a fold's runs/<stem>/config.json, or in its summary (under "config")."""
    d = json.loads(Path(path).read_text())
    return d["config"] if isinstance(d, dict) and isinstance(d.get("config"), dict) else d


def load_saved_config(path: str | Path) -> RunConfig:
    """A saved config with the runtime keys back at their defaults (the runner sets those per job)."""
    try:
        cfg = RunConfig.from_dict(saved_config_dict(path))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--config {path}: not a readable saved config ({exc})") from exc
    default = RunConfig()
    return apply_overrides(cfg, {k: getattr(default, k) for k in RUNTIME_KEYS})
