"""G-OPD in TRL: ``GOPDTrainer``, TRL's on-policy ``DistillationTrainer`` with gopd's fused loss.

TRL's DistillationTrainer already does the on-policy part: the student samples one completion per prompt
(transformers ``generate`` or vLLM), the teacher scores it from its final hidden states, and the loss is
divided by the number of generated completion tokens of the whole generation batch (all gradient-
accumulation micro-batches, all processes) over the process count. GOPDTrainer keeps all of that and
replaces the divergence: per completion token i, with y_i the sampled token and
``log p_m = log_softmax(h_m W_m^T / T)`` for the student s, teacher t and reference r,

    sampled:  loss_i = -w_i * A_i * exp(lp_s - sg(lp_s)),  A_i = lam (lp_t - lp_r) - (lp_s - lp_r)  (detached)
    full:     loss_i =  w_i * sum_v p_s(v) [log p_s(v) - lam log p_t(v) - (1 - lam) log p_r(v)]
    loss      = sum_i loss_i / num_items_in_batch                                (reduction "mean")
              = sum_j (sum_{i in j} loss_i / n_j) / num_sequences_in_batch      ("seq-mean-token-mean")
              = sum_j  sum_{i in j} loss_i        / num_sequences_in_batch      ("seq-mean-token-sum")

with j the completions (n_j tokens each) and num_sequences_in_batch the completions with at least one token
in the whole generation batch, over the process count, counted like TRL's token count (docs/design.md §2), computed by ``gopd_kernels.fused_linear_gopd_loss`` on the three models' final hidden
states [B, C, D] and LM-head weights [V, D]: no [tokens x vocab] logits are held. ``w_i`` is the truncated
importance weight ``min(exp(lp_s - lp_rollout), is_cap)`` when the generator reported the sampler's
log-probs (vLLM does; transformers ``generate`` samples from the trained weights themselves, so w = 1).

On-policy means the completions are samples of the student at the loss's temperature T: the config's
``temperature`` is both, and sampling options that change the distribution (top_p, top_k, min_p,
repetition_penalty, greedy or beam decoding) are refused unless ``allow_off_policy_sampling`` is set.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl.trainer.distillation_config import DistillationConfig
from trl.trainer.distillation_trainer import DistillationTrainer

import gopd_kernels as gk

from ..loss_options import SEQUENCE_REDUCTIONS, first_problem

# mode "topk" takes the teacher as its top-k ids and log-probs (what a served teacher reports); this
# integration scores a co-located teacher from its hidden states, for which "full" is the exact objective.
MODES = tuple(m for m in gk.MODES if m != "topk")
# Config names under which models scale or soft-cap their logits after the LM head; the fused loss computes
# logits as h W^T + b only, so such a model would be scored on the wrong distribution.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


@dataclass
class GOPDConfig(DistillationConfig):
    """DistillationConfig plus the G-OPD loss options.

    ``temperature`` (inherited, default 1) is the sampling temperature and every model's loss temperature
    (the paper and gopd's trainer use 1). ``beta`` (TRL's JSD interpolation) has no meaning here and must
    stay 1.0; ``lam`` takes its place.
    """

    lam: float = field(default=1.0, metadata={
        "help": "Weight of the teacher reward log(pi_t / pi_r); 1 = on-policy distillation (reverse KL to the "
                "teacher, the reference cancels), > 1 = ExOPD (the paper uses 1.25). The student's optimum is "
                "pi_t^lam * pi_r^(1 - lam)."})
    mode: str = field(default="sampled", metadata={
        "help": "'sampled': the paper's per-token policy-gradient estimator on the sampled token; 'full': the "
                "exact token-level objective summed over the vocabulary."})
    reduction: str = field(default="mean", metadata={
        "help": "How the per-token losses make the loss: 'mean' (over the generated tokens of the generation "
                "batch), or verl's 'seq-mean-token-mean' (the paper's runs) / 'seq-mean-token-sum': each "
                "completion's token mean / sum, averaged over the generation batch's non-empty completions."})
    advantage_from: str = field(default="current", metadata={
        "help": "mode 'sampled': the student log-prob in the advantage, from the current policy or 'old', the "
                "policy that sampled (as the paper authors' verl code). TRL makes one optimizer step per "
                "generation batch, so the two are the same policy here and give the same loss."})
    is_cap: float = field(default=5.0, metadata={
        "help": "Cap of the truncated importance weight min(exp(lp_s - lp_rollout), is_cap), applied when the "
                "generator reports the sampler's log-probs (vLLM)."})
    gopd_backend: str = field(default="auto", metadata={
        "help": "gopd_kernels backend of the fused loss: auto, cpu, torch, triton or cuda."})
    gopd_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "Tokens per chunk of the fused loss (logit memory O(chunk x vocab)); None: gopd's default."})
    allow_off_policy_sampling: bool = field(default=False, metadata={
        "help": "Accept sampling options that change the student's distribution (top_p, top_k, min_p, "
                "repetition_penalty, greedy / beam decoding) with a warning instead of an error."})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise ValueError(f"lam: expected a finite number (1 = OPD, 1.25 = the paper's ExOPD), got {self.lam!r}")
        bad = first_problem(self.mode, self.reduction, self.advantage_from, modes=MODES)
        if bad:
            why = " (topk needs a served teacher, which this integration does not take)" if bad[0] == "mode" else ""
            raise ValueError(f"{bad[0]}: {bad[1]}{why}")
        if not (isinstance(self.is_cap, (int, float)) and self.is_cap > 0):
            raise ValueError(f"is_cap: expected a number > 0, got {self.is_cap!r}")
        if self.beta != 1.0:
            raise ValueError(f"beta: TRL's JSD interpolation is not used by the G-OPD loss; leave it at 1.0 "
                             f"(got {self.beta!r}) and set lam instead")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")
        problems = off_policy_settings(self)
        if problems:
            msg = ("G-OPD trains on the student's own samples at the loss temperature "
                   f"(temperature={self.temperature}); these settings sample from another distribution, so the "
                   f"loss would be off-policy: {'; '.join(problems)}")
            if not self.allow_off_policy_sampling:
                raise ValueError(msg + ". Remove them, or set allow_off_policy_sampling=True to train anyway.")
            warnings.warn(msg, stacklevel=2)


def off_policy_settings(args) -> list:
    """Descriptions of the sampling settings of ``args`` that make the completions other than samples of
    the student at ``args.temperature``; empty when sampling is on-policy."""
    gen = dict(args.generation_kwargs or {})
    out = []
    temp = gen.get("temperature", args.temperature)
    if temp != args.temperature:
        out.append(f"generation_kwargs temperature={temp} differs from the loss temperature {args.temperature}")
    for name, neutral in (("top_p", (1.0, None)), ("top_k", (0, -1, None)), ("min_p", (0.0, None)),
                          ("repetition_penalty", (1.0, None)), ("typical_p", (1.0, None))):
        value = gen.get(name, getattr(args, name, None))
        if value not in neutral:
            out.append(f"{name}={value}")
    if gen.get("do_sample", True) is False:
        out.append("do_sample=False (greedy decoding)")
    if gen.get("num_beams", 1) not in (1, None):
        out.append(f"num_beams={gen['num_beams']}")
    return out


def check_plain_head(model, name: str) -> None:
    """Refuses a model whose logits are not ``h W^T + b`` (soft-capping or scaling after the head)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{name}: {type(model).__name__} applies {key}={value} to its logits, which the fused "
                             "G-OPD loss (logits = h W^T + b) does not support")


