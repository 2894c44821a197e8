"""The two verl distillation losses, ``gopd`` and ``gopd_topk`` (imports verl; loaded by the plug-in).

``gopd`` (sampled, any lam; registered with ``use_estimator=True``). Per response token, with verl's
student log-prob lp_s (the weights being trained), the teacher server's lp_t (``teacher_logprobs``, K = 1),
the ref worker's lp_r (``ref_log_prob``; the initial student) and the sampling policy's lp_old
(``old_log_probs``), the function returns

    loss_i = lp_x - lam * lp_t - (1 - lam) * lp_r      [B, R], detached, 0 on masked tokens
    lp_x   = lp_s (advantage "current", gopd's convention) or lp_old ("old", the authors' fork)

and verl's ``distillation_loss`` (``use_policy_gradient=True``) turns it into the G-OPD update: advantages
A = -loss, its vanilla PPO loss ``-A * ratio`` with ``ratio = exp(lp_s - lp_old)``, clip ``clip_ratio_low`` /
``clip_ratio_high``, dual clip 3, the truncated importance weight ``rollout_is_weights`` and the actor's
``loss_agg_mode``. At lam = 1 the reference is not read (A = lp_t - lp_x).

``gopd_topk`` (lam = 1; registered with ``use_topk=True``). verl computes every top-k loss inside the
actor's forward, on the full student logits, in ``compute_topk_loss``, which calls its forward KL
whatever the loss is named; the plug-in wraps that function so that, for ``loss_mode=gopd_topk``, each
response row gets ``gopd_kernels.gopd_loss(mode="topk")``'s per-token loss (the student against the
teacher's top-k ids + log-probs and the tail bucket). verl then aggregates it directly
(``use_policy_gradient=False``), times ``rollout_is_weights`` when present. lam must be 1 there: lam != 1
needs the reference's probabilities of the teacher's ids and of the tail, which verl's ref worker does not
compute.
"""

from __future__ import annotations

import torch
from verl.trainer.distillation import losses as verl_losses
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

import gopd_kernels as gk

from . import settings as S


def worker_view(config, distillation_config) -> dict:
    """The settings a worker sees (its ActorConfig and DistillationConfig), in ``settings.problems``' names."""
    dl = distillation_config.distillation_loss
    view = {}
    for name in ("loss_mode", "use_task_rewards", "use_policy_gradient", "policy_loss_mode", "loss_max_clamp"):
        view[f"distillation.distillation_loss.{name}"] = getattr(dl, name)
    for name in ("use_kl_loss", "kl_loss_coef", "use_fused_kernels", "strategy"):
        view[f"actor_rollout_ref.actor.{name}"] = getattr(config, name)
    return view


def _check_worker(name: str, config, distillation_config, data, options: S.Options) -> None:
    """The rules of ``settings.problems`` on what this worker sees, at every call (a few dict look-ups)."""
    found = S.problems(worker_view(config, distillation_config), options)
    if name == S.LOSS_SAMPLED and options.lam != 1.0 and "ref_log_prob" not in data:
        found.append("ref_log_prob: missing from the actor's batch; lam != 1 needs the reference's log-probs "
                     "(set actor_rollout_ref.actor.use_kl_loss=True, kl_loss_coef=0)")
    S.raise_problems(found, f"loss_mode={name}, in the actor worker")


def _mask(data) -> torch.Tensor:
    m = data["response_mask"]
    return (m.to_padded_tensor(0) if m.is_nested else m).bool()


