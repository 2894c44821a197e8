"""Public ops: gopd_loss (on logits), fused_linear_gopd_loss and fused_linear_logprobs (on hidden states).

All three validate their inputs, pick a backend (``gopd_kernels.backends``), run its row kernels
through an autograd function (``gopd_kernels.autograd``) and apply the per-token objective
(``gopd_kernels.objective``). The math is documented in ``gopd_kernels.reference``.
"""

from __future__ import annotations

import math

import torch

from . import _validate as check
from . import backends
from . import topk as topk_mod
from ._output import GOPDOutput
from .autograd import FusedLinearLoss, FusedLinearRows, LogitRows, OnchipFusedLinearRows, RowConfig
from .backends import LP_S, ONCHIP
from .objective import full_loss_from_stats, stat_free_gradients, token_objective

# fp32 bytes of logits a fused-linear chunk may hold (all heads together); see default_chunk_size.
# CPU: every chunk re-reads each head's [V, D] weight (logit GEMM, dH, dW), so bigger chunks are faster
# (measured at V=49152, D=576, three heads: 512 rows beat 384 and 256); 320 MiB keeps the fused path's
# peak extra memory under a tenth of eager torch's at 2048 tokens.
_CPU_CHUNK_BYTES = 320 << 20
_GPU_CHUNK_BYTES = 2 << 30


def default_chunk_size(n_tokens: int, vocab: int, n_heads: int, device: torch.device) -> int:
    """Tokens per fused-linear chunk: as many as the fp32 logits of all heads fit in the budget (320 MiB
    on CPU, rounded down to a multiple of 64 rows; on CUDA min(2 GiB, a quarter of what the allocator can
    give), rounded down to a power of two), at most n_tokens.

    What the allocator can give is the device's free memory plus what torch's caching allocator holds
    but does not use (reserved - allocated): mem_get_info alone counts the cache as used, so a warm
    training process would get ever smaller chunks."""
    budget = _CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(_GPU_CHUNK_BYTES, (free + max(cached, 0)) // 4)
    rows = max(1, budget // max(1, 4 * vocab * n_heads))
    if device.type != "cuda" and rows >= 64:
        rows -= rows % 64
    else:
        rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, max(n_tokens, 1)))


def _common_checks(*, lam, mode, reduction, clip_eps, clip_eps_high, dual_clip, is_cap, num_items_in_batch,
                   temperature, old_logprobs, targets, lead, per_token_inputs, ignore_index):
    check.scalars(lam=lam, mode=mode, reduction=reduction, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                  dual_clip=dual_clip, is_cap=is_cap, num_items_in_batch=num_items_in_batch)
    check.optimizer_like_options(mode, old_logprobs)
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    for name, x in per_token_inputs.items():
        check.per_token(name, x, lead, targets)
    return check.temperatures(temperature)


def _flat(x, dtype):
    return None if x is None else x.reshape(-1).to(dtype)


def _finish(per_token, diagnostics, valid, lead, reduction, num_items_in_batch):
    if reduction == "none":
        loss = per_token.reshape(lead)
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / _denominator(valid, num_items_in_batch, per_token)
    return GOPDOutput(loss=loss, **{k: (None if v is None else v.reshape(lead)) for k, v in diagnostics.items()})


def _denominator(valid, num_items_in_batch, like):
    if num_items_in_batch is None:
        return valid.sum().clamp(min=1).to(like.dtype)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=like.device, dtype=like.dtype)
    return float(num_items_in_batch)


