"""A transformers Whisper encoder on log-mel windows shorter than its 30 s.

Whisper was trained on 30 s windows and `WhisperEncoder.forward` refuses anything else; on 2 CPU
cores a 10 s window encodes ~4x faster and keeps the transcripts (real-length input does not:
features.whisper_window_s). The frozen-encoder members (members/decoder.py) and the benchmarks
that compare ASR paths or time members use this one function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import WhisperEncoder


def encode_window(encoder: WhisperEncoder, mels: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder on [B, n_mels, frames] windows of up to 30 s -> [B, frames / 2, D]: the
    same arithmetic as WhisperEncoder.forward, whose check allows only 30 s (a test compares the
    two there); the position table is cut to the window."""
    x = F.gelu(encoder.conv1(mels.to(encoder.conv1.weight.dtype)))
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)
    x = x + encoder.embed_positions.weight[: x.shape[1]].to(x.dtype)
    for layer in encoder.layers:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out
    return encoder.layer_norm(x)