def _response_padded(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A response-level [B, r_b] tensor (nested or padded) as [B, R] like ``like``, zero-padded."""
    x = x.to_padded_tensor(0.0) if x.is_nested else x
    if x.shape[1] < like.shape[1]:
        x = torch.nn.functional.pad(x, (0, like.shape[1] - x.shape[1]))
    return x[:, : like.shape[1]].to(like.dtype)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@verl_losses.register_distillation_loss(verl_losses.DistillationLossSettings(names=[S.LOSS_SAMPLED],
                                                                             use_estimator=True))
def gopd_sampled_loss(config, distillation_config, model_output, data):
    """verl loss ``gopd``: the per-token ``lp_x - lam lp_t - (1 - lam) lp_r`` [B, R] (see the module)."""
    options = S.options_from_env()
    _check_worker(S.LOSS_SAMPLED, config, distillation_config, data, options)
    lam = options.lam
    lp_s = no_padding_2_padding(model_output["log_probs"], data).detach()
    lp_t = no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1).to(lp_s.dtype)
    mask = _mask(data)
    if lp_t.shape != lp_s.shape or mask.shape != lp_s.shape:
        raise ValueError(f"teacher_logprobs: expected one log-prob per token (K = 1, loss_mode={S.LOSS_SAMPLED} "
                         f"is an estimator loss), got shape {tuple(lp_t.shape)} for log-probs {tuple(lp_s.shape)}")
    lp_x = lp_s if options.advantage == "current" else _response_padded(data["old_log_probs"], lp_s)
    loss = lp_x - lam * lp_t
    metrics = {"gopd/lam": lam}
    if lam != 1.0:  # at lam = 1 the reference cancels and is not read
        lp_r = _response_padded(data["ref_log_prob"], lp_s)
        loss = loss - (1.0 - lam) * lp_r
        metrics["gopd/reward"] = Metric(AggregationType.MEAN, _masked_mean(lam * (lp_t - lp_r), mask))
        metrics["gopd/kl_ref"] = Metric(AggregationType.MEAN, _masked_mean(lp_s - lp_r, mask))
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    metrics["gopd/advantage"] = Metric(AggregationType.MEAN, _masked_mean(-loss, mask))
    return loss, metrics


@verl_losses.register_distillation_loss(verl_losses.DistillationLossSettings(names=[S.LOSS_TOPK], use_topk=True))
def gopd_topk_loss(config, distillation_config, model_output, data):
    """verl loss ``gopd_topk``: the per-token top-k G-OPD loss [B, R] computed in the actor's forward."""
    options = S.options_from_env()
    _check_worker(S.LOSS_TOPK, config, distillation_config, data, options)
    loss = no_padding_2_padding(model_output["distillation_losses"], data)
    mask = _mask(data)
    if "rollout_is_weights" in data:
        loss = loss * _response_padded(data["rollout_is_weights"], loss).detach()
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss, {"gopd/lam": options.lam}


def _response_rows(data, total: int) -> torch.Tensor:
    """[total] bool over the packed prompt + response rows: True where the row's logits predict a response
    token that counts (row j predicts token j + 1, the layout of ``no_padding_2_padding``)."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        prompt_lens, response_lens = prompts.offsets().diff(), responses.offsets().diff()
    else:
        attention = data["attention_mask"]
        prompt_lens = attention[:, : prompts.shape[1]].sum(1)
        response_lens = attention[:, prompts.shape[1]:].sum(1)
    mask = _mask(data)
    rows = torch.zeros(total, dtype=torch.bool, device=mask.device)
    start = 0
    for b, (p, r) in enumerate(zip(prompt_lens.tolist(), response_lens.tolist())):
        rows[start + p - 1: start + p - 1 + r] = mask[b, :r]
        start += p + r
    if start != total:
        raise ValueError(f"teacher top-k: {total} packed rows, but prompts + responses hold {start} tokens")
    return rows


def gopd_topk_rows(student_logits: torch.Tensor, data, distillation_config) -> dict:
    """The logits processor of ``gopd_topk``: {"distillation_losses": [1, N]} for student logits [1, N, V].

    Rows that predict no counted response token (prompt rows, the last row, sequence-parallel padding) get 0
    and are not read: their teacher rows hold placeholders."""
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

    options = S.options_from_env()
    if options.lam != 1.0:
        S.raise_problems(S.problems({}, options) or [f"{S.ENV_LAM}={options.lam}: gopd_topk needs lam = 1"],
                         "loss_mode=gopd_topk, in the actor's forward")
    ids, lps = data["teacher_ids"], data["teacher_logprobs"]
    ids = (ids.values() if ids.is_nested else ids.reshape(-1, ids.shape[-1])).unsqueeze(0)
    lps = (lps.values() if lps.is_nested else lps.reshape(-1, lps.shape[-1])).unsqueeze(0)
    input_ids = data["input_ids"]
    flat_ids = input_ids.values() if input_ids.is_nested else input_ids.reshape(-1)
    targets = torch.roll(flat_ids, shifts=-1, dims=0).unsqueeze(0)
    rows = _response_rows(data, ids.shape[1]).unsqueeze(0).to(torch.int32)
    if get_ulysses_sequence_parallel_world_size() > 1:  # this rank's slice of the sequence, as verl's top-k
        ids, lps, targets, rows = (slice_input_tensor(x, dim=1) for x in (ids, lps, targets, rows))
    rows = rows.bool()  # sequence-parallel padding rows are 0: not read
    if ids.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"teacher top-k rows {tuple(ids.shape[:2])} do not match the student's logits "
                         f"{tuple(student_logits.shape[:2])}")
    targets = torch.where(rows, targets, torch.full_like(targets, -100))
    out = gk.gopd_loss(student_logits[0], targets[0], lam=1.0, mode="topk", teacher_topk_ids=ids[0].long(),
                       teacher_topk_logprobs=lps[0], reduction="none")
    return {"distillation_losses": out.loss.unsqueeze(0)}


def install_topk_route() -> None:
    """Route verl's top-k loss computation to ``gopd_topk_rows`` for loss_mode=gopd_topk (others unchanged)."""
    original = verl_losses.compute_topk_loss
    if getattr(original, "_gopd_route", False):
        return

    def compute_topk_loss(config, distillation_config, data, student_logits, data_format):
        if distillation_config.distillation_loss.loss_mode == S.LOSS_TOPK:
            return gopd_topk_rows(student_logits, data, distillation_config)
        return original(config, distillation_config, data, student_logits, data_format)

    compute_topk_loss._gopd_route = True
    compute_topk_loss.__wrapped__ = original
    verl_losses.compute_topk_loss = compute_topk_loss