def gopd_loss(student_logits, targets, teacher_logits=None, ref_logits=None, *, teacher_logprobs=None,
              ref_logprobs=None, lam=1.0, mode="sampled", old_logprobs=None, rollout_logprobs=None,
              clip_eps=0.2, clip_eps_high=None, dual_clip=3.0, is_cap=5.0, temperature=1.0,
              ignore_index=-100, reduction="mean", num_items_in_batch=None, backend="auto",
              inplace_backward=False, teacher_topk_ids=None, teacher_topk_logprobs=None) -> GOPDOutput:
    """G-OPD loss on logits, fused over the vocabulary (no [N, V] intermediate in the fused backends).

    student_logits: [..., V], float16 / bfloat16 / float32 / float64.
    targets: [...] sampled token ids (int), ignore_index marks tokens that count for nothing.
    teacher_logits / ref_logits: [..., V'] with V' >= V (a padded vocabulary is cut to the student's V),
        any floating dtype; or, in mode="sampled" only, teacher_logprobs / ref_logprobs: [...].
    Dtypes: one rule for every op (gopd_kernels._validate.math_dtype): any mix is accepted; the math
        is fp32, or fp64 if any logits are fp64; nothing is rounded down. Logits of different dtypes
        are up-cast to their common one (an [N, V] copy) before the row kernel.
    lam: reward scale (1 = OPD, > 1 = ExOPD); lam != 1 needs a reference.
    mode: "sampled" (the paper's estimator: PPO-clip policy gradient with advantage
        lam (lp_t - lp_r) - (lp_s - lp_r)), "full" (sum_v p_s (log p_s - lam log p_t - (1-lam) log p_r)) or
        "topk" (full over k + 1 buckets: the teacher's top-k ids and the tail; gopd_kernels.topk).
    teacher_topk_ids / teacher_topk_logprobs: [..., k] (mode="topk" only, instead of teacher_logits): the
        teacher's k distinct ids and their log-probs, sorted descending (as a server returns them).
    old_logprobs: [...] log-probs of the policy that sampled (PPO ratio; default: on-policy, ratio = 1).
    rollout_logprobs: [...] the rollout engine's log-probs; the loss is weighted by
        min(exp(lp_old - lp_rollout), is_cap).
    temperature: a float, or a (student, teacher, reference) triple; log-probs are of logits / T.
    reduction: "mean" (over valid tokens, or / num_items_in_batch), "sum" or "none" (per token,
        differentiable with any upstream gradient).
    backend: "auto", "torch", "cpu", "cuda" or "triton".
    inplace_backward: let backward write the logit gradient into student_logits' storage (saves one
        [N, V] buffer; student_logits must not be used after backward).
    Returns a GOPDOutput: .loss plus detached per-token diagnostics (see GOPDOutput).
    """
    check.tensor("student_logits", student_logits)
    check.tensor("targets", targets, floating=False, ndim_min=0)
    lead = tuple(student_logits.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {lead} (student_logits' shape without the vocab dim), "
                         f"got {tuple(targets.shape)}")
    vocab = student_logits.shape[-1]
    if vocab == 0:
        raise ValueError("student_logits: the vocabulary dimension is empty")
    for name, z in (("teacher_logits", teacher_logits), ("ref_logits", ref_logits)):
        if z is None:
            continue
        check.tensor(name, z)
        if tuple(z.shape[:-1]) != lead:
            raise ValueError(f"{name}: expected leading shape {lead} like student_logits, got {tuple(z.shape[:-1])}")
        check.vocab(name, z.shape[-1], vocab)
    check.same_device("student_logits", student_logits, targets=targets, teacher_logits=teacher_logits,
                      ref_logits=ref_logits)
    topk_mod.check_args(mode, teacher_topk_ids, teacher_topk_logprobs, lead=lead, vocab=vocab, targets=targets,
                        ignore_index=ignore_index, others=dict(teacher_logits=teacher_logits,
                                                               teacher_logprobs=teacher_logprobs,
                                                               ref_logprobs=ref_logprobs, old_logprobs=old_logprobs))
    if mode == "topk":
        return _topk(student_logits.reshape(-1, vocab), None, None, None if ref_logits is None else
                     ref_logits.reshape(-1, ref_logits.shape[-1]), None, None, targets, teacher_topk_ids,
                     teacher_topk_logprobs, lead=lead, vocab=vocab, lam=lam, reduction=reduction, is_cap=is_cap,
                     temperature=temperature, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                     rollout_logprobs=rollout_logprobs, backend=backend, chunk=None,
                     dtype=check.math_dtype(student_logits, ref_logits))
    check.models(mode=mode, lam=lam, teacher=teacher_logits, teacher_logprobs=teacher_logprobs,
                 ref=ref_logits, ref_logprobs=ref_logprobs)
    temps = _common_checks(lam=lam, mode=mode, reduction=reduction, clip_eps=clip_eps,
                           clip_eps_high=clip_eps_high, dual_clip=dual_clip, is_cap=is_cap,
                           num_items_in_batch=num_items_in_batch, temperature=temperature,
                           old_logprobs=old_logprobs, targets=targets, lead=lead, ignore_index=ignore_index,
                           per_token_inputs=dict(teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs,
                                                 old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs))
    check.targets_in_range(targets, vocab, ignore_index)
    module = backends.get(backends.resolve(backend, student_logits.device))
    # The row kernels take the three logits in one dtype: a lower-precision one is up-cast to it (an
    # [N, V] copy; give all logits in one dtype to avoid it), never the other way round.
    common = check.common_dtype(student_logits, teacher_logits, ref_logits)

    def rows(z):
        if z is None:
            return None
        z2 = z.reshape(-1, z.shape[-1])[:, :vocab].to(common)
        return z2 if z2.stride(-1) == 1 else z2.contiguous()

    y = targets.reshape(-1).to(torch.int64).contiguous()
    cfg = RowConfig(module, lam, temps, ignore_index)
    lp_s, full, stats = LogitRows.apply(rows(student_logits), rows(teacher_logits), rows(ref_logits), y, cfg,
                                        bool(inplace_backward))
    valid = y != ignore_index
    dt = stats.dtype  # the objective runs in the statistics' precision (fp64 from the CPU backend)
    per_token, diagnostics = token_objective(
        lp_s, full, stats, valid, mode=mode, lam=float(lam), has_ref_logits=ref_logits is not None,
        teacher_logprobs=_flat(teacher_logprobs, dt), ref_logprobs=_flat(ref_logprobs, dt),
        old_logprobs=_flat(old_logprobs, dt), rollout_logprobs=_flat(rollout_logprobs, dt), clip_eps=clip_eps,
        clip_eps_high=clip_eps_high, dual_clip=dual_clip, is_cap=is_cap)
    out = _finish(per_token, diagnostics, valid, lead, reduction, num_items_in_batch)
    return _in_dtype(out, check.math_dtype(student_logits, teacher_logits, ref_logits))


def _in_dtype(out: GOPDOutput, dtype) -> GOPDOutput:
    # Field by field, not vars(out): torch 2.11's dynamo cannot trace a dataclass's __dict__ (fullgraph).
    def cast(t):
        return None if t is None else t.to(dtype)

    return GOPDOutput(loss=cast(out.loss), lp_s=cast(out.lp_s), lp_t=cast(out.lp_t), lp_r=cast(out.lp_r),
                      reward=cast(out.reward), kl=cast(out.kl), advantage=cast(out.advantage),
                      entropy=cast(out.entropy), is_weight=cast(out.is_weight))


def _check_head(prefix, hidden, weight, bias, lead):
    """Checks one (hidden, weight, bias) head; names in errors are f"{prefix}hidden" etc."""
    check.tensor(f"{prefix}hidden", hidden)
    check.tensor(f"{prefix}weight", weight, ndim_min=2)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight: expected [V, D], got shape {tuple(weight.shape)}")
    if tuple(hidden.shape[:-1]) != lead:
        raise ValueError(f"{prefix}hidden: expected leading shape {lead} (one row per target), "
                         f"got {tuple(hidden.shape[:-1])}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden: hidden size {hidden.shape[-1]} does not match "
                         f"{prefix}weight's [V, D] with D={weight.shape[1]}")
    if bias is not None:
        check.tensor(f"{prefix}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check.same_device(f"{prefix}hidden", hidden, **{f"{prefix}weight": weight, f"{prefix}bias": bias})


def _check_chunk(chunk_size):
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size!r}")


def fused_linear_gopd_loss(student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None,
                           ref_hidden=None, ref_weight=None, *, student_bias=None, teacher_bias=None,
                           ref_bias=None, teacher_logprobs=None, ref_logprobs=None, lam=1.0, mode="sampled",
                           old_logprobs=None, rollout_logprobs=None, clip_eps=0.2, clip_eps_high=None,
                           dual_clip=3.0, is_cap=5.0, temperature=1.0, ignore_index=-100, reduction="mean",
                           num_items_in_batch=None, backend="auto", chunk_size=None, teacher_topk_ids=None,
                           teacher_topk_logprobs=None, vocab_parallel_group=None) -> GOPDOutput:
    """G-OPD loss from final hidden states and LM-head weights; never holds [N, V] logits.

    student_hidden: [..., D_s] with student_weight [V, D_s] (student_bias [V]); teacher / reference
    likewise with their own hidden sizes and V' >= V (padding cut). Logits of each chunk of
    ``chunk_size`` tokens are computed in fp32, scored by the backend's row kernel and dropped:
    extra memory O(chunk x V). With reduction "mean" / "sum" the gradients (to student_hidden,
    student_weight, student_bias) are built chunk by chunk during forward, so backward does no
    GEMM recompute; with "none" each chunk is recomputed in backward. Other keywords as gopd_loss.
    Dtypes as gopd_loss (gopd_kernels._validate.math_dtype): hidden states, weights and biases may mix
    (bf16 hidden states from torch.autocast with an fp32 head, a bf16 teacher, ...); the logits are
    computed in fp32 (fp64 if any input is fp64) with autocast off, and each gradient comes back in
    its input's dtype.

    vocab_parallel_group: a torch.distributed process group over which every head's vocabulary is split
    (gopd_kernels/vocab_parallel.py): each weight (and bias) is this rank's contiguous slice of rows, in
    rank order, the same rows for the three heads; hidden states and targets (global ids) are the same on
    every rank. Every rank gets the same loss and diagnostics, the full student_hidden gradient and the
    gradient of its own weight slice. Every rank must make the call.

    backend="triton_onchip" (CUDA, or CPU tensors under TRITON_INTERPRET=1): the kernels of
    gopd_kernels/triton/onchip.py, which keep the logit tiles on chip instead of writing each chunk's logits
    (chunk_size is then unused); modes "full" and "sampled", no biases, no vocab_parallel_group, not
    under torch.compile. Never chosen by "auto": not measured on a GPU yet.
    """
    check.tensor("targets", targets, floating=False, ndim_min=0)
    lead = tuple(targets.shape)
    _check_head("student_", student_hidden, student_weight, student_bias, lead)
    vocab = student_weight.shape[0]
    for prefix, h, w, b in (("teacher", teacher_hidden, teacher_weight, teacher_bias),
                            ("ref", ref_hidden, ref_weight, ref_bias)):
        if (h is None) != (w is None):
            raise ValueError(f"{prefix}_hidden and {prefix}_weight go together: give both or neither")
        if h is not None:
            _check_head(f"{prefix}_", h, w, b, lead)
            check.vocab(f"{prefix}_weight", w.shape[0], vocab)
            check.same_device("student_hidden", student_hidden, **{f"{prefix}_hidden": h})
    check.same_device("student_hidden", student_hidden, targets=targets)
    topk_mod.check_args(mode, teacher_topk_ids, teacher_topk_logprobs, lead=lead, vocab=vocab, targets=targets,
                        ignore_index=ignore_index, others=dict(teacher_hidden=teacher_hidden,
                                                               teacher_logprobs=teacher_logprobs,
                                                               ref_logprobs=ref_logprobs, old_logprobs=old_logprobs))
    onchip = backend == ONCHIP
    if onchip:
        _check_onchip(mode, vocab_parallel_group, student_bias=student_bias, teacher_bias=teacher_bias,
                      ref_bias=ref_bias)
    if mode == "topk":
        if vocab_parallel_group is not None:
            raise ValueError("vocab_parallel_group: not supported with mode='topk' yet; use mode='full' or "
                             "'sampled' with a split vocabulary")
        _check_chunk(chunk_size)
        flat = (lambda h: None if h is None else h.reshape(-1, h.shape[-1]))
        return _topk(flat(student_hidden), student_weight, student_bias, flat(ref_hidden), ref_weight, ref_bias,
                     targets, teacher_topk_ids, teacher_topk_logprobs, lead=lead, vocab=vocab, lam=lam,
                     reduction=reduction, is_cap=is_cap, temperature=temperature, ignore_index=ignore_index,
                     num_items_in_batch=num_items_in_batch, rollout_logprobs=rollout_logprobs, backend=backend,
                     chunk=chunk_size, dtype=check.math_dtype(student_hidden, student_weight, student_bias,
                                                              ref_hidden, ref_weight, ref_bias))
    check.models(mode=mode, lam=lam, teacher=teacher_hidden, teacher_logprobs=teacher_logprobs, ref=ref_hidden,
                 ref_logprobs=ref_logprobs, teacher_word="teacher_hidden/teacher_weight",
                 ref_word="ref_hidden/ref_weight")
    temps = _common_checks(lam=lam, mode=mode, reduction=reduction, clip_eps=clip_eps,
                           clip_eps_high=clip_eps_high, dual_clip=dual_clip, is_cap=is_cap,
                           num_items_in_batch=num_items_in_batch, temperature=temperature,
                           old_logprobs=old_logprobs, targets=targets, lead=lead, ignore_index=ignore_index,
                           per_token_inputs=dict(teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs,
                                                 old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs))
    _check_chunk(chunk_size)
    module = backends.get(backends.resolve("triton" if onchip else backend, student_hidden.device))
    if onchip:
        _onchip_devices(student_hidden=student_hidden, student_weight=student_weight, targets=targets,
                        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, ref_hidden=ref_hidden,
                        ref_weight=ref_weight)
    cfg, global_vocab = _row_config(module, lam, temps, ignore_index, vocab, student_hidden.device,
                                    vocab_parallel_group, [w for w in (teacher_weight, ref_weight) if w is not None])
    check.targets_in_range(targets, global_vocab, ignore_index)

    def flat(h):
        return None if h is None else h.reshape(-1, h.shape[-1])

    y = targets.reshape(-1).to(torch.int64).contiguous()
    n = y.shape[0]
    n_heads = 1 + (teacher_hidden is not None) + (ref_hidden is not None)
    chunk = chunk_size or default_chunk_size(n, vocab, n_heads, student_hidden.device)
    valid = y != ignore_index
    dt = check.math_dtype(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                          teacher_bias, ref_hidden, ref_weight, ref_bias)
    extras = dict(teacher_logprobs=_flat(teacher_logprobs, dt), ref_logprobs=_flat(ref_logprobs, dt),
                  old_logprobs=_flat(old_logprobs, dt), rollout_logprobs=_flat(rollout_logprobs, dt))
    options = dict(mode=mode, lam=float(lam), has_ref_logits=ref_hidden is not None, clip_eps=clip_eps,
                   clip_eps_high=clip_eps_high, dual_clip=dual_clip, is_cap=is_cap)
    heads = (flat(student_hidden), student_weight, student_bias, flat(teacher_hidden), teacher_weight,
             teacher_bias, flat(ref_hidden), ref_weight, ref_bias)

    if reduction != "none" and not check.compiling() and not onchip:
        # Gradient in forward: the objective is row-local, so each chunk's per-token gradients are
        # known once its statistics are; backward only scales by the upstream scalar. Not under
        # torch.compile: the hand-over of a gradient computed in forward (and the autograd.grad that
        # builds it) cannot be traced, so a compiled graph takes the per-token path below, which
        # recomputes each chunk's logits in backward, and reduces.
        if reduction == "mean":
            # A 0-dim tensor on the device, not a Python float: reading it would synchronise every call.
            scale = 1.0 / _denominator(valid, num_items_in_batch, torch.zeros((), dtype=dt, device=y.device))
        else:
            scale = 1.0

        def objective(lp_s, full, stats_c, rows):
            sliced = {k: (None if v is None else v[rows]) for k, v in extras.items()}
            per_token, _ = token_objective(lp_s, full, stats_c, valid[rows], **options, **sliced)
            return per_token

        known = None
        if cfg.has_forward_backward:  # a backend that can use gradients known before the forward
            known = stat_free_gradients(valid, mode=mode, old_logprobs=extras["old_logprobs"],
                                        rollout_logprobs=extras["rollout_logprobs"], is_cap=is_cap, scale=scale)
        loss, stats = FusedLinearLoss.apply(*heads, y, cfg, vocab, chunk, objective, scale, known)
        with torch.no_grad():
            _, diagnostics = token_objective(stats[LP_S], full_loss_from_stats(stats, cfg.lam), stats, valid,
                                             **options, **extras)
        return GOPDOutput(loss=loss.to(dt), **{k: (None if v is None else v.reshape(lead).to(dt))
                                              for k, v in diagnostics.items()})

    if onchip:
        lp_s, full, stats = OnchipFusedLinearRows.apply(*heads[0:2], *heads[3:5], *heads[6:8], y, cfg, vocab)
    else:
        lp_s, full, stats = FusedLinearRows.apply(*heads, y, cfg, vocab, chunk)
    per_token, diagnostics = token_objective(lp_s, full, stats, valid, **options, **extras)
    return _in_dtype(_finish(per_token, diagnostics, valid, lead, reduction, num_items_in_batch), dt)


def _check_onchip(mode, group, **biases):
    """What backend="triton_onchip" does not take, each named in its error."""
    if mode not in ("full", "sampled"):
        raise ValueError(f"mode: backend={ONCHIP!r} supports mode='full' and 'sampled', got {mode!r}; use "
                         "backend='triton' for mode='topk'")
    if group is not None:
        raise ValueError(f"vocab_parallel_group: not supported with backend={ONCHIP!r}; use backend='triton'")
    for name, b in biases.items():
        if b is not None:
            raise ValueError(f"{name}: backend={ONCHIP!r} takes no LM-head bias yet; use backend='triton'")
    if check.compiling():
        raise RuntimeError(f"backend={ONCHIP!r} cannot be traced by torch.compile yet (its kernels are not "
                           "custom ops); use backend='triton' in a compiled graph")


def _onchip_devices(**tensors):
    from .backends import triton as triton_backend

    triton_backend._check_device(**tensors)


def _row_config(module, lam, temps, ignore_index, vocab, device, group, other_weights):
    """(RowConfig, global vocabulary size): a plain one, or a vocab-parallel one over `group`."""
    if group is None:
        return RowConfig(module, lam, temps, ignore_index), vocab
    from . import vocab_parallel

    vocab_parallel.check_group(group)
    for w in other_weights:
        if w.shape[0] != vocab:
            raise ValueError(f"vocab_parallel_group: every head's weight must hold this rank's slice of the same "
                             f"vocabulary rows; the student's has {vocab} rows and another head's {w.shape[0]} "
                             "(padded vocabularies are not supported with a split vocabulary)")
    start, global_vocab = vocab_parallel.shard_layout(group, vocab, device)
    cfg = vocab_parallel.VocabParallelRowConfig(module, lam, temps, ignore_index, group, start, vocab)
    return cfg, global_vocab


def _topk(s_h, s_w, s_b, r_h, r_w, r_b, targets, ids, lps, *, lead, vocab, lam, reduction, is_cap, temperature,
          ignore_index, num_items_in_batch, rollout_logprobs, backend, chunk, dtype) -> GOPDOutput:
    """mode="topk" for both ops (s_w None: s_h / r_h are logits). The same chunked torch code on every
    backend (gather / scatter over [chunk, V] buffers; gopd_kernels.topk); the backend name is still checked."""
    if float(lam) != 1.0 and r_h is None:
        raise ValueError(f"lam={lam} needs a reference model: pass ref_logits / ref_hidden + ref_weight; only "
                         "lam=1 (plain OPD) is independent of the reference")
    temps = _common_checks(lam=lam, mode="topk", reduction=reduction, clip_eps=0.2, clip_eps_high=None,
                           dual_clip=None, is_cap=is_cap, num_items_in_batch=num_items_in_batch,
                           temperature=temperature, old_logprobs=None, targets=targets, lead=lead,
                           ignore_index=ignore_index, per_token_inputs=dict(rollout_logprobs=rollout_logprobs))
    check.targets_in_range(targets, vocab, ignore_index)
    check.same_device("targets", targets, student=s_h, reference=r_h)
    backends.resolve(backend, s_h.device)
    n = targets.numel()
    chunk = chunk or default_chunk_size(n, vocab, 1 + (r_h is not None), s_h.device)
    per_token, diags = topk_mod.topk_loss((s_h, s_w, s_b), (r_h, r_w, r_b), ids, lps, targets, lam=lam, temps=temps,
                                          ignore_index=ignore_index, rollout_logprobs=rollout_logprobs,
                                          is_cap=is_cap, dtype=dtype, vocab=vocab, chunk=max(1, chunk))
    valid = targets.reshape(-1) != ignore_index
    return _finish(per_token, diags, valid, lead, reduction, num_items_in_batch)


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, *, bias=None, ignore_index=-100,
                          backend="auto", chunk_size=None, vocab_parallel_group=None) -> torch.Tensor:
    """log softmax(hidden @ weight.T (+ bias) / temperature)[target] per token, without [N, V] logits.

    hidden: [..., D], weight: [V, D], targets: [...]; returns [...] in the math dtype (fp32, or fp64 if
    any input is fp64; dtypes may mix, see gopd_loss),
    0 at masked tokens, differentiable w.r.t. hidden, weight and bias (used for teacher / reference
    scoring and for the policy's own log-probs). vocab_parallel_group: as fused_linear_gopd_loss.
    """
    check.tensor("targets", targets, floating=False, ndim_min=0)
    lead = tuple(targets.shape)
    _check_head("", hidden, weight, bias, lead)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    _check_chunk(chunk_size)
    vocab = weight.shape[0]
    check.same_device("hidden", hidden, targets=targets)
    onchip = backend == ONCHIP
    if onchip:
        _check_onchip("full", vocab_parallel_group, bias=bias)
    module = backends.get(backends.resolve("triton" if onchip else backend, hidden.device))
    if onchip:
        _onchip_devices(hidden=hidden, weight=weight, targets=targets)
    cfg, global_vocab = _row_config(module, 1.0, (float(temperature),) * 3, ignore_index, vocab, hidden.device,
                                    vocab_parallel_group, [])
    check.targets_in_range(targets, global_vocab, ignore_index)
    y = targets.reshape(-1).to(torch.int64).contiguous()
    chunk = chunk_size or default_chunk_size(y.shape[0], vocab, 1, hidden.device)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if onchip:
        lp, _full, _stats = OnchipFusedLinearRows.apply(h2, weight, None, None, None, None, y, cfg, vocab)
    else:
        lp, _full, _stats = FusedLinearRows.apply(h2, weight, bias, None, None, None, None, None, None, y, cfg,
                                                  vocab, chunk)
    return lp.reshape(lead).to(check.math_dtype(hidden, weight, bias))
