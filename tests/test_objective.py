"""gopd_kernels.objective.stat_free_gradients against autograd through token_objective.

The scalar-loss fused-linear path uses stat_free_gradients to hand the per-token gradients to a
backend before the forward (rows_forward_backward); they must be exactly what autograd through the
objective gives after it, and None whenever they depend on the statistics.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gopd_kernels import _validate
from gopd_kernels._layout import LP_S, NSTATS
from gopd_kernels.objective import Rows, TokenInputs, full_loss_from_stats, stat_free_gradients, token_objective


def _options(mode, lam=1.0, is_cap=5.0):
    return _validate.options(mode=mode, lam=lam, reduction="sum", clip_eps=0.2, clip_eps_high=None, dual_clip=3.0,
                             is_cap=is_cap, temperature=1.0, ignore_index=-100)


def _inputs(old, rollout):
    return TokenInputs(has_ref=True, old_logprobs=old, rollout_logprobs=rollout)


def _autograd_gradients(stats, valid, mode, lam, old, rollout, is_cap, scale):
    lp_s = stats[LP_S].clone().requires_grad_(True)
    full = full_loss_from_stats(stats, lam).requires_grad_(True)
    none = stats.new_zeros((stats.shape[1], 0))
    per_token, _ = token_objective(Rows(lp_s, full, stats, none, none), valid, _options(mode, lam, is_cap),
                                   _inputs(old, rollout))
    return torch.autograd.grad(per_token.sum() * scale, (lp_s, full), allow_unused=True, materialize_grads=True)


@given(n=st.integers(0, 40), lam=st.sampled_from([0.0, 1.0, 1.5, 3.0]), with_old=st.booleans(),
       with_rollout=st.booleans(), is_cap=st.sampled_from([1.0, 5.0]), scale=st.sampled_from([1.0, 1 / 7, 1e-3]),
       seed=st.integers(0, 10_000))
@settings(max_examples=60)
def test_full_mode_gradients_match_autograd(n, lam, with_old, with_rollout, is_cap, scale, seed):
    g = torch.Generator().manual_seed(seed)
    stats = torch.randn(NSTATS, n, generator=g, dtype=torch.float64) * 3
    valid = torch.rand(n, generator=g) < 0.8
    # float64, as the ops hand per-token inputs to the objective
    old = (torch.randn(n, generator=g, dtype=torch.float64) - 2) if with_old else None
    rollout = (torch.randn(n, generator=g, dtype=torch.float64) - 2) if with_rollout else None
    got = stat_free_gradients(valid, _options("full", lam, is_cap), _inputs(old, rollout), scale)
    if with_rollout and not with_old:
        assert got is None  # the weight is built from the student's own lp_s: it needs the statistics
        return
    want = _autograd_gradients(stats, valid, "full", lam, old, rollout, is_cap, scale)
    assert got[0].dtype == got[1].dtype == torch.float64
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("mode", ["sampled", "topk"])
@pytest.mark.parametrize("with_rollout", [False, True])
def test_other_modes_are_never_stat_free(mode, with_rollout):
    valid = torch.ones(4, dtype=torch.bool)
    rollout = torch.zeros(4, dtype=torch.float64) if with_rollout else None
    assert stat_free_gradients(valid, _options(mode), _inputs(None, rollout), 1.0) is None
