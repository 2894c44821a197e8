"""Public ops: gopd_loss (on logits), fused_linear_gopd_loss and fused_linear_logprobs (on hidden states).

All three validate their inputs, pick a backend (``gopd_kernels.backends``), run its row kernels
through an autograd function (``gopd_kernels.autograd``) and apply the per-token objective
(``gopd_kernels.objective``). The math is documented in ``gopd_kernels.reference``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from . import _validate as check
from . import backends, topk, tuning
from ._layout import LP_S
from ._options import IMPLS, Options
from ._output import GOPDOutput
from .autograd import FusedLinearLoss, FusedLinearRows, LogitRows, OnchipFusedLinearRows, RowConfig
from .objective import (
    Rows,
    TokenInputs,
    full_loss_from_stats,
    reduce,
    stat_free_gradients,
    token_objective,
    token_scale,
)

# The former spelling of backend="triton", impl="onchip" (still accepted, with a DeprecationWarning).
ONCHIP_BACKEND = "triton_onchip"

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


# ---------------------------------------------------------------------------------------------------------
# Docstring of the options every loss op shares (appended to gopd_loss / fused_linear_gopd_loss's own).
_OPTIONS_DOC = """
    lam: reward scale (1 = OPD, > 1 = ExOPD); lam != 1 needs a reference.
    mode: one of gopd_kernels.MODES: "sampled" (the paper's estimator: PPO-clip policy gradient with
        advantage lam (lp_t - lp_r) - (lp_s - lp_r)), "full" (sum_v p_s (log p_s - lam log p_t - (1-lam)
        log p_r)) or "topk" (full over k + 1 buckets: the teacher's top-k ids and the tail; gopd_kernels.topk).
    teacher_topk_ids / teacher_topk_logprobs: [..., k] (mode="topk" only, instead of the teacher's logits
        or head): the teacher's k distinct ids and their log-probs, sorted descending (as a server returns them).
    old_logprobs: [...] log-probs of the policy that sampled (PPO ratio; default: on-policy, ratio = 1).
    advantage_from: "current" (A uses the student's current lp_s, detached) or "old" (A = lam lp_t +
        (1 - lam) lp_r - old_logprobs, as the paper authors' verl code computes it; needs old_logprobs).
        The same on-policy. mode="sampled" only.
    rollout_logprobs: [...] the rollout engine's log-probs; the loss is weighted by
        min(exp(lp_old - lp_rollout), is_cap).
    temperature: a float, or a (student, teacher, reference) triple; log-probs are of logits / T.
    reduction: one of gopd_kernels.REDUCTIONS. "mean": sum / D over valid tokens, D = num_items_in_batch
        (the global number of valid tokens, for gradient accumulation) or the local count; "sum"; "none"
        (per token, differentiable with any upstream gradient); "seq-mean-token-mean": each sequence's
        token mean, summed over sequences and divided by S; "seq-mean-token-sum": each sequence's token
        sum, summed and divided by S (verl's loss_agg_mode names). Sequences are the leading dims of
        targets ([B, T] or [..., T]: targets.reshape(-1, T) has one row per sequence). S =
        num_sequences_in_batch: the number of sequences, with at least one valid token, in the global batch
        (every micro-batch and rank whose losses are summed), or by default those of this call.
"""


def _flat64(x):
    return None if x is None else x.reshape(-1).to(torch.float64)


def _token_inputs(opts: Options, targets, lead, vocab, *, teacher, ref, teacher_name, words, teacher_logprobs,
                  ref_logprobs, old_logprobs, rollout_logprobs, teacher_topk_ids, teacher_topk_logprobs):
    """Checks which models and per-token inputs a call has, for its mode; returns (flat int64 targets,
    their valid mask, the top-k ids [N, k] (k = 0 outside mode="topk"), TokenInputs)."""
    topk.check_args(opts.mode, teacher_topk_ids, teacher_topk_logprobs, lead=lead, vocab=vocab, targets=targets,
                    ignore_index=opts.ignore_index, others={teacher_name: teacher, "teacher_logprobs":
                                                            teacher_logprobs, "ref_logprobs": ref_logprobs,
                                                            "old_logprobs": old_logprobs})
    if opts.mode == "topk":
        if opts.lam != 1.0 and ref is None:
            raise ValueError(f"lam={opts.lam} needs a reference model: pass {words[1]}; only lam=1 (plain OPD) is "
                             "independent of the reference")
    else:
        check.models(mode=opts.mode, lam=opts.lam, teacher=teacher, teacher_logprobs=teacher_logprobs, ref=ref,
                     ref_logprobs=ref_logprobs, teacher_word=words[0], ref_word=words[1])
    check.policy_logprobs(opts.mode, opts.advantage_from, old_logprobs)
    for name, x in (("teacher_logprobs", teacher_logprobs), ("ref_logprobs", ref_logprobs),
                    ("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs)):
        check.per_token(name, x, lead, targets)
    check.sequences(opts.reduction, targets)
    y = targets.reshape(-1).to(torch.int64).contiguous()
    valid = y != opts.ignore_index
    if opts.mode == "topk":
        ids, lpk_t = topk.prepare(teacher_topk_ids, teacher_topk_logprobs, valid, vocab)
    else:
        ids, lpk_t = torch.zeros((y.shape[0], 0), dtype=torch.int64, device=y.device), None
    inputs = TokenInputs(has_ref=ref is not None, teacher_logprobs=_flat64(teacher_logprobs),
                         ref_logprobs=_flat64(ref_logprobs), old_logprobs=_flat64(old_logprobs),
                         rollout_logprobs=_flat64(rollout_logprobs), topk_logprobs=lpk_t)
    return y, valid, ids, inputs


def _result(loss, diagnostics, lead, dtype) -> GOPDOutput:
    """The GOPDOutput in the math dtype, diagnostics in the targets' shape."""
    # Field by field, not vars() / **: torch 2.11's dynamo cannot trace a dataclass's __dict__ (fullgraph).
    def cast(t):
        return None if t is None else t.reshape(lead).to(dtype)

    d = diagnostics
    return GOPDOutput(loss=loss.to(dtype), lp_s=cast(d["lp_s"]), lp_t=cast(d["lp_t"]), lp_r=cast(d["lp_r"]),
                      reward=cast(d["reward"]), kl=cast(d["kl"]), advantage=cast(d["advantage"]),
                      entropy=cast(d["entropy"]), is_weight=cast(d["is_weight"]))


def _output(rows: Rows, valid, lead, opts: Options, inputs: TokenInputs, dtype) -> GOPDOutput:
    per_token, diagnostics = token_objective(rows, valid, opts, inputs)
    return _result(reduce(per_token, valid, lead, opts), diagnostics, lead, dtype)


# ---------------------------------------------------------------------------------------------- on logits
def _check_logits(student_logits, targets, teacher_logits, ref_logits):
    """(leading shape, V) of a gopd_loss call."""
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
    return lead, vocab


def _logit_rows(z, vocab, dtype):
    """[N, V] rows of logits for a row kernel: a column slice of a padded vocabulary (no copy) in the call's
    common dtype (a lower-precision one is up-cast: an [N, V] copy; give all logits in one dtype to avoid it)."""
    if z is None:
        return None
    z2 = z.reshape(-1, z.shape[-1])[:, :vocab].to(dtype)
    return z2 if z2.stride(-1) == 1 else z2.contiguous()


def gopd_loss(student_logits, targets, teacher_logits=None, ref_logits=None, *, teacher_logprobs=None,
              ref_logprobs=None, lam=1.0, mode="sampled", old_logprobs=None, rollout_logprobs=None,
              clip_eps=0.2, clip_eps_high=None, dual_clip=3.0, is_cap=5.0, temperature=1.0,
              ignore_index=-100, reduction="mean", num_items_in_batch=None, backend="auto",
              inplace_backward=False, teacher_topk_ids=None, teacher_topk_logprobs=None, advantage_from="current",
              num_sequences_in_batch=None) -> GOPDOutput:
    opts = check.options(mode=mode, lam=lam, reduction=reduction, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                         dual_clip=dual_clip, is_cap=is_cap, temperature=temperature, ignore_index=ignore_index,
                         num_items_in_batch=num_items_in_batch, num_sequences_in_batch=num_sequences_in_batch,
                         advantage_from=advantage_from)
    lead, vocab = _check_logits(student_logits, targets, teacher_logits, ref_logits)
    if backend == ONCHIP_BACKEND:
        raise ValueError(f"backend={ONCHIP_BACKEND!r} is a fused-linear kernel: it works with fused_linear_gopd_loss "
                         f"and fused_linear_logprobs only (as impl='onchip'); on logits use one of {backends.BACKENDS}")
    y, valid, ids, inputs = _token_inputs(
        opts, targets, lead, vocab, teacher=teacher_logits, ref=ref_logits, teacher_name="teacher_logits",
        words=("teacher_logits", "ref_logits"), teacher_logprobs=teacher_logprobs, ref_logprobs=ref_logprobs,
        old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs, teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs)
    check.targets_in_range(targets, vocab, opts.ignore_index)
    cfg = RowConfig.from_options(backends.resolve(backend, student_logits.device), opts)
    common = check.common_dtype(student_logits, teacher_logits, ref_logits)
    rows = LogitRows.apply(_logit_rows(student_logits, vocab, common), _logit_rows(teacher_logits, vocab, common),
                           _logit_rows(ref_logits, vocab, common), y, ids, cfg, bool(inplace_backward))
    return _output(Rows(*rows), valid, lead, opts, inputs, check.math_dtype(student_logits, teacher_logits,
                                                                            ref_logits))


gopd_loss.__doc__ = """G-OPD loss on logits, fused over the vocabulary (no [N, V] intermediate in the fused backends).

    student_logits: [..., V], float16 / bfloat16 / float32 / float64.
    targets: [...] sampled token ids (int), ignore_index marks tokens that count for nothing.
    teacher_logits / ref_logits: [..., V'] with V' >= V (a padded vocabulary is cut to the student's V),
        any floating dtype; or, in mode="sampled" only, teacher_logprobs / ref_logprobs: [...].
    Dtypes: one rule for every op (gopd_kernels._validate.math_dtype): any mix is accepted; the math
        is fp32, or fp64 if any logits are fp64; nothing is rounded down. Logits of different dtypes
        are up-cast to their common one (an [N, V] copy) before the row kernel.""" + _OPTIONS_DOC + """\
    backend: "auto" or one of gopd_kernels.backends.BACKENDS ("torch", "cpu", "cuda", "triton").
    inplace_backward: let backward write the logit gradient into student_logits' storage (saves one
        [N, V] buffer; student_logits must not be used after backward).
    Returns a GOPDOutput: .loss plus detached per-token diagnostics (see GOPDOutput).
    """


# ---------------------------------------------------------------------------------------- on hidden states
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


def _check_heads(targets, student, teacher, ref):
    """(leading shape, V) of a fused_linear_gopd_loss call; each head is (hidden, weight, bias)."""
    check.tensor("targets", targets, floating=False, ndim_min=0)
    lead = tuple(targets.shape)
    _check_head("student_", *student, lead)
    vocab = student[1].shape[0]
    for prefix, (h, w, b) in (("teacher", teacher), ("ref", ref)):
        if (h is None) != (w is None):
            raise ValueError(f"{prefix}_hidden and {prefix}_weight go together: give both or neither")
        if h is not None:
            _check_head(f"{prefix}_", h, w, b, lead)
            check.vocab(f"{prefix}_weight", w.shape[0], vocab)
            check.same_device("student_hidden", student[0], **{f"{prefix}_hidden": h})
    check.same_device("student_hidden", student[0], targets=targets)
    return lead, vocab


def _check_chunk(chunk_size):
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size!r}")


def _backend_and_impl(backend, impl):
    """(backend, impl) of a fused-linear call: backend="triton_onchip" is the deprecated spelling of
    backend="triton", impl="onchip"; impl="onchip" runs on Triton only."""
    if backend == ONCHIP_BACKEND:
        warnings.warn(f"backend={ONCHIP_BACKEND!r} is deprecated: use backend='triton', impl='onchip'",
                      DeprecationWarning, stacklevel=3)
        return "triton", "onchip"
    if impl == "onchip":
        if backend not in ("auto", "triton"):
            raise ValueError(f"impl='onchip': the on-chip kernels are Triton's; use backend='triton' (or 'auto'), "
                             f"got backend={backend!r}")
        return "triton", impl
    return backend, impl


def _check_onchip(mode, group, **biases):
    """What impl="onchip" does not take, each named in its error."""
    if mode not in ("full", "sampled"):
        raise ValueError(f"mode: impl='onchip' supports mode='full' and 'sampled', got {mode!r}; use "
                         "impl='chunked' for mode='topk'")
    if group is not None:
        raise ValueError("vocab_parallel_group: not supported with impl='onchip'; use impl='chunked'")
    for name, b in biases.items():
        if b is not None:
            raise ValueError(f"{name}: impl='onchip' takes no LM-head bias yet; use impl='chunked'")
    if check.compiling():
        raise RuntimeError("impl='onchip' cannot be traced by torch.compile yet (its kernels are not custom ops); "
                           "use impl='chunked' in a compiled graph")


def _auto_impl(impl, backend, device, dtype, models, n, mode, group, biases, needs_grad) -> str:
    """impl="auto": "onchip" only where the device's tuning table measured it faster for this use
    ("score" without gradients, else "train_<mode>") and shape class, and the call is one it takes."""
    if impl != "auto":
        return impl
    if (backend != "triton" or mode not in ("full", "sampled") or group is not None
            or any(b is not None for b in biases) or check.compiling()):
        return "chunked"
    return tuning.fused_impl(device, dtype, models, n, f"train_{mode}" if needs_grad else "score")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onchip_devices(**tensors):
    from .backends import triton as triton_backend

    triton_backend._check_device(**tensors)


def _row_config(name, lam, temps, ignore_index, vocab, device, group, other_weights):
    """(RowConfig, global vocabulary size): a plain one, or a vocab-parallel one over `group`."""
    if group is None:
        return RowConfig(name, lam, temps, ignore_index), vocab
    from . import vocab_parallel

    vocab_parallel.check_group(group)
    for w in other_weights:
        if w.shape[0] != vocab:
            raise ValueError(f"vocab_parallel_group: every head's weight must hold this rank's slice of the same "
                             f"vocabulary rows; the student's has {vocab} rows and another head's {w.shape[0]} "
                             "(padded vocabularies are not supported with a split vocabulary)")
    start, global_vocab = vocab_parallel.shard_layout(group, vocab, device)
    cfg = vocab_parallel.VocabParallelRowConfig(name, lam, temps, ignore_index, group, start, vocab)
    return cfg, global_vocab


def _flat_heads(*heads):
    """(hidden [N, D], weight, bias) of each head, flattened, in one tuple of 9."""
    out = ()
    for h, w, b in heads:
        out += (None if h is None else h.reshape(-1, h.shape[-1]), w, b)
    return out


def _loss_in_forward(heads, y, valid, ids, cfg, vocab, chunk, lead, opts, inputs, dtype) -> GOPDOutput:
    """A scalar reduction's loss with its gradient built in forward: the objective is row-local, so each
    chunk's per-token gradients are known once its statistics are; backward only scales by the upstream
    scalar. Not under torch.compile: the hand-over of a gradient computed in forward (and the autograd.grad
    that builds it) cannot be traced, so a compiled graph takes the per-token path, which recomputes each
    chunk's logits in backward, and reduces."""
    # A tensor on the device, not a Python float: reading a count would synchronise every call.
    scale = token_scale(valid, lead, opts)

    def objective(rows, sl):
        per_token, _ = token_objective(rows, valid[sl], opts, inputs.rows(sl))
        return per_token * (scale if scale.dim() == 0 else scale[sl])

    known = stat_free_gradients(valid, opts, inputs, scale) if cfg.has_forward_backward else None
    loss, stats, lpk_s, lpk_r = FusedLinearLoss.apply(*heads, y, ids, cfg, vocab, chunk, objective, known)
    with torch.no_grad():
        _, diagnostics = token_objective(Rows(stats[LP_S], full_loss_from_stats(stats, cfg.lam), stats, lpk_s, lpk_r),
                                         valid, opts, inputs)
    return _result(loss, diagnostics, lead, dtype)


def fused_linear_gopd_loss(student_hidden, student_weight, targets, teacher_hidden=None, teacher_weight=None,
                           ref_hidden=None, ref_weight=None, *, student_bias=None, teacher_bias=None,
                           ref_bias=None, teacher_logprobs=None, ref_logprobs=None, lam=1.0, mode="sampled",
                           old_logprobs=None, rollout_logprobs=None, clip_eps=0.2, clip_eps_high=None,
                           dual_clip=3.0, is_cap=5.0, temperature=1.0, ignore_index=-100, reduction="mean",
                           num_items_in_batch=None, backend="auto", chunk_size=None, teacher_topk_ids=None,
                           teacher_topk_logprobs=None, vocab_parallel_group=None, advantage_from="current",
                           num_sequences_in_batch=None, impl="auto") -> GOPDOutput:
    backend, impl = _backend_and_impl(backend, impl)
    opts = check.options(mode=mode, lam=lam, reduction=reduction, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                         dual_clip=dual_clip, is_cap=is_cap, temperature=temperature, ignore_index=ignore_index,
                         num_items_in_batch=num_items_in_batch, num_sequences_in_batch=num_sequences_in_batch,
                         advantage_from=advantage_from, impl=impl)
    student = (student_hidden, student_weight, student_bias)
    teacher, ref = (teacher_hidden, teacher_weight, teacher_bias), (ref_hidden, ref_weight, ref_bias)
    lead, vocab = _check_heads(targets, student, teacher, ref)
    _check_chunk(chunk_size)
    y, valid, ids, inputs = _token_inputs(
        opts, targets, lead, vocab, teacher=teacher_hidden, ref=ref_hidden, teacher_name="teacher_hidden",
        words=("teacher_hidden/teacher_weight", "ref_hidden/ref_weight"), teacher_logprobs=teacher_logprobs,
        ref_logprobs=ref_logprobs, old_logprobs=old_logprobs, rollout_logprobs=rollout_logprobs,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs)
    if opts.mode == "topk" and vocab_parallel_group is not None:
        raise ValueError("vocab_parallel_group: not supported with mode='topk' yet; use mode='full' or "
                         "'sampled' with a split vocabulary")
    name = backends.resolve(backend, student_hidden.device)
    biases = (student_bias, teacher_bias, ref_bias)
    opts = dataclasses.replace(opts, impl=_auto_impl(
        opts.impl, name, student_hidden.device, student_hidden.dtype,
        sum(h is not None for h in (student_hidden, teacher_hidden, ref_hidden)), targets.numel(), opts.mode,
        vocab_parallel_group, biases, _needs_grad(student_hidden, student_weight, student_bias)))
    if opts.impl == "onchip":
        _check_onchip(opts.mode, vocab_parallel_group, student_bias=student_bias, teacher_bias=teacher_bias,
                      ref_bias=ref_bias)
        _onchip_devices(student_hidden=student_hidden, student_weight=student_weight, targets=targets,
                        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, ref_hidden=ref_hidden,
                        ref_weight=ref_weight)
    cfg, global_vocab = _row_config(name, opts.lam, opts.temps, opts.ignore_index, vocab, student_hidden.device,
                                    vocab_parallel_group, [w for w in (teacher_weight, ref_weight) if w is not None])
    check.targets_in_range(targets, global_vocab, opts.ignore_index)
    heads = _flat_heads(student, teacher, ref)
    dtype = check.math_dtype(*heads)
    if opts.impl == "onchip":
        lp_s, full, stats = OnchipFusedLinearRows.apply(*heads[0:2], *heads[3:5], *heads[6:8], y, cfg, vocab)
        none = stats.new_zeros((y.shape[0], 0))  # no top-k ids: impl="onchip" refuses mode="topk"
        return _output(Rows(lp_s, full, stats, none, none), valid, lead, opts, inputs, dtype)
    n_heads = sum(h[0] is not None for h in (student, teacher, ref))
    chunk = chunk_size or default_chunk_size(y.shape[0], vocab, n_heads, student_hidden.device)
    if opts.reduction != "none" and not check.compiling():
        return _loss_in_forward(heads, y, valid, ids, cfg, vocab, chunk, lead, opts, inputs, dtype)
    rows = FusedLinearRows.apply(*heads, y, ids, cfg, vocab, chunk)
    return _output(Rows(*rows), valid, lead, opts, inputs, dtype)


fused_linear_gopd_loss.__doc__ = """G-OPD loss from final hidden states and LM-head weights; never holds [N, V] logits.

    student_hidden: [..., D_s] with student_weight [V, D_s] (student_bias [V]); teacher / reference
    likewise with their own hidden sizes and V' >= V (padding cut). targets: [...].
    Dtypes as gopd_loss (gopd_kernels._validate.math_dtype): hidden states, weights and biases may mix
    (bf16 hidden states from torch.autocast with an fp32 head, a bf16 teacher, ...); the logits are
    computed in fp32 (fp64 if any input is fp64) with autocast off, and each gradient comes back in
    its input's dtype.""" + _OPTIONS_DOC + """\
    backend: as gopd_loss.
    impl: one of gopd_kernels.IMPLS. "auto" (default): "chunked", or "onchip" where this device's tuning table
        (gopd_kernels/tuning.json, written by make gpu-check) measured it faster for this use and shape class
        and the call is one it takes. "chunked": the logits of each chunk of ``chunk_size`` tokens are
        computed in fp32, scored by the backend's row kernel and dropped: extra memory O(chunk x V). With a
        scalar reduction the gradients (to student_hidden, student_weight, student_bias) are built chunk by
        chunk during forward, so backward does no GEMM recompute; with "none" each chunk is recomputed in
        backward. "onchip" (backend "triton": CUDA, or CPU tensors under TRITON_INTERPRET=1): the kernels
        of gopd_kernels/triton/onchip.py, which keep the logit tiles on chip instead of writing each chunk's
        logits (chunk_size is then unused); modes "full" and "sampled", no biases, no vocab_parallel_group,
        not under torch.compile. backend="triton_onchip" still means it, with a DeprecationWarning.
    vocab_parallel_group: a torch.distributed process group over which every head's vocabulary is split
        (gopd_kernels/vocab_parallel.py): each weight (and bias) is this rank's contiguous slice of rows, in
        rank order, the same rows for the three heads; hidden states and targets (global ids) are the same
        on every rank. Every rank gets the same loss and diagnostics, the full student_hidden gradient and
        the gradient of its own weight slice. Every rank must make the call.
    """


def fused_linear_logprobs(hidden, weight, targets, temperature=1.0, *, bias=None, ignore_index=-100,
                          backend="auto", chunk_size=None, vocab_parallel_group=None, impl="auto") -> torch.Tensor:
    """log softmax(hidden @ weight.T (+ bias) / temperature)[target] per token, without [N, V] logits.

    hidden: [..., D], weight: [V, D], targets: [...]; returns [...] in the math dtype (fp32, or fp64 if
    any input is fp64; dtypes may mix, see gopd_loss), 0 at masked tokens, differentiable w.r.t. hidden,
    weight and bias (used for teacher / reference scoring and for the policy's own log-probs).
    backend, impl, chunk_size, vocab_parallel_group: as fused_linear_gopd_loss.
    """
    backend, impl = _backend_and_impl(backend, impl)
    check.tensor("targets", targets, floating=False, ndim_min=0)
    lead = tuple(targets.shape)
    _check_head("", hidden, weight, bias, lead)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    _check_chunk(chunk_size)
    vocab = weight.shape[0]
    check.same_device("hidden", hidden, targets=targets)
    name = backends.resolve(backend, hidden.device)
    impl = _auto_impl(impl, name, hidden.device, hidden.dtype, 1, targets.numel(), "full", vocab_parallel_group,
                      (bias,), _needs_grad(hidden, weight, bias))
    if impl == "onchip":
        _check_onchip("full", vocab_parallel_group, bias=bias)
        _onchip_devices(hidden=hidden, weight=weight, targets=targets)
    cfg, global_vocab = _row_config(name, 1.0, (float(temperature),) * 3, ignore_index, vocab, hidden.device,
                                    vocab_parallel_group, [])
    check.targets_in_range(targets, global_vocab, ignore_index)
    y = targets.reshape(-1).to(torch.int64).contiguous()
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if impl == "onchip":
        lp = OnchipFusedLinearRows.apply(h2, weight, None, None, None, None, y, cfg, vocab)[0]
    else:
        chunk = chunk_size or default_chunk_size(y.shape[0], vocab, 1, hidden.device)
        no_ids = torch.zeros((y.shape[0], 0), dtype=torch.int64, device=y.device)
        lp = FusedLinearRows.apply(h2, weight, bias, None, None, None, None, None, None, y, no_ids, cfg, vocab,
                                   chunk)[0]
    return lp.reshape(lead).to(check.math_dtype(hidden, weight, bias))
