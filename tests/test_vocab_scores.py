"""The few-pass token scores (members/decoder/vocab_scores.py) equal plain autograd's, values and gradients."""
import torch
import torch.nn.functional as F

from readaloud.members.decoder.vocab_scores import (ROWS_PER_CHUNK, masked_target_logp, masked_token_scores,
                                            projected_token_scores)

NAMES = ("logp", "margin", "entropy")


def reference_token_scores(states, weight, targets):
    """The scores in plain autograd, as model8decoder computed them before vocab_scores.py."""
    lp = F.log_softmax(F.linear(states, weight).float(), dim=-1)
    tok = lp.gather(-1, targets[..., None]).squeeze(-1)
    best_other = lp.scatter(-1, targets[..., None], float("-inf")).max(-1).values
    entropy = -(lp.exp() * lp).sum(-1)
    return {"logp": tok, "margin": tok - best_other, "entropy": entropy}


def _scores_and_grads(fn, states, weight, targets, upstream):
    x = states.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    scores = fn(x, w, targets)
    torch.autograd.backward([scores[k] for k in NAMES], upstream)
    return {k: v.detach() for k, v in scores.items()}, x.grad, w.grad


def _problem(n=ROWS_PER_CHUNK * 2 + 5, vocab=3000, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g)
    states = torch.randn(n, dim, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    logits = states @ weight.T
    targets[:7] = logits[:7].argmax(-1)              # the target is the best token: the margin's runner-up
    targets[7:9] = logits[7:9].argsort(-1)[:, -2]    # the target is second best
    upstream = [torch.randn(n, generator=g) for _ in NAMES]
    return states, weight, targets, upstream


def test_projected_scores_and_gradients_equal_plain_autograd_over_several_chunks():
    states, weight, targets, upstream = _problem()
    want, want_gx, want_gw = _scores_and_grads(reference_token_scores, states, weight, targets, upstream)
    got, got_gx, got_gw = _scores_and_grads(projected_token_scores, states, weight, targets, upstream)
    for k in NAMES:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=2e-5)
    assert (got["margin"][:7] > 0).all() and (got["margin"][7:9] < 0).all()
    torch.testing.assert_close(got_gx, want_gx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_gw, want_gw, rtol=1e-4, atol=1e-5)


def test_masked_scores_fill_only_kept_positions_and_padding_gets_no_gradient():
    states, weight, targets, _ = _problem(n=24)
    states3, targets3 = states.view(4, 6, -1), targets.view(4, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    x = states3.clone().requires_grad_(True)
    got = masked_token_scores(x, weight, targets3, mask)
    want = reference_token_scores(states3, weight, targets3)
    for k in NAMES:
        assert got[k].shape == mask.shape
        torch.testing.assert_close(got[k][mask], want[k][mask], rtol=1e-5, atol=2e-5)
        assert (got[k][~mask] == 0).all()
    sum(got[k].sum() for k in NAMES).backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask].abs().sum(-1) > 0).all()


def test_no_kept_position_gives_empty_scores():
    states, weight, targets, _ = _problem(n=6)
    got = masked_token_scores(states.view(2, 3, -1), weight, targets.view(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert all(v.shape == (2, 3) and (v == 0).all() for v in got.values())


def test_masked_target_logp_is_the_scores_log_p_at_kept_positions():
    states, weight, targets, _ = _problem(n=12)
    states3, targets3 = states.view(3, 4, -1), targets.view(3, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    x = states3.clone().requires_grad_(True)
    got = masked_target_logp(x, weight, targets3, mask)
    want = reference_token_scores(states3, weight, targets3)["logp"]
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=2e-5)
    assert (got[~mask] == 0).all()
    got.sum().backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask].abs().sum(-1) > 0).all()
