"""The decoder layer with memory-side cross-attention (members/encdec/cross_attention.py) computes what
transformers' WhisperDecoderLayer computes, outputs and gradients, on both of its paths."""
import pytest
import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer

from readaloud.whisper import teacher_forcing as cross_attention
from readaloud.whisper.teacher_forcing import decoder_layer, memory_side_cross_attention


def _layer(seed=0):
    torch.manual_seed(seed)
    cfg = WhisperConfig(d_model=48, decoder_attention_heads=4, decoder_ffn_dim=96, encoder_attention_heads=4)
    cfg._attn_implementation = "sdpa"
    layer = WhisperDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        layer.encoder_attn.v_proj.bias.normal_()           # non-zero biases: the value bias must come through
        layer.encoder_attn.q_proj.bias.normal_()
    return layer


def _inputs(b=3, n=5, t=40, d=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g)
    memory = torch.randn(b, t, d, generator=g)
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, 25:] = False
    keep[2, 7:] = False
    neg = torch.finfo(x.dtype).min
    causal = torch.full((n, n), neg).triu(1)[None, None]
    cross = torch.zeros(b, t).masked_fill(~keep, neg)[:, None, None, :]
    return x, causal, memory, cross             # decoder_layer's order


def _run(fn, layer, x, causal, memory, cross):
    layer.zero_grad()
    xg = x.clone().requires_grad_(True)
    out = fn(xg, causal, memory, cross)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), xg.grad, {k: p.grad.clone() for k, p in layer.named_parameters()}


def _hf(layer):
    def fn(x, causal, memory, cross):
        out = layer(x, attention_mask=causal, encoder_hidden_states=memory, encoder_attention_mask=cross, use_cache=False)
        return out[0] if isinstance(out, tuple) else out
    return fn


@pytest.mark.parametrize("n_tokens", [5, 20])     # 5 x 4 heads < 48: memory side; 20 x 4 >= 48: projected
def test_decoder_layer_equals_transformers_layer_outputs_and_gradients(n_tokens):
    layer = _layer()
    inputs = _inputs(n=n_tokens)
    want, want_gx, want_gp = _run(_hf(layer), layer, *inputs)
    got, got_gx, got_gp = _run(lambda *a: decoder_layer(layer, *a, training=False), layer, *inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_gx, want_gx, rtol=1e-4, atol=1e-5)
    assert want_gp.keys() == got_gp.keys()
    for k in want_gp:
        torch.testing.assert_close(got_gp[k], want_gp[k], rtol=1e-4, atol=1e-5, msg=k)


def test_short_texts_take_the_memory_side_path(monkeypatch):
    layer = _layer()
    calls = []
    real = cross_attention.memory_side_cross_attention
    monkeypatch.setattr(cross_attention, "memory_side_cross_attention", lambda *a: calls.append(1) or real(*a))
    decoder_layer(layer, *_inputs(n=5), training=False)
    assert calls == [1]
    decoder_layer(layer, *_inputs(n=20), training=False)
    assert calls == [1]


def test_masked_memory_positions_change_nothing():
    layer = _layer()
    x, causal, memory, cross = _inputs()
    changed = memory.clone()
    changed[2, 7:] = 1e3                                # behind clip 2's mask
    with torch.no_grad():
        a = memory_side_cross_attention(layer.encoder_attn, x, memory, cross, False)
        b = memory_side_cross_attention(layer.encoder_attn, x, changed, cross, False)
    torch.testing.assert_close(a, b)
