"""The pair classifier: Whisper encoder over [TTS reference | pause | child response].

The encoder runs on the batch's real length (positional table sliced, padding masked), not
on Whisper's fixed 30 s window. Besides P(correct), the model has a CTC head that learns
the expected text's phonemes from the TTS half and from responses scored correct; its match
score for the expected phonemes in the response is handed to the classifier as evidence.
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

from .config import ModelConfig

log = logging.getLogger(__name__)
N_SCORE_FEATURES = 6
N_MATCH_FEATURES = 4
N_BAG_FEATURES = 4
BAG_SHARPNESS = 5.0  # presence = a smooth maximum over time of a phoneme's frame logits


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


def load_pretrained_encoder(backbone: str) -> WhisperEncoder:
    """The encoder of a Whisper checkpoint, through `from_pretrained`.

    A local folder is read with local_files_only; a hub id is tried from the local cache
    first and from the hub only when HF_HUB_OFFLINE is not set (it cannot download here).
    """
    from transformers import WhisperModel
    local = Path(backbone).expanduser()
    if local.exists():
        model = WhisperModel.from_pretrained(str(local), local_files_only=True)
    else:
        try:
            model = WhisperModel.from_pretrained(backbone, local_files_only=True)
        except OSError:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
                raise OSError(f"backbone {backbone!r}: not a local folder and not in the Hugging Face "
                              f"cache, and HF_HUB_OFFLINE is set") from None
            model = WhisperModel.from_pretrained(backbone)
    encoder = model.get_encoder()
    encoder.config._attn_implementation = "sdpa"
    return encoder


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
    pretrained `encoder`; subclasses add their heads after it (so its parameters come first).
    """

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

    @property
    def frames_per_position(self) -> int:
        """Mel frames behind one encoder position: Whisper's stride 2 times our pooling."""
        return 2 * self.cfg.position_pool

    def encode(self, feats: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper encoder on [B, T, n_mels] (T a multiple of frames_per_position) -> [B, n, D] + mask."""
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
        mask = frame_mask[:, :: self.frames_per_position][:, :n]
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~mask, torch.finfo(x.dtype).min)[:, None, None, :]  # broadcast, no copy
        for layer in enc.layers:
            out = layer(x, bias)
            x = out[0] if isinstance(out, tuple) else out
        return enc.layer_norm(x), mask


class PairClassifier(SpeechEncoderModel):
    """P(score = 1 | TTS reference, response, task, grade), plus CTC log-probs."""

    def __init__(self, cfg: ModelConfig, n_tasks: int, n_grades: int, vocab_size: int,
                 whisper_config: WhisperConfig | None = None, encoder: WhisperEncoder | None = None):
        super().__init__(cfg, whisper_config, encoder)
        encoder = self.encoder
        dim = encoder.config.d_model
        # index 0 of each table is "unknown" (a value not seen in training)
        self.task_emb = nn.Embedding(n_tasks + 1, cfg.task_dim)
        self.grade_emb = nn.Embedding(n_grades + 1, cfg.grade_dim)
        self.attn_pool = AttentionPool(dim) if cfg.pooling in ("attention", "attention_mean") else None
        pooled_dim = dim * (2 if cfg.pooling == "attention_mean" else 1)
        in_dim = pooled_dim + cfg.task_dim + cfg.grade_dim + (N_SCORE_FEATURES if cfg.score_features else 0) \
            + (N_MATCH_FEATURES if cfg.match_features else 0) \
            + (N_BAG_FEATURES if cfg.score_features and cfg.bag_weight > 0 else 0)
        self.match_proj = nn.Linear(dim, cfg.match_dim) if cfg.match_features else None
        self.match_scale = nn.Parameter(torch.tensor(10.0)) if cfg.match_features else None
        self.head = make_head(cfg, in_dim)
        n_evidence = in_dim - pooled_dim - cfg.task_dim - cfg.grade_dim
        self.evidence_head = nn.Linear(n_evidence, 1) if n_evidence else None
        self.ctc_head = nn.Linear(dim, vocab_size) if vocab_size > 1 else None
        # frame-level phoneme logits pooled over time: "is phoneme p said anywhere here?"
        # (no alignment to search for, so it learns much faster than CTC from scratch)
        self.bag_head = nn.Linear(dim, vocab_size) if vocab_size > 1 and cfg.bag_weight > 0 else None
        self.bag_norm = FeatureScaler(N_BAG_FEATURES) if self.bag_head is not None and cfg.score_features else None
        self.score_norm = FeatureScaler(N_SCORE_FEATURES) if cfg.score_features else None

    def forward(self, batch: dict) -> dict:
        hidden, mask = self.encode(batch["feats"], batch["frame_mask"])
        out = {"hidden_mask": mask}
        cfg = self.cfg
        if cfg.pooling == "mean":
            pooled = masked_mean(hidden, mask)
        elif cfg.pooling == "attention":
            pooled = self.attn_pool(hidden, mask)
        else:
            pooled = torch.cat([self.attn_pool(hidden, mask), masked_mean(hidden, mask)], dim=-1)
        parts = [pooled, self.task_emb(batch["task"]), self.grade_emb(batch["grade"])]
        evidence = []
        if self.ctc_head is not None:
            out["ctc_log_probs"] = F.log_softmax(self.ctc_head(hidden).float(), dim=-1)
        if self.bag_head is not None:
            out["bag_logits"] = self.bag_head(hidden).float()
        if cfg.score_features:
            evidence.append(self.score_norm(self.score_features(out.get("ctc_log_probs"), batch)).to(pooled.dtype))
            if self.bag_norm is not None:
                evidence.append(self.bag_norm(self.bag_features(out["bag_logits"], batch)).to(pooled.dtype))
        if cfg.match_features:
            evidence.append(self.match_features(hidden, batch).to(pooled.dtype))
        logits = self.head(torch.cat(parts + evidence, dim=-1)).squeeze(-1)
        if evidence:  # a direct linear path: the evidence is usable from the first updates
            logits = logits + self.evidence_head(torch.cat(evidence, dim=-1)).squeeze(-1)
        out["logits"] = logits
        return out

    def match_features(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """How well the response and the reference explain each other, in a learned space.

        Cosine similarities between every reference and every response position; coverage =
        how well each reference position is matched somewhere in the response (mean and a
        soft minimum), precision = the same from the response side. Differentiable, so BCE
        shapes the space in which "the same sounds" are measured.
        """
        z = F.normalize(self.match_proj(hidden).float(), dim=-1)
        n = z.shape[1]
        pos = torch.arange(n, device=z.device)[None]
        ref_mask = pos < batch["tts_positions"][:, None]
        resp_mask = (pos >= batch["resp_start"][:, None]) & (pos < (batch["resp_start"] + batch["resp_positions"])[:, None])
        sim = torch.einsum("bid,bjd->bij", z, z)
        neg = torch.finfo(sim.dtype).min
        pair = ref_mask[:, :, None] & resp_mask[:, None, :]
        sim = sim.masked_fill(~pair, neg)
        cover = sim.max(dim=2).values          # per reference position
        prec = sim.max(dim=1).values           # per response position
        t = self.match_scale.clamp(1.0, 50.0)

        def stats(x, mask):
            x = x.masked_fill(~mask, 0.0)
            cnt = mask.sum(1).clamp(min=1)
            mean = x.sum(1) / cnt
            soft_min = -torch.logsumexp((-t * x).masked_fill(~mask, neg), dim=1) / t + torch.log(cnt.float()) / t
            return mean, soft_min

        c_mean, c_min = stats(cover, ref_mask)
        p_mean, p_min = stats(prec, resp_mask)
        return torch.stack([c_mean, c_min, p_mean, p_min], dim=1)

    def score_features(self, log_probs: torch.Tensor | None, batch: dict) -> torch.Tensor:
        """Per item: CTC match of the expected phonemes in the response, and durations.

        [log P(expected)/len, (log P(expected) - best path)/len, best path per position,
         log response s, log reference s, log ratio]; detached, so they are evidence for
        the head and not a second way to move the CTC head.
        """
        resp_pos, tts_pos = batch["resp_positions"], batch["tts_positions"]
        feats = torch.zeros(len(resp_pos), N_SCORE_FEATURES, device=resp_pos.device)
        if log_probs is not None:
            with torch.no_grad():
                lp = segment(log_probs.detach(), batch["resp_start"], resp_pos)
                tl = batch["target_lengths"]
                nll = F.ctc_loss(lp.transpose(0, 1), batch["targets"], resp_pos, tl,
                                 reduction="none", zero_infinity=True)
                best = lp.max(-1).values.masked_fill(
                    torch.arange(lp.shape[1], device=lp.device)[None] >= resp_pos[:, None], 0).sum(1)
                n = tl.clamp(min=1).float()
                ok = (tl > 0) & (nll > 0)
                feats[:, 0] = torch.where(ok, -nll / n, torch.zeros_like(nll))
                feats[:, 1] = torch.where(ok, (-nll - best) / n, torch.zeros_like(nll))
                feats[:, 2] = best / resp_pos.clamp(min=1).float()
        feats[:, 3] = torch.log(resp_pos.float().clamp(min=1) * 0.02)
        feats[:, 4] = torch.log(tts_pos.float().clamp(min=1) * 0.02)
        feats[:, 5] = feats[:, 3] - feats[:, 4]
        return feats

    def bag_features(self, bag_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per item, from the response's phoneme presence (detached): are the expected
        phonemes there (mean, soft minimum of log P), and are others there (max, expected count)."""
        with torch.no_grad():
            pres = segment_presence(bag_logits.detach(), batch["resp_start"], batch["resp_positions"])
            expected = multi_hot(batch["targets"], batch["target_lengths"], pres.shape[1])
            expected[:, 0] = False
            other = ~expected
            other[:, 0] = False
            logp = F.logsigmoid(pres)
            n_exp = expected.sum(1).clamp(min=1).float()
            f = torch.zeros(len(pres), N_BAG_FEATURES, device=pres.device)
            f[:, 0] = (logp * expected).sum(1) / n_exp
            f[:, 1] = -torch.logsumexp((-logp * 4).masked_fill(~expected, -1e4), dim=1) / 4
            p_other = torch.sigmoid(pres) * other
            f[:, 2] = p_other.max(1).values
            f[:, 3] = p_other.sum(1) / (n_exp + 1)
            f[:, :2] = torch.where(expected.any(1, keepdim=True), f[:, :2], torch.zeros_like(f[:, :2]))
        return f

    def bag_loss(self, out: dict, batch: dict) -> torch.Tensor:
        """Phoneme presence BCE on the reference half and on responses scored correct."""
        logits = out["bag_logits"]
        v = logits.shape[-1]
        target = multi_hot(batch["targets"], batch["target_lengths"], v).float()[:, 1:]
        zero = torch.zeros_like(batch["resp_start"])
        ref = segment_presence(logits, zero, batch["tts_positions"])[:, 1:]
        resp = segment_presence(logits, batch["resp_start"], batch["resp_positions"])[:, 1:]
        has = (batch["target_lengths"] > 0).float()
        correct = batch["ctc_response"].float() * has
        l_ref = F.binary_cross_entropy_with_logits(ref, target, reduction="none").mean(1)
        l_resp = F.binary_cross_entropy_with_logits(resp, target, reduction="none").mean(1)
        return ((l_ref * has).sum() + (l_resp * correct).sum()) / (has.sum() + correct.sum()).clamp(min=1.0)

    def ctc_loss(self, out: dict, batch: dict) -> torch.Tensor:
        """CTC on the reference half (always says the text) and on responses scored correct."""
        lp = out["ctc_log_probs"]
        targets, tl = batch["targets"], batch["target_lengths"]
        tts = F.ctc_loss(lp.transpose(0, 1), targets, batch["tts_positions"], tl,
                         reduction="none", zero_infinity=True)
        resp_lp = segment(lp, batch["resp_start"], batch["resp_positions"])
        resp = F.ctc_loss(resp_lp.transpose(0, 1), targets, batch["resp_positions"], tl,
                          reduction="none", zero_infinity=True)
        n = tl.clamp(min=1).float()
        has = (tl > 0).float()
        correct = batch["ctc_response"].float() * has
        total = (tts / n * has).sum() + (resp / n * correct).sum()
        return total / (has.sum() + correct.sum()).clamp(min=1.0)


def segment(x: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """x[b, start_b : start_b + length_b] left-aligned into [B, max(length), ...] (rest: last valid)."""
    t = torch.arange(int(length.max().clamp(min=1)), device=x.device)
    idx = torch.minimum(start[:, None] + t[None], (start + length - 1).clamp(min=0)[:, None])
    idx = idx.clamp(max=x.shape[1] - 1)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def segment_presence(frame_logits: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Log-mean-exp (a smooth maximum) over positions [start, start + length) of [B, T, V] logits -> [B, V]."""
    pos = torch.arange(frame_logits.shape[1], device=frame_logits.device)[None]
    inside = (pos >= start[:, None]) & (pos < (start + length)[:, None])
    x = (frame_logits * BAG_SHARPNESS).masked_fill(~inside[..., None], -1e4)
    n = inside.sum(1, keepdim=True).clamp(min=1).float()
    return (torch.logsumexp(x, dim=1) - torch.log(n)) / BAG_SHARPNESS  # log-mean-exp: between mean and max


def multi_hot(targets: torch.Tensor, lengths: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size] bool: which token ids occur in each item's (concatenated) target."""
    out = torch.zeros(len(lengths), size, dtype=torch.bool, device=lengths.device)
    if targets.numel():
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        out[rows, targets] = True
    return out


def build_model(cfg: ModelConfig, n_tasks: int, n_grades: int, vocab_size: int,
                whisper_config: dict | None = None) -> SpeechEncoderModel:
    """Fresh model for training (pretrained encoder when cfg.backbone), or the skeleton a
    checkpoint's weights are loaded into (`whisper_config` from the checkpoint).

    `cfg.arch` picks the class: "encdec" the encoder-decoder (encdec.py), else the pair classifier.
    """
    if cfg.arch == "encdec":
        from .encdec import EncDecClassifier as model_class
    else:
        model_class = PairClassifier
    if whisper_config is not None:
        return model_class(cfg, n_tasks, n_grades, vocab_size, WhisperConfig.from_dict(whisper_config))
    if cfg.backbone:
        encoder = load_pretrained_encoder(cfg.backbone)
        if encoder.config.num_mel_bins != cfg.n_mels:
            raise ValueError(f"backbone {cfg.backbone} expects {encoder.config.num_mel_bins} mel bins; "
                             f"set --n_mels {encoder.config.num_mel_bins}")
        return model_class(cfg, n_tasks, n_grades, vocab_size, encoder=encoder)
    return model_class(cfg, n_tasks, n_grades, vocab_size)


def whisper_config_dict(model: SpeechEncoderModel) -> dict:
    """The model's Whisper config as JSON-safe dict (for an encdec model: encoder and decoder)."""
    d = model.whisper_config.to_dict()
    return json.loads(json.dumps(d, default=str))
