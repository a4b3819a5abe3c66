"""The pair classifier (`model.arch = "pair"`): Whisper encoder over [TTS reference | pause | child response].

Besides P(correct), the model has a CTC head that learns the expected text's phonemes from
the TTS half and from responses scored correct; its match score for the expected phonemes
in the response is handed to the classifier as evidence. A pretrained backbone's phoneme
heads (pretrain.py) give the CTC and presence heads a start (`init_heads_from_backbone`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ...config import ModelConfig, RunConfig
from ...layout import BACKBONE_HEADS, BACKBONE_VOCAB
from ...text import Vocab
from ...prep.prepare import TrainingInputs
from ..base import FitContext, FitResult, FoldData, TestInputs
from ..gbm.evidence import asr_device
from ..gbm.fold_ears import checkpoint_ear, ear_payload, recipe_of, train_fold_ears, with_folds
from .encoder import AttentionPool, FeatureScaler, SpeechEncoderModel, build_network, make_head, masked_mean, segment
from .ear import EAR_INPUTS, EarPrior, fit_ear_prior, fold_ear_inputs, rows_of, test_ear_inputs
from .frozen import FrozenCache, frozen_cache_usable
from .neural import NeuralMember, NeuralPredictor

log = logging.getLogger("readaloud.train")
N_SCORE_FEATURES = 6
N_MATCH_FEATURES = 4
N_BAG_FEATURES = 4
BAG_SHARPNESS = 5.0  # presence = a smooth maximum over time of a phoneme's frame logits


class PairClassifier(SpeechEncoderModel):
    """P(score = 1 | TTS reference, response, task, grade), plus CTC log-probs."""
    reads_frozen_halves = True  # the frozen part runs on each half alone (encode_pair)

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
            + (N_BAG_FEATURES if cfg.score_features and cfg.bag_weight > 0 else 0) \
            + (EAR_INPUTS if cfg.ear_evidence else 0)
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
        self.ear_norm = FeatureScaler(EAR_INPUTS) if cfg.ear_evidence else None   # what the fold ear hears (ear.py)
        if cfg.ear_evidence:
            # the ear's own score (ear.EarPrior: fitted on the fold's training rows, set by PairMember.warm_start)
            # is added to the logit; the layers that end in the logit start at 0, so the network starts as the ear
            # alone and learns what the comparison of the halves adds, not the ear's evidence again from noise
            self.register_buffer("ear_prior_mean", torch.zeros(EAR_INPUTS))
            self.register_buffer("ear_prior_scale", torch.ones(EAR_INPUTS))
            self.register_buffer("ear_prior_weight", torch.zeros(EAR_INPUTS))
            self.register_buffer("ear_prior_bias", torch.zeros(()))
            for last in (self.head[-1], self.evidence_head):
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def forward(self, batch: dict) -> dict:
        hidden, mask = self.encode_pair(batch)
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
        if self.ear_norm is not None:
            if "ear" not in batch:
                raise ValueError("this pair model reads the fold ear's evidence (model.ear_evidence) and its batch "
                                 "carries none: build its datasets through PairMember.dataset or attach_ear")
            evidence.append(self.ear_norm(batch["ear"].float()).to(pooled.dtype))
        logits = self.head(torch.cat(parts + evidence, dim=-1)).squeeze(-1)
        if evidence:  # a direct linear path: the evidence is usable from the first updates
            logits = logits + self.evidence_head(torch.cat(evidence, dim=-1)).squeeze(-1)
        if self.ear_norm is not None:
            logits = logits + self.ear_prior(batch["ear"])
        out["logits"] = logits
        return out

    def ear_prior(self, ear: torch.Tensor) -> torch.Tensor:
        """The ear's own logit of each item (a fixed logistic regression; ear.EarPrior)."""
        return ((ear.float() - self.ear_prior_mean) / self.ear_prior_scale) @ self.ear_prior_weight \
            + self.ear_prior_bias

    def set_ear_prior(self, prior) -> None:
        with torch.no_grad():
            for name, value in (("mean", prior.mean), ("scale", prior.scale), ("weight", prior.weight),
                                ("bias", prior.bias)):
                getattr(self, f"ear_prior_{name}").copy_(torch.as_tensor(value, dtype=torch.float32))

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

    def loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its parts: BCE on batch["target"] (the label, smoothed by the
        trainer), + ctc_weight x phoneme CTC, + bag_weight x phoneme presence."""
        bce = F.binary_cross_entropy_with_logits(out["logits"].float(), batch["target"])
        zero = torch.zeros((), device=bce.device)
        ctc = self.ctc_loss(out, batch) if self.cfg.ctc_weight > 0 and "ctc_log_probs" in out else zero
        bag = self.bag_loss(out, batch) if "bag_logits" in out else zero
        return bce + self.cfg.ctc_weight * ctc + self.cfg.bag_weight * bag, {"bce": bce, "ctc": ctc, "bag": bag}

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




def init_heads_from_backbone(model: PairClassifier, vocab: Vocab, backbone: str | Path) -> int:
    """Copy the pretrained rows (CTC and phoneme-presence heads) of tokens both vocabularies
    share; returns how many rows were copied."""
    backbone = Path(backbone)
    head_path, vocab_path = backbone / BACKBONE_HEADS, backbone / BACKBONE_VOCAB
    if not (head_path.exists() and vocab_path.exists()):
        return 0
    from safetensors.torch import load_file
    weights = load_file(str(head_path))
    pre = Vocab.from_dict(json.loads(vocab_path.read_text()))
    n = 0
    with torch.no_grad():
        for name, head in (("ctc", model.ctc_head), ("bag", model.bag_head)):
            if head is None or f"{name}.weight" not in weights or weights[f"{name}.weight"].shape[1] != head.weight.shape[1]:
                continue
            for tok, i in vocab.ids.items():
                j = pre.ids.get(tok)
                if j is not None:
                    head.weight[i] = weights[f"{name}.weight"][j]
                    head.bias[i] = weights[f"{name}.bias"][j]
                    n += 1
    return n


@dataclass
class PairPredictor(NeuralPredictor):
    """A loaded pair fold; with `ear_evidence`, its test rows also carry what the ear of every fold hears."""
    ear: Path | None = None

    def dataset(self, inputs: TestInputs):
        ds = super().dataset(inputs)
        if self.ear is not None:
            ds.attach_ear(rows_of(test_ear_inputs(self.cfg.model, self.ear, inputs), ds.meta))
        return ds


class PairMember(NeuralMember):
    family = "pair"
    model_class = PairClassifier
    ear_rows: dict[str, np.ndarray] | None = None   # this fold's rows, each read by its own fold's ear
    ear_prior: EarPrior | None = None               # the ear's own score, fitted on this fold's training rows

    def backbones_read(self, cfg: RunConfig) -> set[str]:
        return super().backbones_read(cfg) | ({cfg.model.asr_ear_backbone} if cfg.model.ear_evidence else set())

    def fit(self, data: FoldData, ctx: FitContext) -> FitResult:
        ears = None
        if data.cfg.model.ear_evidence:
            threads = data.cfg.threads if data.cfg.threads > 0 else torch.get_num_threads()
            ears, self.ear_rows = fold_ear_inputs(data, threads)
            train = self.training_rows(data)
            self.ear_prior = fit_ear_prior(rows_of(self.ear_rows, train), train["score"].to_numpy())
        result = super().fit(data, ctx)
        if ears is not None:   # test rows are read by the ear of every fold, kept beside the checkpoints
            result.payload |= ear_payload(ears, ctx.paths.assets)
        return result

    def dataset(self, meta, data: FoldData, model, vocab: Vocab):
        ds = super().dataset(meta, data, model, vocab)
        return ds.attach_ear(rows_of(self.ear_rows, ds.meta)) if self.ear_rows is not None else ds

    def load(self, ck: dict, device) -> PairPredictor:
        loaded = super().load(ck, device)
        predictor = PairPredictor(loaded.model, loaded.cfg, loaded.vocab, loaded.cats, loaded.priors, loaded.device)
        if loaded.cfg.model.ear_evidence:
            predictor.ear = checkpoint_ear(ck)   # the ear of every fold, beside the checkpoint
        return predictor

    def prepare_shared(self, inputs: TrainingInputs, cfgs: list[RunConfig], data_dir: Path,
                       progress: bool = True) -> None:
        """The frozen layers' outputs of every training half, and the fold ears with their evidence of every
        training clip, once, before parallel folds start (each fold would otherwise compute them all itself)."""
        recipes = {recipe_of(cfg.model): cfg for cfg in cfgs if cfg.model.ear_evidence}
        folded = with_folds(inputs.meta, data_dir) if recipes else None
        for recipe, cfg in recipes.items():
            if folded is not None:
                ears = train_fold_ears(recipe, Path(data_dir), folded, asr_device(cfg.device), 0, progress)
                ears.table(folded, Path(data_dir), progress)
        for cfg in cfgs:
            if frozen_cache_usable(cfg):
                model = build_network(PairClassifier, cfg.model, 1, 1, 2)  # only its frozen part runs
                cache = FrozenCache(model, inputs.stores[cfg.model.n_mels], inputs.banks[cfg.tts, cfg.model.n_mels],
                                    cfg.model.pause_frames)
                made = cache.ensure(inputs.meta["expected_text"], inputs.meta["filename"], progress=progress)
                log.info("frozen layers of %s: %d halves computed", cfg.model.backbone, made)

    def warm_start(self, model: PairClassifier, vocab: Vocab, cfg: RunConfig) -> None:
        if cfg.model.ear_evidence and self.ear_prior is not None:
            model.set_ear_prior(self.ear_prior)
        if cfg.model.backbone and model.ctc_head is not None:
            n = init_heads_from_backbone(model, vocab, cfg.model.backbone)
            if n:
                log.info("phoneme heads: %d rows start from the backbone's pretrained heads", n)
