"""Teacher forcing through a Whisper decoder: `teacher_forced_states`, and a decoder layer whose
cross-attention works on the memory's side of its projections.

Teacher-forcing a handful of text tokens against a clip's encoding (hundreds of positions), the
cross-attention's key and value projections of the memory are most of a decoder step: T x D x D
multiply-adds each, forward and again for the weight gradient, for L << T queries. Moved across
the dot products they cost L x H x T x D instead (H heads), and the result is the same up to
rounding:

    score(q_h, m_t) = q_h . (W_k,h m_t)        = (W_k,h^T q_h) . m_t        (k has no bias; a bias
                                                                             adds q . b_k to every t)
    sum_t a_t (W_v,h m_t + b_v,h)              = W_v,h (sum_t a_t m_t) + b_v,h sum_t a_t

That is cheaper while L x H < D (e.g. tiny.en, D 384, H 6: texts under 64 tokens), so
`decoder_layer` takes this path then and the projections of the memory otherwise (what they cost
a model8decoder epoch: docs/members.md, "model8decoder's step").

The layer is transformers' WhisperDecoderLayer (its modules and their order: self-attention,
cross-attention, feed-forward, each pre-norm with a residual), run here so the cross-attention
can take this path; the self-attention is the layer's own module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.whisper.modeling_whisper import WhisperDecoder


def memory_side_cross_attention(attn, x: torch.Tensor, memory: torch.Tensor, cross_bias: torch.Tensor,
                                training: bool) -> torch.Tensor:
    """WhisperAttention `attn` from queries x [B, L, D] to `memory` [B, T, D] (additive mask
    `cross_bias` [B, 1, 1, T]) without projecting the memory: see the module's docstring."""
    b, n, d = x.shape
    h, dh = attn.num_heads, attn.head_dim
    q = (attn.q_proj(x) * attn.scaling).view(b, n, h, dh)
    w_k = attn.k_proj.weight.view(h, dh, d)
    q_mem = torch.einsum("blhk,hkd->bhld", q, w_k).reshape(b, h * n, d)       # queries in memory space
    scores = torch.baddbmm(cross_bias.view(b, 1, -1).to(q_mem.dtype), q_mem, memory.transpose(1, 2))
    weights = F.dropout(torch.softmax(scores, dim=-1), p=attn.dropout, training=training)   # [B, H L, T]
    mixed = torch.bmm(weights, memory).view(b, h, n, d)                        # sum_t a_t m_t per head
    w_v = attn.v_proj.weight.view(h, dh, d)
    out = torch.einsum("bhld,hkd->blhk", mixed, w_v)
    if attn.v_proj.bias is not None:
        total = weights.sum(-1).view(b, h, n).transpose(1, 2)                  # 1 without dropout
        out = out + total[..., None] * attn.v_proj.bias.view(h, dh)
    return attn.out_proj(out.reshape(b, n, d))


def projected_cross_attention(attn, x: torch.Tensor, memory: torch.Tensor, cross_bias: torch.Tensor,
                              training: bool) -> torch.Tensor:
    """The same attention as transformers computes it (keys and values of every memory position)."""
    out, _ = attn(x, key_value_states=memory, attention_mask=cross_bias)
    return out


def decoder_layer(layer, x: torch.Tensor, causal: torch.Tensor, memory: torch.Tensor, cross_bias: torch.Tensor,
                  training: bool) -> torch.Tensor:
    """One WhisperDecoderLayer on x [B, L, D]: `causal` [1, 1, L, L] and `cross_bias` [B, 1, 1, T]
    are additive masks. The cross-attention takes the memory-side path while it is cheaper."""
    attn = layer.encoder_attn
    cross = memory_side_cross_attention if x.shape[1] * attn.num_heads < attn.embed_dim else projected_cross_attention
    h, _ = layer.self_attn(layer.self_attn_layer_norm(x), attention_mask=causal)
    x = x + F.dropout(h, p=layer.dropout, training=training)
    h = cross(attn, layer.encoder_attn_layer_norm(x), memory, cross_bias, training)
    x = x + F.dropout(h, p=layer.dropout, training=training)
    h = layer.activation_fn(layer.fc1(layer.final_layer_norm(x)))
    h = layer.fc2(F.dropout(h, p=layer.activation_dropout, training=training))
    return x + F.dropout(h, p=layer.dropout, training=training)


def teacher_forced_states(dec: WhisperDecoder, memory: torch.Tensor, memory_mask: torch.Tensor,
                          inputs: torch.Tensor, training: bool) -> torch.Tensor:
    """A WhisperDecoder's states [B, L, D] for teacher-forced `inputs`: causal self-attention and
    cross-attention to the unmasked `memory` only (WhisperDecoder.forward would drop the mask; the
    layers run through cross_attention.decoder_layer, which spares projecting the memory)."""
    n = inputs.shape[1]
    x = dec.embed_tokens(inputs) * dec.embed_scale + dec.embed_positions.weight[:n].to(memory.dtype)
    x = F.dropout(x, p=dec.dropout, training=training)
    neg = torch.finfo(x.dtype).min
    causal = torch.full((n, n), neg, dtype=x.dtype, device=x.device).triu(1)[None, None]
    cross = torch.zeros(memory_mask.shape, dtype=x.dtype, device=x.device)
    cross = cross.masked_fill(~memory_mask, neg)[:, None, None, :]
    for layer in dec.layers:
        x = decoder_layer(layer, x, causal, memory, cross, training)
    return dec.layer_norm(x)
