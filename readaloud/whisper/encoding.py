"""A transformers Whisper encoder on log-mel windows shorter than its 30 s.

Whisper was trained on 30 s windows and `WhisperEncoder.forward` refuses anything else; on a CPU a
10 s window encodes several times faster and keeps the transcripts (real-length input does not:
features.whisper_window_s). The frozen-encoder members (members/decoder/decoder.py) and the benchmarks
that compare ASR paths or time members use this one function.

A frozen encoder's whole job is windows in, hidden states out, so it may run on either engine
(`TorchWindowEncoder`, `Ct2WindowEncoder`): CTranslate2 at float32 computes what the transformers
encoder computes from the same weights, to float16 rounding of the cached values, faster on CPU,
and needs no transformers copy of the weights (int8 is faster still but moves the numbers); the
measurements are in docs/members.md.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .asr import ct2_engine, load_ct2_whisper, model_identity


def encode_window(encoder: WhisperEncoder, mels: torch.Tensor, layers: int | None = None) -> torch.Tensor:
    """Whisper's encoder on [B, n_mels, frames] windows of up to 30 s -> [B, frames / 2, D]: the
    same arithmetic as WhisperEncoder.forward, whose check allows only 30 s (a test compares the
    two there); the position table is cut to the window. `layers`: only the stem and the lowest
    `layers` layers, no final layer norm (what an encoder whose top layers train reads, cached)."""
    x = F.gelu(encoder.conv1(mels.to(encoder.conv1.weight.dtype)))
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)
    x = x + encoder.embed_positions.weight[: x.shape[1]].to(x.dtype)
    for layer in encoder.layers[:layers]:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out
    return x if layers is not None and layers < len(encoder.layers) else encoder.layer_norm(x)


def weights_key(modules) -> str:
    """12 hex digits of a hash of (prefix, module) pairs' tensor names, shapes and values: the name of
    a cache of what those weights compute."""
    h = hashlib.sha1()
    for prefix, module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{prefix}{name}{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def run_layers(x: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
    """Whisper encoder layers over [B, n, D] with the padded positions (mask False) masked out of attention."""
    bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill(~mask, torch.finfo(x.dtype).min)[:, None, None, :]  # broadcast, no copy
    for layer in layers:
        out = layer(x, bias)
        x = out[0] if isinstance(out, tuple) else out
    return x


def lower_layers_encoder(encoder: WhisperEncoder, top: int, device: torch.device) -> "TorchWindowEncoder":
    """The encoder below its top `top` layers as a window encoder (the stem, positions and the lowest
    layers, no final layer norm), keyed by those weights: what an encoder whose top layers train reads, cached."""
    below = len(encoder.layers) - top
    if top < 1 or below < 0:
        raise ValueError(f"{top} top layers to adapt: the encoder has {len(encoder.layers)} layers")
    lower = [("stem1.", encoder.conv1), ("stem2.", encoder.conv2), ("pos.", encoder.embed_positions),
             *((f"{i}.", layer) for i, layer in enumerate(encoder.layers[:below]))]
    return TorchWindowEncoder(encoder, device, weights_key(lower), layers=below)


class TorchWindowEncoder:
    """A transformers Whisper encoder as a window encoder: [B, n_mels, frames] float32 numpy ->
    [B, frames / 2, D] float32. `key` names its outputs in caches (the weights' hash)."""

    def __init__(self, encoder: WhisperEncoder, device: torch.device, weights_key: str, layers: int | None = None):
        """`layers`: the lowest layers only (encode_window); the key then names them."""
        self.encoder, self.device, self.layers = encoder, device, layers
        self.key = weights_key if layers is None else f"{weights_key}_below{layers}"
        self.batch_size = 16 if device.type == "cuda" else 1  # padded windows: one at a time is fastest on CPU

    def __call__(self, mels: np.ndarray) -> np.ndarray:
        encoder, home = self.encoder, next(self.encoder.parameters()).device
        was_training = encoder.training
        encoder.to(self.device).eval()
        try:
            with torch.inference_mode():
                return encode_window(encoder, torch.from_numpy(mels).to(self.device), self.layers).float().cpu().numpy()
        finally:
            encoder.to(home).train(was_training)


class Ct2WindowEncoder:
    """The encoder of a CTranslate2 Whisper folder as a window encoder (same contract as
    TorchWindowEncoder), loaded on first use. `key`: engine, compute type and the folder's weights."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", compute_type: str = "float32", threads: int = 0):
        self.model_dir, self.compute_type, self.threads = Path(model_dir), compute_type, max(0, threads)
        if device == "cuda" and ct2_engine().get_cuda_device_count() == 0:
            device = "cpu"   # a CTranslate2 without CUDA: the same numbers, on the CPU
        self.device = device
        self.key = f"ct2_{compute_type}_{model_identity(self.model_dir)}"
        self.batch_size = 16 if device == "cuda" else 1
        self._model = None   # a ctranslate2.models.Whisper, loaded on first use

    def __call__(self, mels: np.ndarray) -> np.ndarray:
        if self._model is None:
            self._model = load_ct2_whisper(self.model_dir, self.device, self.compute_type, 1, self.threads)
        out = self._model.encode(ct2_engine().StorageView.from_array(np.ascontiguousarray(mels, np.float32)),
                                 to_cpu=True)
        return np.asarray(out, np.float32)


WindowEncoder = TorchWindowEncoder | Ct2WindowEncoder
