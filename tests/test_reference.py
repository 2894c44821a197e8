"""The oracle against closed forms, gradcheck and an independent peer (TRL's generalized JSD)."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gopd_kernels import reference as R

from helpers import make_problem, need

F64 = torch.float64


def grad_of(loss, z):
    (g,) = torch.autograd.grad(loss, z, retain_graph=True)
    return g


@pytest.mark.parametrize("mode", ["sampled", "full"])
@given(seed=st.integers(0, 10_000), n=st.sampled_from([1, 5, 17]), v=st.sampled_from([2, 7, 64]))
@settings(max_examples=15)
def test_lam_one_is_independent_of_the_reference(mode, seed, n, v):
    zs, zt, zr, y = make_problem(n, v, seed=seed)
    zs.requires_grad_(True)
    other_ref = torch.randn_like(zr) * 5
    outs = [R.gopd_loss(zs, y, zt, r, lam=1.0, mode=mode) for r in (zr, other_ref, None)]
    grads = [grad_of(o.loss, zs) for o in outs]
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o.loss, outs[0].loss)
        torch.testing.assert_close(g, grads[0])


def test_full_lam_one_is_reverse_kl_written_independently():
    zs, zt, _, y = make_problem(9, 31, seed=3, mask_frac=0.0)
    ps = torch.softmax(zs, -1)
    kl = (ps * (torch.log(ps) - torch.log(torch.softmax(zt, -1)))).sum(-1)
    out = R.gopd_loss(zs, y, zt, mode="full", reduction="none")
    torch.testing.assert_close(out.loss, kl)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 1.25, 3.0])
def test_full_gradient_vanishes_at_the_optimal_policy(lam):
    _, zt, zr, y = make_problem(6, 23, seed=4, mask_frac=0.0)
    log_q = lam * torch.log_softmax(zt, -1) + (1 - lam) * torch.log_softmax(zr, -1)
    zs = log_q.clone().requires_grad_(True)  # p_s = q / Z
    out = R.gopd_loss(zs, y, zt, zr, lam=lam, mode="full", reduction="sum")
    assert grad_of(out.loss, zs).abs().max() < 1e-12
    # At the optimum the loss is -log Z per token.
    per_token = R.gopd_loss(zs, y, zt, zr, lam=lam, mode="full", reduction="none").loss
    torch.testing.assert_close(per_token, -torch.logsumexp(log_q, -1))


@pytest.mark.parametrize("lam", [0.0, 1.0, 1.25, 2.5])
def test_sampled_advantage_and_gradient_closed_form(lam):
    zs, zt, zr, y = make_problem(11, 19, seed=5)
    zs.requires_grad_(True)
    out = R.gopd_loss(zs, y, zt, zr, lam=lam, mode="sampled", reduction="sum")
    valid = y != -100
    lp = lambda z: torch.log_softmax(z, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1)  # noqa: E731
    lp_s, lp_t, lp_r = lp(zs.detach()), lp(zt), lp(zr)
    adv = lam * (lp_t - lp_r) - (lp_s - lp_r)
    torch.testing.assert_close(out.advantage, torch.where(valid, adv, 0.0))
    torch.testing.assert_close(out.advantage, torch.where(valid, lam * lp_t + (1 - lam) * lp_r - lp_s, 0.0))
    # On-policy: d loss / d z = -A * d lp_s / d z.
    zs2 = zs.detach().clone().requires_grad_(True)
    expected = grad_of((-(torch.where(valid, adv, 0.0)) * lp(zs2)).sum(), zs2)
    torch.testing.assert_close(grad_of(out.loss, zs), expected)


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_masked_tokens_get_zero_gradient_and_zero_diagnostics(mode):
    zs, zt, zr, y = make_problem(10, 13, seed=6, mask_frac=0.5)
    zs.requires_grad_(True)
    out = R.gopd_loss(zs, y, zt, zr, lam=1.25, mode=mode)
    g = grad_of(out.loss, zs)
    masked = y == -100
    assert masked.any() and (~masked).any()
    assert g[masked].abs().max() == 0 and g[~masked].abs().max() > 0
    assert out.lp_s[masked].abs().max() == 0 and out.kl[masked].abs().max() == 0


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_mean_sum_none_and_num_items_in_batch(mode):
    zs, zt, zr, y = make_problem(12, 9, seed=7, mask_frac=0.3)
    kw = dict(lam=1.25, mode=mode)
    none = R.gopd_loss(zs, y, zt, zr, reduction="none", **kw).loss
    total = R.gopd_loss(zs, y, zt, zr, reduction="sum", **kw).loss
    mean = R.gopd_loss(zs, y, zt, zr, reduction="mean", **kw).loss
    count = int((y != -100).sum())
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, total / count)
    # Gradient accumulation: two micro-batches normalised by the global count sum to the full-batch mean.
    halves = [R.gopd_loss(zs[s], y[s], zt[s], zr[s], num_items_in_batch=count, **kw).loss
              for s in (slice(0, 5), slice(5, 12))]
    torch.testing.assert_close(halves[0] + halves[1], mean)


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_reduction_none_takes_per_token_upstream_gradients(mode):
    zs, zt, zr, y = make_problem(8, 11, seed=8)
    zs.requires_grad_(True)
    upstream = torch.randn(8, dtype=F64)
    per_token = R.gopd_loss(zs, y, zt, zr, lam=1.25, mode=mode, reduction="none").loss
    g = grad_of((upstream * per_token).sum(), zs)
    expected = sum(upstream[i] * grad_of(per_token[i], zs) for i in range(8))
    torch.testing.assert_close(g, expected)


# Sampled mode is excluded by design: its advantage is a detached function of lp_s, so its
# gradient is the policy-gradient estimator, not the derivative of the loss value.
@pytest.mark.parametrize("mode,lam", [("full", 0.0), ("full", 1.25), ("full", 1.0)])
def test_gradcheck(mode, lam):
    zs, zt, zr, y = make_problem(4, 6, seed=9, mask_frac=0.25)
    zs.requires_grad_(True)
    fn = lambda z: R.gopd_loss(z, y, zt, zr, lam=lam, mode=mode, temperature=(0.7, 1.0, 1.3)).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (zs,))


def test_ppo_clip_and_dual_clip():
    zs, zt, zr, y = make_problem(64, 7, seed=10, mask_frac=0.0)
    zs.requires_grad_(True)
    base = R.gopd_loss(zs, y, zt, zr, lam=1.25, reduction="none")
    adv, lp_s = base.advantage, base.lp_s
    old = lp_s - torch.where(adv > 0, 0.5, -0.5) * torch.ones_like(lp_s)  # ratio e^0.5 (A>0), e^-0.5 (A<0)
    old_dual = lp_s - 2.0  # ratio e^2 ~ 7.4 > dual clip 3 where A < 0
    out = R.gopd_loss(zs, y, zt, zr, lam=1.25, reduction="none", old_logprobs=old)
    g = grad_of(out.loss.sum(), zs)
    # Every token is clipped (A > 0 with ratio > 1 + eps, A < 0 with ratio < 1 - eps): no gradient.
    assert g.abs().max() == 0
    torch.testing.assert_close(out.loss, -adv * torch.clamp(torch.exp(lp_s - old), 0.8, 1.2))
    dual = R.gopd_loss(zs, y, zt, zr, lam=1.25, reduction="none", old_logprobs=old_dual)
    neg = adv < 0
    assert neg.any()
    torch.testing.assert_close(dual.loss[neg], -adv[neg] * 3.0)
    no_dual = R.gopd_loss(zs, y, zt, zr, lam=1.25, reduction="none", old_logprobs=old_dual, dual_clip=None)
    assert (no_dual.loss[neg] > dual.loss[neg]).all()


def test_truncated_importance_weight():
    zs, zt, zr, y = make_problem(16, 7, seed=11, mask_frac=0.0)
    plain = R.gopd_loss(zs, y, zt, zr, lam=1.25, reduction="none")
    rollout = plain.lp_s + torch.linspace(-3, 3, 16, dtype=F64)
    out = R.gopd_loss(zs, y, zt, zr, lam=1.25, reduction="none", rollout_logprobs=rollout, is_cap=5.0)
    w = torch.clamp(torch.exp(plain.lp_s - rollout), max=5.0)
    torch.testing.assert_close(out.is_weight, w)
    torch.testing.assert_close(out.loss, w * plain.loss)
    assert w.max() == 5.0


def test_agrees_with_trl_generalized_jsd_beta_one():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = need("trl.experimental.gkd.gkd_trainer")
    zs, zt, _, y = make_problem(2 * 9, 40, seed=12, mask_frac=0.25)
    zs, zt, y = zs.view(2, 9, 40), zt.view(2, 9, 40), y.view(2, 9)
    for temp in (1.0, 0.7):
        ours = R.gopd_loss(zs, y, zt, mode="full", temperature=temp).loss
        trl = gkd.GKDTrainer.generalized_jsd_loss(zs, zt, labels=y, beta=1.0, temperature=temp)
        assert math.isclose(float(ours), float(trl), rel_tol=1e-9, abs_tol=1e-12)


def _ragged(b, t, v, seed):
    """[b, t, v] fp64 logits of three models and [b, t] targets with ragged masks: each sequence keeps a
    random prefix (possibly empty), as padded responses of different lengths do."""
    zs, zt, zr, y = make_problem(b * t, v, seed=seed, mask_frac=0.0)
    lengths = torch.randint(0, t + 1, (b,), generator=torch.Generator().manual_seed(seed))
    y = y.view(b, t).clone()
    y[torch.arange(t)[None, :] >= lengths[:, None]] = -100
    return zs.view(b, t, v), zt.view(b, t, v), zr.view(b, t, v), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_reductions_closed_form(seed):
    zs, zt, zr, y = _ragged(4, 6, 9, seed)
    y[1] = -100  # one sequence with no valid token: it is not counted
    per_token = R.gopd_loss(zs, y, zt, zr, lam=1.25, mode="full", reduction="none").loss
    n_j = (y != -100).sum(-1)
    nonempty = n_j > 0
    token_mean = per_token.sum(-1)[nonempty] / n_j[nonempty]
    token_sum = per_token.sum(-1)[nonempty]
    kw = dict(lam=1.25, mode="full")
    for reduction, want in (("seq-mean-token-mean", token_mean.mean()), ("seq-mean-token-sum", token_sum.mean())):
        torch.testing.assert_close(R.gopd_loss(zs, y, zt, zr, reduction=reduction, **kw).loss, want)
        # A global count of sequences (gradient accumulation over micro-batches): the sum over S.
        torch.testing.assert_close(R.gopd_loss(zs, y, zt, zr, reduction=reduction, num_sequences_in_batch=10,
                                               **kw).loss, want * nonempty.sum() / 10)
    # Leading dims [2, 2, T]: four sequences, as [4, T].
    a = R.gopd_loss(zs.view(2, 2, 6, 9), y.view(2, 2, 6), zt.view(2, 2, 6, 9), zr.view(2, 2, 6, 9),
                    reduction="seq-mean-token-mean", **kw).loss
    torch.testing.assert_close(a, token_mean.mean())
    # With equal lengths seq-mean-token-mean is the token mean; ragged, it is not.
    full = R.gopd_loss(zs, torch.where(y == -100, 0, y), zt, zr, reduction="seq-mean-token-mean", **kw).loss
    mean = R.gopd_loss(zs, torch.where(y == -100, 0, y), zt, zr, reduction="mean", **kw).loss
    torch.testing.assert_close(full, mean)


@pytest.mark.parametrize("lam", [1.0, 1.25])
def test_advantage_from_old_logprobs(lam):
    zs, zt, zr, y = make_problem(11, 19, seed=6)
    valid = y != -100
    old = torch.randn(11, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 2
    kw = dict(lam=lam, mode="sampled", reduction="none")
    cur = R.gopd_loss(zs, y, zt, zr, old_logprobs=old, **kw)
    got = R.gopd_loss(zs, y, zt, zr, old_logprobs=old, advantage_from="old", **kw)
    want = lam * cur.lp_t + (1 - lam) * cur.lp_r - old
    torch.testing.assert_close(got.advantage, torch.where(valid, want, 0.0))
    # On-policy (old = lp_s) the two are the same function.
    on = cur.lp_s.clone()
    torch.testing.assert_close(R.gopd_loss(zs, y, zt, zr, old_logprobs=on, advantage_from="old", **kw).loss,
                               R.gopd_loss(zs, y, zt, zr, old_logprobs=on, **kw).loss)
