"""The Whisper encoder every neural member shares, and the pieces their heads are built from.

The encoder runs on the batch's real length (positional table sliced, padding masked), not
on Whisper's fixed 30 s window. `build_network` makes a fresh network of a member's class
(around a pretrained encoder when the config names a backbone, resolved by
whisper.backbones.transformers_dir) or the skeleton a checkpoint's weights are loaded into.
With `freeze_layers = N` the conv stem and the lowest N layers do not train; the pair runs
them on each half of its input alone (`encode_pair`), so their outputs can be cached
(members/pair/frozen.py) and an epoch costs only the layers above them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ...config import ModelConfig, backbone_input_settings
from ...whisper.backbones import transformers_dir
from ...whisper.encoding import run_layers

log = logging.getLogger(__name__)


def small_whisper_config(cfg: ModelConfig) -> WhisperConfig:
    """A Whisper config of the size in `cfg`, trainable from scratch on a CPU."""
    return WhisperConfig(
        num_mel_bins=cfg.n_mels, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        encoder_attention_heads=cfg.encoder_heads, encoder_ffn_dim=cfg.ffn_dim,
        decoder_layers=1, decoder_attention_heads=cfg.encoder_heads, decoder_ffn_dim=cfg.ffn_dim,
        max_source_positions=cfg.max_source_positions, dropout=cfg.dropout,
        attention_dropout=0.0, activation_dropout=0.0, vocab_size=64, max_target_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )


def load_pretrained_encoder(backbone: str, assets: str | Path = "assets") -> WhisperEncoder:
    """The encoder of a Whisper checkpoint (see load_pretrained_whisper)."""
    return load_pretrained_whisper(backbone, assets).get_encoder()


def load_pretrained_whisper(backbone: str, assets: str | Path = "assets"):
    """A Whisper checkpoint's WhisperModel (encoder and decoder), through `from_pretrained`, sdpa attention.

    `backbone` goes through whisper.backbones.transformers_dir: a named backbone
    (whisper-tiny.en, whisper-base) or a CTranslate2 folder is converted once under
    <assets>/backbones, a transformers folder (pretrain.py's too) is read as it is. A hub id is
    tried from the local cache first and from the hub only when HF_HUB_OFFLINE is not set.
    """
    from transformers import WhisperModel
    resolved = transformers_dir(backbone, assets)
    local = Path(resolved).expanduser()
    if local.exists():
        model = WhisperModel.from_pretrained(str(local), local_files_only=True)
    else:
        try:
            model = WhisperModel.from_pretrained(resolved, local_files_only=True)
        except OSError:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
                raise OSError(f"backbone {backbone!r}: not a local folder and not in the Hugging Face "
                              f"cache, and HF_HUB_OFFLINE is set") from None
            model = WhisperModel.from_pretrained(resolved)
    model.config._attn_implementation = "sdpa"
    return model


class FeatureScaler(nn.Module):
    """Standardises each evidence feature by running statistics (not per item, not per batch).

    The features have unrelated scales (a log-likelihood, a duration, a probability), so each
    is centred and scaled on its own; running estimates make the output independent of the
    batch, and are saved with the weights.
    """

    def __init__(self, n: int, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                m = max(self.momentum, 1.0 / float(self.seen + 1))  # exact average at first
                self.mean.lerp_(x.mean(0), m)
                self.var.lerp_(x.var(0, unbiased=False) + (x.mean(0) - self.mean) ** 2, m)
                self.seen += 1
        return ((x - self.mean) / torch.sqrt(self.var + 1e-4)).clamp(-6.0, 6.0)


class AttentionPool(nn.Module):
    """Learned softmax weights over time (masked), a weighted mean of the frames."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.score(x).squeeze(-1).masked_fill(~mask, torch.finfo(x.dtype).min)
        w = torch.softmax(s.float(), dim=1).to(x.dtype)
        return torch.einsum("bt,btd->bd", w, x)


def make_head(cfg: ModelConfig, in_dim: int) -> nn.Sequential:
    """The classifier head: linear (head_layers 1) or an MLP with GELU and dropout -> 1 logit."""
    if cfg.head_layers == 1:
        return nn.Sequential(nn.Dropout(cfg.head_dropout), nn.Linear(in_dim, 1))
    layers, d = [], in_dim
    for _ in range(cfg.head_layers - 1):
        layers += [nn.Dropout(cfg.head_dropout), nn.Linear(d, cfg.head_hidden), nn.GELU()]
        d = cfg.head_hidden
    return nn.Sequential(*layers, nn.Dropout(cfg.head_dropout), nn.Linear(d, 1))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class SpeechEncoderModel(nn.Module):
    """The Whisper encoder every neural variant shares, run on the batch's real length.

    Built fresh (`small_whisper_config`), from a checkpoint's `whisper_config`, or around a
    pretrained `encoder`; subclasses add their heads after it (so its parameters come first)
    and their training loss: `loss(outputs, batch) -> (loss, {part: value})`, the parts named
    in `loss_parts` (logged as train_<part>).
    """
    loss_parts: tuple[str, ...] = ("bce", "ctc", "bag")
    # the network can read its frozen layers' cached outputs of each half (FrozenPairDataset)
    reads_frozen_halves: bool = False
    # parameters under these prefixes come from the backbone: they learn at --lr, the rest at lr x head_lr_scale
    pretrained_prefixes: tuple[str, ...] = ("encoder.",)

    def __init__(self, cfg: ModelConfig, whisper_config: WhisperConfig | None = None,
                 encoder: WhisperEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        if encoder is None:
            whisper_config = whisper_config or small_whisper_config(cfg)
            whisper_config._attn_implementation = "sdpa"
            encoder = WhisperEncoder(whisper_config)
        self.encoder = encoder
        self.whisper_config = encoder.config
        self.max_frames = 2 * encoder.config.max_source_positions  # Whisper's 30 s window
        n_layers = len(encoder.layers)
        if not 0 <= cfg.freeze_layers <= n_layers:
            raise ValueError(f"--freeze_layers {cfg.freeze_layers}: the encoder has {n_layers} layers")
        for module in self.frozen_modules():
            module.requires_grad_(False)

    @property
    def frames_per_position(self) -> int:
        """Mel frames behind one encoder position: Whisper's stride 2 times our pooling."""
        return 2 * self.cfg.position_pool

    def frozen_modules(self) -> list[nn.Module]:
        """The conv stem, the position table and the lowest cfg.freeze_layers layers (none at 0)."""
        if self.cfg.freeze_layers == 0:
            return []
        enc = self.encoder
        return [enc.conv1, enc.conv2, enc.embed_positions, *enc.layers[: self.cfg.freeze_layers]]

    def embed(self, feats: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv stem + position table on [B, T, n_mels] -> [B, n, D] and the position mask."""
        enc = self.encoder
        # padded frames and conv1's outputs past each clip's end are zeroed, so every clip's
        # edge sees the convolutions' own zero padding whether it is batched or alone
        keep = frame_mask[:, None, :].to(feats.dtype)
        x = F.gelu(enc.conv1(feats.transpose(1, 2) * keep)) * keep
        x = F.gelu(enc.conv2(x))
        if self.cfg.position_pool > 1:
            x = F.avg_pool1d(x, self.cfg.position_pool, self.cfg.position_pool)
        x = x.transpose(1, 2)
        n = x.shape[1]
        x = x + enc.embed_positions.weight[:n].to(x.dtype)
        x = F.dropout(x, p=enc.dropout, training=self.training)
        return x, frame_mask[:, :: self.frames_per_position][:, :n]

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        """Encoder layers over [B, n, D] with the padded positions masked out of attention."""
        return run_layers(x, mask, layers)

    def encode(self, feats: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper encoder on [B, T, n_mels] (T a multiple of frames_per_position) -> [B, n, D] + mask."""
        x, mask = self.embed(feats, frame_mask)
        return self.encoder.layer_norm(self.run_layers(x, mask, self.encoder.layers)), mask

    def encode_lower(self, feats: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen part (stem, positions from 0, lowest freeze_layers layers) on one half."""
        x, mask = self.embed(feats, frame_mask)
        return self.run_layers(x, mask, self.encoder.layers[: self.cfg.freeze_layers]), mask

    def encode_upper(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The trainable layers above the frozen ones and the final layer norm."""
        return self.encoder.layer_norm(self.run_layers(hidden, mask, self.encoder.layers[self.cfg.freeze_layers:]))

    def encode_pair(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder over a [reference | pause | response] batch -> [B, n, D] + position mask.

        Without frozen layers the whole sequence is encoded at once. With them, the frozen part
        runs on each half alone, as if each were its own clip (positions from 0; the reference
        half is reference + pause), so its outputs can be cached once per half; the trainable
        layers then see the concatenation. A batch of cached outputs (`frozen_hidden`, from
        members/pair/frozen.py) skips the frozen part.
        """
        if self.cfg.freeze_layers == 0:
            return self.encode(batch["feats"], batch["frame_mask"])
        if batch.get("frozen_hidden"):
            hidden, mask = batch["feats"], batch["frame_mask"]
        else:
            hidden, mask = self.frozen_halves(batch)
        return self.encode_upper(hidden, mask), mask

    def frozen_halves(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen part on each half of a mel batch, put back side by side: [B, n, D] + mask."""
        f = self.frames_per_position
        feats, frame_mask = batch["feats"], batch["frame_mask"]
        ref_frames = batch["resp_start"] * f             # reference + pause
        resp_frames = batch["resp_positions"] * f
        with torch.no_grad():
            t = torch.arange(feats.shape[1], device=feats.device)[None]
            n_ref = int(ref_frames.max())
            ref_h, _ = self.encode_lower(feats[:, :n_ref], t[:, :n_ref] < ref_frames[:, None])
            resp = segment(feats, ref_frames, resp_frames)
            resp_h, _ = self.encode_lower(resp, t[:, : resp.shape[1]] < resp_frames[:, None])
        n = feats.shape[1] // f
        pos = torch.arange(n, device=feats.device)[None].expand(len(feats), -1)
        start = batch["resp_start"][:, None]
        from_ref = torch.gather(ref_h, 1, pos.clamp(max=ref_h.shape[1] - 1)[..., None].expand(-1, -1, ref_h.shape[2]))
        idx = (pos - start).clamp(0, resp_h.shape[1] - 1)
        from_resp = torch.gather(resp_h, 1, idx[..., None].expand(-1, -1, resp_h.shape[2]))
        hidden = torch.where((pos < start)[..., None], from_ref, from_resp)
        return hidden, frame_mask[:, ::f][:, :n]


def segment(x: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """x[b, start_b : start_b + length_b] left-aligned into [B, max(length), ...] (rest: last valid)."""
    t = torch.arange(int(length.max().clamp(min=1)), device=x.device)
    idx = torch.minimum(start[:, None] + t[None], (start + length - 1).clamp(min=0)[:, None])
    idx = idx.clamp(max=x.shape[1] - 1)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def build_network(model_class: type[SpeechEncoderModel], cfg: ModelConfig, n_tasks: int, n_grades: int,
                  vocab_size: int, whisper_config: dict | None = None) -> SpeechEncoderModel:
    """A fresh `model_class` for training (pretrained encoder when cfg.backbone), or the
    skeleton a checkpoint's weights are loaded into (`whisper_config` from the checkpoint)."""
    if whisper_config is not None:
        return model_class(cfg, n_tasks, n_grades, vocab_size, WhisperConfig.from_dict(whisper_config))
    if cfg.freeze_layers and not cfg.backbone:
        raise ValueError(f"--freeze_layers {cfg.freeze_layers} freezes pretrained layers: give a --backbone")
    if cfg.backbone:
        encoder = load_pretrained_encoder(cfg.backbone)
        pool = backbone_input_settings(cfg.backbone)["position_pool"]
        if cfg.position_pool != pool:
            raise ValueError(f"backbone {cfg.backbone}'s layers were trained with position_pool {pool}; "
                             f"set --position_pool {pool}")
        if encoder.config.num_mel_bins != cfg.n_mels:
            raise ValueError(f"backbone {cfg.backbone} expects {encoder.config.num_mel_bins} mel bins; "
                             f"set --n_mels {encoder.config.num_mel_bins}")
        return model_class(cfg, n_tasks, n_grades, vocab_size, encoder=encoder)
    return model_class(cfg, n_tasks, n_grades, vocab_size)


def whisper_config_dict(model: SpeechEncoderModel) -> dict:
    """The model's Whisper config as JSON-safe dict (for an encdec model: encoder and decoder)."""
    d = model.whisper_config.to_dict()
    return json.loads(json.dumps(d, default=str))
