"""The result type shared by every G-OPD op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class GOPDOutput:
    """What :func:`gopd_kernels.gopd_loss` returns.

    loss: scalar (reduction "mean" / "sum") or the per-token loss with the targets' shape
        (reduction "none"); differentiable with respect to the student only.
    Per-token diagnostics, detached, the targets' shape, 0 at masked tokens:
        lp_s, lp_t, lp_r: log-probabilities of the target token under student / teacher / reference;
        reward: lam * (lp_t - lp_r) (sampled) or lam * E_ps[log p_t - log p_r] (full);
        kl: lp_s - lp_r (sampled) or KL(p_s || p_r) (full);
        advantage: reward - kl (sampled; None in full mode);
        entropy: entropy of the student's distribution;
        is_weight: truncated importance weight min(exp(lp_old - lp_rollout), is_cap) (1 without
            rollout_logprobs).
    """

    loss: torch.Tensor
    lp_s: torch.Tensor
    lp_t: torch.Tensor
    lp_r: torch.Tensor
    reward: torch.Tensor
    kl: torch.Tensor
    advantage: Optional[torch.Tensor]
    entropy: torch.Tensor
    is_weight: torch.Tensor
