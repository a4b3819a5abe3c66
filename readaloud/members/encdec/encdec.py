"""The encoder-decoder classifier (`model.arch = "encdec"`): the 1st-place idea of the
"Goodnight Moon" challenge, on this project's small Whisper.

The Whisper encoder reads the child's response; a Whisper decoder is teacher-forced on the
expected text's tokens ([BOS] t1 .. tn -> t1 .. tn EOS) while cross-attending to it. How
probable the decoder finds each expected token given the audio (log p, and its margin over
the best other token), pooled over the text, is the evidence for P(correct); the head is
trained with BCE *through* the decoder, so BCE itself sharpens "does the audio say this?".
Auxiliary ASR losses teach it to listen, on the TTS reference (always says the text) and on
responses scored correct (they say it exactly): the decoder's token cross-entropy, and a
joint CTC loss on the encoder (as in hybrid CTC/attention ASR, it makes the alignment, which
the decoder's cross-attention must otherwise find from scratch, learnable much sooner).

Token ids: the vocabulary's ids 0..V-1 (id 0, the CTC blank, never occurs in a text and
serves as EOS), BOS = V and PAD = V + 1 beyond it. The decoder is `transformers`'
WhisperDecoder (its embeddings, layers and final norm), but run by our own loop like the
encoder: `WhisperDecoder.forward` (transformers 5.23) hands its layers
`encoder_attention_mask=None`, so batched encodings' padding would leak into the
cross-attention; `WhisperDecoderLayer` does accept the mask, so `decode` passes it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from ...config import ModelConfig
from ...whisper.teacher_forcing import teacher_forced_states
from ..pair.encoder import FeatureScaler, SpeechEncoderModel, make_head, masked_mean, segment
from ..pair.neural import NeuralMember

MAX_TOKENS = 448        # decoder positions (Whisper's own); longer texts are cut (EOS included)
N_TOKEN_FEATURES = 10


def decoder_whisper_config(base: WhisperConfig, cfg: ModelConfig, vocab_size: int) -> WhisperConfig:
    """`base` (the encoder's config) with the decoder's fields for a vocabulary of `vocab_size` + BOS + PAD.

    Derived from cfg and the vocabulary only, so a checkpoint's saved config rebuilds the same model.
    """
    c = WhisperConfig.from_dict(base.to_dict())
    c.decoder_layers = cfg.decoder_layers
    c.decoder_attention_heads = base.encoder_attention_heads
    c.decoder_ffn_dim = base.encoder_ffn_dim
    c.decoder_layerdrop = 0.0
    c.vocab_size = vocab_size + 2
    c.max_target_positions = MAX_TOKENS
    c.pad_token_id, c.bos_token_id, c.eos_token_id = vocab_size + 1, vocab_size, 0
    c.decoder_start_token_id = vocab_size
    c._attn_implementation = "sdpa"
    return c


POOL_FILL = 1e4  # stands in for masked tokens in a min


def logp_pools(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
    """Mean, min and sum / 10 over `mask` ([B, L]; n = its row sums) of a per-token log p (or a
    difference of two)."""
    return [(x * mask).sum(1) / n, x.masked_fill(~mask, POOL_FILL).min(1).values, (x * mask).sum(1) / 10.0]


def token_pools(tok: torch.Tensor, margin: torch.Tensor, mask: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
    """Per-text pools of the expected tokens' evidence over `mask` ([B, L]; n = its row sums): mean,
    min and sum / 10 of log p, mean and min of the margin over the best other token."""
    return [*logp_pools(tok, mask, n), (margin * mask).sum(1) / n, margin.masked_fill(~mask, POOL_FILL).min(1).values]


class EncDecClassifier(SpeechEncoderModel):
    """P(score = 1 | response audio, expected text's tokens, task, grade).

    The encoder runs on the response segment alone, not on the pair: the decoder must judge
    the child's audio, and an encoding of [reference | response] would let it read the
    expected text off the reference (which always says it) through self-attention -- a
    shortcut that makes every response look correct. Its positions also start at 0 as in
    Whisper's pretraining. In training the reference segment is encoded separately (about a
    third of the pair's frames) for the auxiliary ASR loss, where it is a clean transcript.
    """

    def __init__(self, cfg: ModelConfig, n_tasks: int, n_grades: int, vocab_size: int,
                 whisper_config: WhisperConfig | None = None, encoder: WhisperEncoder | None = None):
        super().__init__(cfg, whisper_config, encoder)
        self.n_out = max(int(vocab_size), 1)          # output ids 0..V-1; 0 = EOS
        self.bos, self.pad = self.n_out, self.n_out + 1
        self.whisper_config = decoder_whisper_config(self.encoder.config, cfg, self.n_out)
        self.decoder = WhisperDecoder(self.whisper_config)
        dim = self.whisper_config.d_model
        self.task_emb = nn.Embedding(n_tasks + 1, cfg.task_dim)   # index 0: unknown
        self.grade_emb = nn.Embedding(n_grades + 1, cfg.grade_dim)
        self.token_norm = FeatureScaler(N_TOKEN_FEATURES)
        self.head = make_head(cfg, dim + cfg.task_dim + cfg.grade_dim + N_TOKEN_FEATURES)
        self.evidence_head = nn.Linear(N_TOKEN_FEATURES, 1)  # direct path: usable from the first updates
        # joint CTC on the encoder (training aid only, as in hybrid CTC/attention ASR): makes the
        # encoder's positions tell characters apart early, so cross-attention has keys to find
        self.joint_ctc = nn.Linear(dim, self.n_out) if self.n_out > 1 else None

    # ---- pieces ---------------------------------------------------------------------------
    def encode_segment(self, batch: dict, start: torch.Tensor, positions: torch.Tensor):
        """Encoder over positions [start, start + positions) of each item's pair, alone (left-aligned)."""
        f = self.frames_per_position
        feats = segment(batch["feats"], start * f, positions * f)
        mask = torch.arange(feats.shape[1], device=feats.device)[None] < (positions * f)[:, None]
        return self.encode(feats, mask)

    def token_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher forcing: inputs [BOS t1..tn PAD..], outputs [t1..tn EOS 0..], mask of the outputs."""
        lengths = batch["target_lengths"].clamp(max=MAX_TOKENS - 1)
        texts = torch.split(batch["targets"], batch["target_lengths"].tolist())
        n = int(lengths.max()) + 1 if len(lengths) else 1
        inputs = torch.full((len(texts), n), self.pad, dtype=torch.long, device=lengths.device)
        outputs = torch.zeros((len(texts), n), dtype=torch.long, device=lengths.device)
        inputs[:, 0] = self.bos
        for b, t in enumerate(texts):
            k = int(lengths[b])
            inputs[b, 1: k + 1] = t[:k]
            outputs[b, :k] = t[:k]          # outputs[b, k] = 0: EOS
        mask = torch.arange(n, device=lengths.device)[None] <= lengths[:, None]
        return inputs, outputs, mask

    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Decoder states [B, L, D]: causal self-attention, cross-attention to unmasked memory only."""
        return teacher_forced_states(self.decoder, memory, memory_mask, inputs, self.training)

    def token_log_probs(self, states: torch.Tensor) -> torch.Tensor:
        """Log-softmax over the output ids (tied embeddings, as Whisper; BOS and PAD excluded)."""
        return F.log_softmax(F.linear(states, self.decoder.embed_tokens.weight[: self.n_out]).float(), dim=-1)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        inputs, outputs, tmask = self.token_batch(batch)
        memory, mmask = self.encode_segment(batch, batch["resp_start"], batch["resp_positions"])
        states = self.decode(memory, mmask, inputs)
        lp = self.token_log_probs(states)
        tok = lp.gather(-1, outputs[..., None]).squeeze(-1)                       # log p(expected)
        if lp.shape[-1] > 1:
            best_other = lp.scatter(-1, outputs[..., None], float("-inf")).max(-1).values
            margin = tok - best_other
        else:
            margin = torch.zeros_like(tok)
        n = tmask.sum(1).float()
        feats = torch.stack([
            *token_pools(tok, margin, tmask, n),
            tok.gather(1, (n.long() - 1)[:, None]).squeeze(1),                  # log p(EOS after the text)
            torch.log(n),
            torch.log(batch["resp_positions"].float().clamp(min=1) * 0.02),
            torch.log(batch["tts_positions"].float().clamp(min=1) * 0.02),
            torch.log(batch["resp_positions"].float().clamp(min=1) / batch["tts_positions"].float().clamp(min=1)),
        ], dim=1)
        evidence = self.token_norm(feats).to(states.dtype)
        parts = [masked_mean(states, tmask), self.task_emb(batch["task"]), self.grade_emb(batch["grade"]), evidence]
        logits = self.head(torch.cat(parts, dim=-1)).squeeze(-1) + self.evidence_head(evidence).squeeze(-1)
        out = {"logits": logits, "token_log_probs": tok, "token_mask": tmask,
               "token_nll": -(tok * tmask).sum(1) / n}
        if self.training and self.cfg.ctc_weight > 0:  # the auxiliary loss's terms
            ref_memory, ref_mask = self.encode_segment(batch, torch.zeros_like(batch["resp_start"]),
                                                       batch["tts_positions"])
            ref_lp = self.token_log_probs(self.decode(ref_memory, ref_mask, inputs))
            out["ref_token_nll"] = -(ref_lp.gather(-1, outputs[..., None]).squeeze(-1) * tmask).sum(1) / n
            if self.joint_ctc is not None:
                out["ctc_nll"] = self.ctc_nll(memory, batch["resp_positions"], batch)
                out["ref_ctc_nll"] = self.ctc_nll(ref_memory, batch["tts_positions"], batch)
        return out

    def ctc_nll(self, memory: torch.Tensor, positions: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per item: CTC loss of the expected text on the encoder states, per token."""
        lp = F.log_softmax(self.joint_ctc(memory).float(), dim=-1)
        tl = batch["target_lengths"]
        nll = F.ctc_loss(lp.transpose(0, 1), batch["targets"], positions, tl, reduction="none", zero_infinity=True)
        return nll / tl.clamp(min=1).float()

    def loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """BCE on batch["target"] (the label, smoothed by the trainer) + ctc_weight x the
        auxiliary ASR losses (logged as `ctc`; `bag` stays 0: this family has no presence head)."""
        bce = F.binary_cross_entropy_with_logits(out["logits"].float(), batch["target"])
        zero = torch.zeros((), device=bce.device)
        ctc = self.auxiliary_loss(out, batch) if self.cfg.ctc_weight > 0 else zero
        return bce + self.cfg.ctc_weight * ctc + self.cfg.bag_weight * zero, {"bce": bce, "ctc": ctc, "bag": zero}

    def auxiliary_loss(self, out: dict, batch: dict) -> torch.Tensor:
        """The ASR losses, on responses scored correct (batch["ctc_response"]) and, in training
        forwards, on the TTS reference: the decoder's token cross-entropy of the expected text
        + EOS (per item averaged over tokens) plus the joint CTC loss of the encoder (per
        token). `loss` weighs the sum by `model.ctc_weight` (logged as `train_ctc`)."""
        has = (batch["target_lengths"] > 0).float()
        correct = batch["ctc_response"].float() * has
        ref_ok = has * (batch["tts_positions"] > 0).float()
        total, count = (out["token_nll"] * correct).sum(), correct.sum()
        if "ref_token_nll" in out:
            total, count = total + (out["ref_token_nll"] * ref_ok).sum(), count + ref_ok.sum()
        loss = total / count.clamp(min=1.0)
        if "ctc_nll" in out:
            ctc = (out["ctc_nll"] * correct).sum() + (out["ref_ctc_nll"] * ref_ok).sum()
            loss = loss + ctc / (correct.sum() + ref_ok.sum()).clamp(min=1.0)
        return loss


class EncDecMember(NeuralMember):
    family = "encdec"
    model_class = EncDecClassifier