class GOPDTrainer(DistillationTrainer):
    """TRL's DistillationTrainer with the G-OPD loss (see the module doc for the math).

    ``GOPDTrainer(model, teacher_model, ref_model=None, args=GOPDConfig(lam=1.25, ...), train_dataset=...)``;
    the other arguments are DistillationTrainer's. ``ref_model``: a model or a model path sharing the
    student's vocabulary; by default (when ``lam != 1``) a frozen copy of the student as passed in (or the
    student's path loaded again), i.e. its initial weights. At ``lam = 1`` the reference cancels and none
    is used unless given.

    What it overrides, and why:
      - ``_compute_loss``: the fused G-OPD loss on the student's, teacher's and reference's final hidden
        states instead of TRL's chunked JSD (same hidden-state path, same global token count);
      - ``_generate_and_score_completions``: attaches the sampler's per-token log-probs, when the generator
        reported them (``record_rollout_logprobs``), as ``rollout_logprobs`` [B, C], and the generation
        batch's count of non-empty completions over all processes as ``num_sequences_in_batch`` (the
        sequence reductions' denominator, gathered as TRL gathers its token count);
      - ``compute_loss``: logs the G-OPD diagnostics (reward, kl, advantage, importance weight) gathered
        over processes, outside the wrapped forward as TRL does for the entropy.
    """

    _tag_names = ["trl", "gopd", "g-opd"]

    def __init__(self, model, teacher_model=None, ref_model=None, args: Optional[GOPDConfig] = None, **kwargs):
        if not isinstance(args, GOPDConfig):
            raise TypeError(f"args: expected a GOPDConfig, got {type(args).__name__}")
        if teacher_model is None:
            raise ValueError("teacher_model: G-OPD needs a teacher (a model or a model path)")
        if ref_model is None and args.lam != 1.0:
            # Taken before TRL wraps or adapts the student: the reference is the student's initial policy
            # (a model path is loaded a second time).
            ref_model = model if isinstance(model, str) else copy.deepcopy(model)
        if isinstance(ref_model, str):
            from trl.trainer.utils import create_model_from_path

            init_kwargs = dict(args.model_init_kwargs or {})
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            ref_model = create_model_from_path(ref_model, **init_kwargs)
        elif ref_model is not None and not hasattr(ref_model, "get_output_embeddings"):
            raise TypeError(f"ref_model: expected a model or a model path, got {type(ref_model).__name__}")
        super().__init__(model, teacher_model, args=args, **kwargs)
        for name, m in (("model", self.model), ("teacher_model", self.teacher_model), ("ref_model", ref_model)):
            if m is not None:
                check_plain_head(m, name)
        self.ref_model = None
        if ref_model is not None:
            v_s = self.model.get_output_embeddings().weight.shape[0]
            v_r = ref_model.get_output_embeddings().weight.shape[0]
            if v_r < v_s:
                raise ValueError(f"ref_model: its LM head has {v_r} rows, fewer than the student's {v_s}; the "
                                 "models must share one vocabulary")
            ref_model.eval()
            for p in ref_model.parameters():
                p.requires_grad_(False)
            if self.is_deepspeed_enabled:
                from trl.models import prepare_deepspeed

                self.ref_model = prepare_deepspeed(ref_model, self.accelerator)
            else:
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._rollout_logprobs = None
        self._gopd_sums = None
        if self.use_vllm:
            self._report_vllm_logprobs()

    # ------------------------------------------------------------------ rollout log-probs
    def record_rollout_logprobs(self, logprobs) -> None:
        """Record the sampler's log-probs of the completions just generated: one list of floats per completion,
        aligned with its token ids. Called by the vLLM path; a custom generator may call it too. A batch
        with any missing value is dropped (no importance weight) with a warning."""
        if logprobs is not None and any(v is None for row in logprobs for v in row):
            warnings.warn("the generator returned some log-probs as None; this batch has no importance weight")
            logprobs = None
        self._rollout_logprobs = logprobs

    def _report_vllm_logprobs(self) -> None:
        # TRL asks vLLM for no log-probs (its JSD does not use them); G-OPD's importance weight does. With
        # logprobs=0 vLLM returns the sampled token's log-prob after temperature: log pi_rollout(y) at T.
        gen = self.vllm_generation
        gen.logprobs = 0
        inner = gen.generate

        def generate(*a, **kw):
            prompt_ids, completion_ids, logprobs, token_ids = inner(*a, **kw)
            self.record_rollout_logprobs(None if logprobs is None else [[t[0] for t in row] for row in logprobs])
            return prompt_ids, completion_ids, logprobs, token_ids

        gen.generate = generate

    def _generate_and_score_completions(self, inputs):
        self._rollout_logprobs = None
        output = super()._generate_and_score_completions(inputs)
        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        output["num_sequences_in_batch"] = self.accelerator.gather((loss_mask.sum(1) > 0).sum()).sum()
        lps = self._rollout_logprobs
        self._rollout_logprobs = None
        if lps is None or "tool_mask" in output:
            return output  # tool turns interleave tokens the sampler did not produce: no weight then
        mask = output["completion_mask"]
        lengths = mask.sum(1).tolist()
        if len(lps) != mask.shape[0] or any(len(row) != n for row, n in zip(lps, lengths)):
            raise RuntimeError(f"rollout log-probs do not match the completions: lengths {[len(r) for r in lps]} "
                               f"vs {lengths}")
        rollout = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        for i, row in enumerate(lps):
            rollout[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
        output["rollout_logprobs"] = rollout
        return output

    # ------------------------------------------------------------------ the loss
    def _hidden(self, model, input_ids, attention_mask, logits_to_keep):
        """[B, C, D] final hidden states of a frozen model predicting the C completion tokens."""
        unwrapped = self.accelerator.unwrap_model(model)
        model.eval()
        with torch.no_grad():
            # Through the model's own wrapper, so FSDP / DeepSpeed gather its parameters (as TRL does).
            return self._forward_redirection(model, unwrapped, self._get_last_hidden_state, unwrapped, input_ids,
                                             attention_mask, logits_to_keep)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Returns (loss, entropy sum, valid-token count), the contract of DistillationTrainer._compute_loss.

        ``num_items_in_batch``: in training, TRL's count of generated completion tokens over the generation
        batch and all processes, divided by the process count (so that DDP's gradient average gives the
        global token-mean); None in evaluation, where the micro-batch's own token count is used. The
        sequence reductions take ``inputs["num_sequences_in_batch"]`` the same way."""
        args = self.args
        if any(k in inputs for k in ("pixel_values", "image_grid_thw")):
            raise NotImplementedError("GOPDTrainer: multimodal inputs are not supported")
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        n_keep = completion_ids.shape[1]

        h_s = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, n_keep)
        h_t = self._hidden(self.teacher_model, input_ids, attention_mask, n_keep)
        head_s = unwrapped_student.get_output_embeddings()
        head_t = self.accelerator.unwrap_model(self.teacher_model).get_output_embeddings()
        ref = {}
        if self.ref_model is not None:
            head_r = self.accelerator.unwrap_model(self.ref_model).get_output_embeddings()
            h_r = self._hidden(self.ref_model, input_ids, attention_mask, n_keep)
            ref = dict(ref_hidden=h_r.to(head_r.weight.device), ref_weight=head_r.weight,
                       ref_bias=getattr(head_r, "bias", None))
        device = head_s.weight.device
        targets = completion_ids.to(device).masked_fill(loss_mask.to(device) == 0, -100)
        denominator = dict(num_items_in_batch=num_items_in_batch)
        if args.reduction in SEQUENCE_REDUCTIONS:  # targets [B, C]: one completion per row
            seqs = inputs.get("num_sequences_in_batch") if self.model.training else None
            denominator = dict(num_sequences_in_batch=None if seqs is None else
                               seqs.to(device, torch.float64).clamp(min=1) / self.accelerator.num_processes)
        # advantage_from: TRL makes one optimizer step per generation batch, so the policy that sampled is the
        # one trained (lp_old = sg(lp_s)) and the advantage from "old" is the advantage from "current".
        out = gk.fused_linear_gopd_loss(
            h_s.to(device), head_s.weight, targets, h_t.to(head_t.weight.device), head_t.weight, **ref,
            student_bias=getattr(head_s, "bias", None), teacher_bias=getattr(head_t, "bias", None),
            lam=args.lam, mode=args.mode, rollout_logprobs=inputs.get("rollout_logprobs"), is_cap=args.is_cap,
            temperature=args.temperature, reduction=args.reduction, advantage_from="current", **denominator,
            backend=args.gopd_backend, chunk_size=args.gopd_chunk_size)
        valid = targets != -100
        self._gopd_sums = {name: getattr(out, name).detach().double().sum()
                           for name in ("reward", "kl", "advantage", "is_weight")
                           if getattr(out, name, None) is not None}
        return out.loss, out.entropy.detach().double().sum(), valid.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        sums, self._gopd_sums = self._gopd_sums, None
        if sums:
            mode = "train" if self.model.training else "eval"
            mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
            count = self.accelerator.gather_for_metrics(mask.sum().double().reshape(1)).sum()
            for name, value in sums.items():
                total = self.accelerator.gather_for_metrics(value.reshape(1)).sum()
                self._metrics[mode][f"gopd/{name}"].append((total / count.clamp(min=1)).item())
        return result
