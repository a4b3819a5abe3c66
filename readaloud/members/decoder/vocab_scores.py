"""Per-token evidence over a whole vocabulary, in few passes over the logits.

model8decoder's head reads, for each expected token, its log p, its margin over the best other
token and the entropy of the decoder's distribution, and trains through all three. Written with
plain autograd (log_softmax, gather, a scatter of -inf for the best other token, exp * log p for
the entropy) each step makes and walks some fifteen [tokens x 51,864] float32 tensors forward and
back; on a 2-core CPU those passes cost about as much as the vocabulary projection itself. Here one
buffer holds the logits, then log p, then their gradient, and the passes go a few rows at a time:

    p = softmax(z),  H = -sum(p log p)
    logp    = log p_t                     d/dz = onehot_t - p
    margin  = log p_t - log p_o           d/dz = onehot_t - onehot_o   (o: the best other token)
    entropy = H                           d/dz = -p (log p + H)

`masked_token_scores` also scores only the positions a mask keeps (a batch's texts are padded to
its longest; the padding's projection onto the vocabulary was work nobody read).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS_PER_CHUNK = 32  # rows handled at a time: 32 x 51,864 float32 = 6.6 MB, stays in cache between passes


class _ProjectedTokenScores(torch.autograd.Function):
    """states [N, D] @ weight [V, D]^T -> per row: log p of the target, margin over the best other
    token, entropy. One [N, V] buffer serves as logits, then log p (saved for backward), then the
    logits' gradient: a fresh 50 MB tensor costs its page faults every step. softmax stands in for
    exp (p = softmax(log p)): torch's softmax kernel is faster than its exp on CPU."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        lp = F.linear(states, weight).float()
        entropy = torch.empty(lp.shape[0], dtype=lp.dtype, device=lp.device)
        other = torch.empty(lp.shape[0], dtype=torch.long, device=lp.device)   # the best token, then the best other
        for s in range(0, lp.shape[0], ROWS_PER_CHUNK):
            c = lp[s: s + ROWS_PER_CHUNK]
            top = c.argmax(-1, keepdim=True)
            p = torch.softmax(c, dim=-1)
            # log-sum-exp from the best token, whose p >= 1 / V is never rounded to 0
            c.sub_(c.gather(-1, top) - torch.log(p.gather(-1, top)))
            entropy[s: s + ROWS_PER_CHUNK] = -torch.linalg.vecdot(p, c)
            other[s: s + ROWS_PER_CHUNK] = top.squeeze(-1)
        tied = (other == targets).nonzero().squeeze(-1)       # the target is the best: take the runner-up
        if tied.numel():
            other[tied] = lp[tied].scatter(-1, targets[tied, None], float("-inf")).argmax(-1)
        tok = lp.gather(-1, targets[:, None]).squeeze(-1)
        margin = tok - lp.gather(-1, other[:, None]).squeeze(-1)
        ctx.save_for_backward(states, weight, lp, targets, other, entropy)
        return tok, margin, entropy

    @staticmethod
    def backward(ctx, g_logp, g_margin, g_entropy):
        states, weight, lp, targets, other, entropy = ctx.saved_tensors
        grad = lp   # log p is not needed after this (backward runs once): its buffer takes the gradient
        for s in range(0, lp.shape[0], ROWS_PER_CHUNK):
            sl = slice(s, s + ROWS_PER_CHUNK)
            c = grad[sl]
            p = torch.softmax(c, dim=-1)
            # d/dz = -p (g_logp + g_entropy (log p + H)), + the targets' and runners-up's one-hots
            c.add_(entropy[sl, None]).mul_(g_entropy[sl, None]).add_(g_logp[sl, None]).mul_(p).neg_()
        grad.scatter_add_(-1, targets[:, None], (g_logp + g_margin)[:, None])
        grad.scatter_add_(-1, other[:, None], -g_margin[:, None])
        grad = grad.to(states.dtype)
        g_states = grad @ weight if ctx.needs_input_grad[0] else None
        g_weight = grad.t() @ states if ctx.needs_input_grad[1] else None
        return g_states, g_weight, None


def projected_token_scores(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """States [N, D] projected onto the vocabulary by `weight` [V, D] and [N] target ids -> per row:
    log p of the target, its margin over the best other token, the distribution's entropy
    (differentiable in the states and the weight)."""
    if states.shape[0] == 0:
        empty = states.new_zeros(0, dtype=torch.float32)
        return {"logp": empty, "margin": empty, "entropy": empty}
    tok, margin, entropy = _ProjectedTokenScores.apply(states.contiguous(), weight, targets.contiguous())
    return {"logp": tok, "margin": margin, "entropy": entropy}


def masked_token_scores(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of decoder states [B, L, D] projected onto the vocabulary by `weight` [V, D], at the
    positions `mask` [B, L] keeps only; the others are 0 (the projection never runs there)."""
    scores = projected_token_scores(states[mask], weight, targets[mask])
    return {name: _at_kept(values, mask) for name, values in scores.items()}


def masked_target_logp(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """log p of each target [B, L] under decoder states [B, L, D] projected by `weight` [V, D], at
    the positions `mask` keeps only (0 elsewhere): `masked_token_scores` without the margin and
    entropy (the silent-clip contrast needs only log p)."""
    logits = F.linear(states[mask], weight).float()
    logp = logits.gather(-1, targets[mask][:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return _at_kept(logp, mask)


def _at_kept(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[mask.sum()] values of the kept positions -> [*mask.shape], 0 elsewhere (differentiable)."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)
