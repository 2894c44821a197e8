"""The G-OPD training loop (docs/design.md §1-2), nanoGPT-sized.

One optimizer step:
  1. sample `batch_size` prompts (chosen by a step-seeded RNG, so a resumed run sees the same batches);
  2. the student samples one response per prompt at temperature T (the rollout engine also reports the
     sampler's log-probs);
  3. per micro-batch of one domain: the student's final hidden states (with grad), the domain's teacher's
     and the reference's (no grad; the teacher may see a privileged prompt), then
     gopd_kernels.fused_linear_gopd_loss on hidden states + LM-head weights with the step's global
     denominator, so the summed micro-batch losses are the loss of the whole batch: `reduction` mean
     passes num_items_in_batch = the step's response tokens (the token mean); the sequence reductions
     pass the micro-batch as [B, T] rows, one response each (padded with ignore_index), and
     num_sequences_in_batch = the step's non-empty responses. The sampler's log-probs go in as
     rollout_logprobs (truncated IS weight min(exp(lp_s - lp_rollout), is_cap) against an engine /
     trainer mismatch); one update per batch is strictly on-policy (lp_old = lp_s, ratio 1); with
     `updates_per_batch` > 1 the later updates on the same batch use the first pass's log-probs as lp_old,
     so clip_eps / dual_clip act (and, with advantage_from old, the advantage is taken from lp_old too).
     Forwards run under bf16 autocast when `bf16` is set;
  4. grad clipping, AdamW, LR schedule. A non-finite loss or gradient skips the step; `max_bad_steps`
     in a row stop the run.

Under torchrun (WORLD_SIZE > 1, gopd.distributed) the same step runs data parallel: every rank draws the
same global batch and takes its contiguous share of the prompts; prompt i of the global batch is sampled
with its own generator seeded from (seed, step, i), so its tokens do not depend on how the prompts are
split; the student is sharded with FSDP2 and scored through gopd.sharded_student (the loss inside the root
FSDP forward); the denominator is the count over all ranks / W (num_items_in_batch = response tokens / W,
num_sequences_in_batch = non-empty responses / W), so FSDP2's gradient average is the global loss's
gradient; teachers and the reference are replicated. Rank 0 writes metrics, plots
and the final model; checkpoints are sharded (gopd.checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import yaml

import gopd_kernels as gk

from . import checkpoint, distributed
from . import data as data_mod
from .config import Config, ConfigError, to_dict
from .eval import evaluate
from .frozen_scoring import FrozenInputs, head_input, teacher_input
from .loss_options import SEQUENCE_REDUCTIONS
from .metrics import kl_to_teacher
from .models import build_models, frozen_copy, lm_head
from .progress import note, phase, progress_bar
from .rollout import make_engine
from .scoring import padded, response_hidden, targets_of, unpadded
from .serving.served_teacher import ServedTeacher

DIAGNOSTICS = ("lp_s", "lp_t", "lp_r", "reward", "kl", "advantage", "entropy")
# fused_linear_gopd_loss's per-token keywords: [N, ...] over a micro-batch's response tokens, or [B, T, ...]
# (one response per row) for the sequence reductions.
PER_TOKEN = ("teacher_hidden", "ref_hidden", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs",
             "old_logprobs", "rollout_logprobs")


class TrainingStopped(RuntimeError):
    """Raised after max_bad_steps non-finite steps in a row."""


@dataclass
class MicroBatch:
    """One domain's share of a step's batch (one fused loss call: a single teacher head). idx: positions
    in the rank's batch; targets [N] and rollout_logprobs [N]: the N response tokens, batch order."""

    domain: str
    idx: List[int]
    prompts: List[List[int]]           # the student's
    teacher_prompts: List[List[int]]   # the teacher's (privileged with teacher_context)
    responses: List[List[int]]
    targets: torch.Tensor
    rollout_logprobs: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.targets.numel())

    @property
    def lengths(self) -> List[int]:
        return [len(r) for r in self.responses]


@dataclass
class PassResult:
    """One pass over the micro-batches: summed loss, whether every loss was finite, the diagnostics'
    token sums (only those the mode reports) and the student's detached lp_s [n] per micro-batch."""

    loss: float = 0.0
    finite: bool = True
    sums: Dict[str, float] = field(default_factory=dict)
    lp_s: List[Optional[torch.Tensor]] = field(default_factory=list)

    def add(self, out) -> None:
        self.finite = self.finite and bool(torch.isfinite(out.loss))
        self.loss += float(out.loss.detach())
        for name in DIAGNOSTICS:
            value = getattr(out, name, None)
            if value is not None:
                self.sums[name] = self.sums.get(name, 0.0) + float(value.double().sum())

    def all_reduced(self, world, device) -> "PassResult":
        """The global batch's result. Each rank's loss is its share of the global loss times W (its sum
        over the global denominator / W), so the mean over ranks is the global loss; a diagnostic is kept
        if any rank reported it."""
        k = len(DIAGNOSTICS)
        present = [float(name in self.sums) for name in DIAGNOSTICS]
        reduced = distributed.all_reduce([self.loss, float(not self.finite)]
                                         + [self.sums.get(n, 0.0) for n in DIAGNOSTICS] + present, device=device)
        sums = {n: reduced[2 + j] for j, n in enumerate(DIAGNOSTICS) if reduced[2 + k + j] > 0}
        return PassResult(reduced[0] / world.size, reduced[1] == 0, sums, self.lp_s)


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, student=None):
        """student: an already loaded (model, tokenizer) to train instead of loading cfg.student (the
        demo loads SmolLM2 once for both arms); cfg.student still names it for the reference logic."""
        self.cfg = cfg
        self.world = distributed.World.current()
        if self.world.distributed:
            _check_distributed(cfg, self.world, student)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        # The same seed on every rank: FSDP2 shards each rank's own copy of the student, and the frozen
        # models are replicated, so every rank must build the same weights (checked in _place_student).
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.device = torch.device(distributed.local_device(cfg.device))
        self.run_dir = cfg.out_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.ckpt_path = os.path.join(self.run_dir, "checkpoint.pt")
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.train_set, self.eval_set = data_mod.run_sets(cfg)

        self.models = build_models(cfg, self.device, self.train_set, student)
        m = self.models
        self.student, self.codec, self.teachers = m.student, m.codec, m.teachers
        self.default_teacher, self.reference = m.default_teacher, m.reference
        self.engine = make_engine(cfg.rollout_engine, seed=cfg.seed, options=cfg.vllm)
        self.sampler, self.policy = self._place_student()
        self.optimizer, self.scheduler = _optimizer(self.student, cfg)
        self.step, self.bad_steps = 0, 0
        self._start_metrics(resume)
        # An engine with its own copy of the weights (vllm) is refreshed lazily, before the next
        # generation after the weights changed (start, resume, each optimizer step).
        self._engine_stale = True
        if cfg.bf16 and not bf16_autocast_supported(self.device):
            note(f"bf16: autocast is not supported on {self.device}; training in float32")
        if self.world.is_main:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as fh:
                yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
        distributed.barrier()  # no rank starts before rank 0 has reset or truncated the metrics

    def _place_student(self):
        """(sampler, policy). sampler: the model rollouts and evaluations sample from; policy: the FSDP2
        root whose forward computes the student's loss. One process: (the student itself, None). Under
        torchrun: a full replica refreshed from the FSDP2 shards (gopd.sharded_student), and the root."""
        if not self.world.distributed:
            return self.student, None
        from .sharded_student import shard_student

        for name, model in [("student", self.student), *self.models.frozen_modules()]:
            distributed.check_replicas_agree(name, model, self.device)
        return frozen_copy(self.student), shard_student(self.student, self._autocast)

    def _start_metrics(self, resume: bool) -> None:
        """Resumes from the run directory's checkpoint (then drops metrics logged after it), or starts a
        fresh metrics file."""
        if resume and self._resume():
            if self.world.is_main:
                self._truncate_metrics(self.step)
        elif os.path.exists(self.metrics_path) and self.world.is_main:
            os.remove(self.metrics_path)

    def _resume(self) -> bool:
        """Loads the run directory's checkpoint (this launch's format); False when there is none."""
        sharded = checkpoint.latest_sharded(self.run_dir)
        if self.world.distributed:
            if sharded is None:
                if os.path.exists(self.ckpt_path):
                    raise ConfigError(f"--resume under torchrun: {self.run_dir} holds only {self.ckpt_path}, "
                                      "written by a single-process run; resume it without torchrun")
                return False
            state = checkpoint.load_sharded(sharded, model=self.policy, optimizer=self.optimizer,
                                            scheduler=self.scheduler)
            if not state["rng_restored"] and self.world.is_main:
                note(f"resume: the checkpoint was written by {state['world_size']} ranks, this run has "
                     f"{self.world.size}; weights, optimizer and step are restored, the per-rank RNG states "
                     "are not (the trainer's sampling and data order do not use them)")
        elif os.path.exists(self.ckpt_path):
            state = checkpoint.load(self.ckpt_path, model=self.student, optimizer=self.optimizer,
                                    scheduler=self.scheduler)
        elif sharded is not None:
            raise ConfigError(f"--resume: {self.run_dir} holds a sharded checkpoint written under torchrun; "
                              "resume it under torchrun")
        else:
            return False
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        return True

    # ------------------------------------------------------------------ helpers
    def teacher_for(self, domain: str):
        return self.models.teacher_for(domain)

    def teacher_prompt(self, ex):
        return self.codec.prompt_ids(data_mod.privileged(ex, self.cfg.teacher_context))

    def _truncate_metrics(self, step: int) -> None:
        """A resumed run drops metrics logged after its checkpoint (they will be recomputed)."""
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        with open(self.metrics_path, "w") as fh:
            for row in rows:
                if row.get("step", 0) <= step:
                    fh.write(json.dumps(row) + "\n")

    def log(self, row: dict) -> None:
        if not self.world.is_main:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _autocast(self):
        """bf16 autocast of the models' forward passes (config bf16). Parameters, gradients and AdamW
        state stay float32 (master weights); the fused loss runs outside this context on float32
        hidden states, so its softmax / logsumexp math is float32 either way."""
        use = self.cfg.bf16 and bf16_autocast_supported(self.device)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use)

    def _sync_engine(self) -> None:
        """Collective under torchrun (the replica's refresh gathers the shards): every rank calls it."""
        if self._engine_stale:
            if self.policy is not None:
                from .sharded_student import sync_replica

                sync_replica(self.sampler, self.student)
            self.engine.sync_weights(self.sampler)
            self._engine_stale = False

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step + 1
        t0 = time.perf_counter()
        global_size, batch, gens = self._draw_batch(step)
        prompts = [self.codec.prompt_ids(ex) for ex in batch]
        self._sync_engine()
        roll = self.engine.generate(self.sampler, prompts, max_new_tokens=cfg.max_new_tokens,
                                    eos_id=self.codec.eos_id, pad_id=self.codec.pad_id,
                                    temperature=cfg.temperature, generator=gens, progress=cfg.progress)
        t_roll = time.perf_counter() - t0
        n_tokens, n_seqs = sum(len(r) for r in roll.responses), sum(1 for r in roll.responses if r)
        if self.world.distributed:  # every rank needs the global counts: the loss's denominator
            n_tokens, n_seqs = (int(c) for c in distributed.all_reduce([n_tokens, n_seqs], device=self.device))
        groups = self._micro_batches(batch, prompts, roll)
        # (student prompt ids, response ids) per domain in scoring order, kept for inspection and tests.
        self._last_scored = defaultdict(list)
        for mb in groups:
            if mb.n_tokens:
                self._last_scored[mb.domain].extend(zip(mb.prompts, mb.responses))

        row, applied, finite = self._updates(step, groups, self._denominator(n_tokens, n_seqs), n_tokens,
                                             global_size)
        # A non-finite update ends the batch's updates and counts towards max_bad_steps.
        self.bad_steps = self.bad_steps + 1 if not finite else (0 if applied else self.bad_steps)
        if cfg.updates_per_batch > 1:
            row["updates"] = applied
        if not applied:
            row["skipped"] = True
        elapsed = time.perf_counter() - t0
        peak = _peak_memory_mb(self.device)
        if self.world.distributed:  # the slowest rank's time, the largest rank's memory
            elapsed, t_roll, peak = distributed.all_reduce([elapsed, t_roll, peak], "max", self.device)
        row.update(time_s=elapsed, rollout_s=t_roll, tokens_per_s=n_tokens / max(elapsed, 1e-9),
                   peak_mem_mb=peak)
        self.step = step
        return row

    def _draw_batch(self, step: int):
        """(global batch size, this rank's examples, one sampling generator per example). The batch is
        drawn by a step-seeded RNG (a resumed run sees the same batches); each rank takes its contiguous
        share, and prompt i of the global batch samples with a generator seeded from (seed, step, i)."""
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + step)
        global_batch = [self.train_set[rng.randrange(len(self.train_set))] for _ in range(cfg.batch_size)]
        mine = distributed.share(len(global_batch), self.world)
        gens = [torch.Generator(device=self.device).manual_seed(prompt_seed(cfg.seed, step, i)) for i in mine]
        return len(global_batch), [global_batch[i] for i in mine], gens

    def _micro_batches(self, batch, prompts, roll) -> List[MicroBatch]:
        """Micro-batches of at most micro_batch_size examples of one domain each, domains sorted."""
        by_domain = defaultdict(list)
        for i, ex in enumerate(batch):
            by_domain[ex.domain].append(i)
        size = self.cfg.micro_batch_size
        out = []
        for dom in sorted(by_domain):
            for k in range(0, len(by_domain[dom]), size):
                idx = by_domain[dom][k:k + size]
                resp = [roll.responses[i] for i in idx]
                out.append(MicroBatch(
                    dom, idx, [prompts[i] for i in idx], [self.teacher_prompt(batch[i]) for i in idx], resp,
                    targets_of(resp, self.device),
                    torch.tensor([lp for i in idx for lp in roll.logprobs[i]], device=self.device)))
        return out

    def _denominator(self, n_tokens: int, n_seqs: int) -> dict:
        """The loss keyword with the step's global denominator: num_items_in_batch (reduction mean) or
        num_sequences_in_batch (the sequence reductions). Under torchrun gradients are averaged over the W
        ranks, so each rank divides by the global count / W."""
        world = self.world.size if self.world.distributed else 1
        if self.cfg.reduction in SEQUENCE_REDUCTIONS:
            return dict(num_sequences_in_batch=n_seqs / world if world > 1 else n_seqs)
        return dict(num_items_in_batch=n_tokens / world if world > 1 else n_tokens)

    def _updates(self, step: int, groups: List[MicroBatch], denominator: dict, n_tokens: int, global_size: int):
        """updates_per_batch optimizer steps on this batch (PPO epochs); returns (metrics row, updates
        applied, finite). The first update is on-policy (lp_old = lp_s, ratio 1); later ones pass the
        first pass's log-probs as lp_old, so clip_eps / dual_clip bound how far one batch moves the
        policy. The teacher / reference inputs are computed once per batch: those models are frozen."""
        cfg = self.cfg
        frozen: Dict[int, FrozenInputs] = {}
        old_lp, applied, row = None, 0, {}
        for update in range(cfg.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            res = self._score_and_backward(groups, denominator, frozen, old_lp)
            finite, grad_norm = res.finite, float("nan")
            if finite and n_tokens > 0:
                grad_norm = _clip_grad_norm(self.student.parameters(), cfg.grad_clip)
                finite = math.isfinite(grad_norm)
            loss = res.loss if finite else float("nan")
            if update == 0:
                old_lp = res.lp_s
                row = dict(step=step, loss=loss, n_tokens=n_tokens, response_len=n_tokens / global_size,
                           grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0])
                row.update({name: res.sums[name] / max(1, n_tokens) for name in DIAGNOSTICS if name in res.sums})
            else:
                row.update(loss_last=loss, grad_norm_last=grad_norm)
            if not (finite and n_tokens > 0):
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
            self.scheduler.step()
            self._engine_stale = True
            applied += 1
        return row, applied, finite

    def _score_and_backward(self, groups: List[MicroBatch], denominator: dict, frozen: Dict[int, FrozenInputs],
                            old_lp) -> PassResult:
        """One pass over the micro-batches: fused loss, backward (gradients accumulate in the student).

        denominator: the loss keyword of _denominator. frozen caches each micro-batch's FrozenInputs
        across the updates of a batch; old_lp (one [n] tensor per micro-batch, or None on the first
        update) is PPO's lp_old. Under torchrun the result is the global batch's. In one process a
        non-finite loss ends the pass before its backward."""
        res = PassResult()
        for g in progress_bar(range(self._n_calls(len(groups))), progress=self.cfg.progress, desc="scoring"):
            mb = groups[g] if g < len(groups) else None
            if mb is None or mb.n_tokens == 0:
                res.lp_s.append(None)
                self._padding_backward()
                continue
            if g not in frozen:
                frozen[g] = self._frozen_inputs(mb)
            out = self._loss(mb, frozen[g], None if old_lp is None else old_lp[g], denominator)
            lp_s = out.lp_s.detach()
            res.lp_s.append(unpadded(lp_s, mb.lengths) if self.cfg.reduction in SEQUENCE_REDUCTIONS else lp_s)
            if self.policy is None and not torch.isfinite(out.loss):
                res.finite = False
                break
            # Under torchrun the backward runs even on a non-finite loss (its reduce-scatter is a
            # collective); the step is then skipped on every rank, as `finite` is reduced.
            out.loss.backward()
            res.add(out)
        return res.all_reduced(self.world, self.device) if self.world.distributed else res

    def _n_calls(self, n_groups: int) -> int:
        """FSDP2's all-gathers and reduce-scatters are collectives: every rank runs as many forwards and
        backwards as the rank with the most micro-batches (the others pad with zero-loss ones)."""
        if not self.world.distributed:
            return n_groups
        return int(distributed.all_reduce([n_groups], "max", self.device)[0])

    def _padding_backward(self) -> None:
        """Under torchrun: a zero-loss forward and backward touching every parameter (sharded_student)."""
        if self.policy is not None:
            eos = [self.codec.eos_id]
            self.policy([eos], [eos], pad_id=self.codec.pad_id, dummy=True).backward()

    def _frozen_inputs(self, mb: MicroBatch) -> FrozenInputs:
        """The micro-batch's teacher input (on the teacher's prompts) and reference input (on the
        student's), forwards under the models' autocast."""
        cfg = self.cfg
        teacher = teacher_input(self.teacher_for(mb.domain), mb.teacher_prompts, mb.responses,
                                pad_id=self.codec.pad_id, mode=cfg.mode, top_k=cfg.top_k,
                                vocab=lm_head(self.student)[0].shape[0], temperature=cfg.temperature,
                                device=self.device, autocast=self._autocast)
        reference = None
        if self.reference is not None:
            reference = head_input(self.reference, mb.prompts, mb.responses, self.codec.pad_id, self._autocast)
        return FrozenInputs(teacher, reference)

    def _loss(self, mb: MicroBatch, frozen: FrozenInputs, old_lp, denominator: dict):
        """The student's forward and the fused G-OPD loss (a GOPDOutput) of one micro-batch. Mode sampled
        also gets the sampler's log-probs (the truncated IS weight) and, on later updates, lp_old; the
        first update takes the advantage from the current policy, which is then the one that sampled.
        The sequence reductions get every per-token input as [B, T, ...], one response per row."""
        cfg = self.cfg
        sampled = cfg.mode == "sampled"
        options = dict(
            frozen.loss_kwargs(), lam=cfg.lam, mode=cfg.mode,
            rollout_logprobs=mb.rollout_logprobs if sampled else None, old_logprobs=old_lp if sampled else None,
            advantage_from=cfg.advantage_from if old_lp is not None else "current", clip_eps=cfg.clip_eps,
            dual_clip=cfg.dual_clip, is_cap=cfg.is_cap, temperature=cfg.temperature, reduction=cfg.reduction,
            backend=cfg.backend, chunk_size=cfg.chunk_size, **denominator)
        targets, sequences = mb.targets, cfg.reduction in SEQUENCE_REDUCTIONS
        if sequences:
            targets = padded(targets, mb.lengths, fill=-100)  # -100: the loss's default ignore_index
            options.update({k: padded(options[k], mb.lengths) for k in PER_TOKEN if options.get(k) is not None})
        if self.policy is not None:  # the student's forward and the loss inside the FSDP2 root's forward
            return self.policy(mb.prompts, mb.responses, targets, pad_id=self.codec.pad_id, sequences=sequences,
                               **options)
        with self._autocast():
            h_s = response_hidden(self.student, mb.prompts, mb.responses, self.codec.pad_id)
        if sequences:
            h_s = padded(h_s, mb.lengths)
        w_s, b_s = lm_head(self.student)
        return gk.fused_linear_gopd_loss(h_s.to(w_s.dtype), w_s, targets, student_bias=b_s, **options)

    # ------------------------------------------------------------------ the run
    def evaluate_student(self) -> float:
        self._sync_engine()
        return evaluate(self.sampler, self.codec, self.engine, self.eval_set,
                        max_new_tokens=self.cfg.eval_max_new_tokens, progress=self.cfg.progress,
                        verifier=self.cfg.verifier, desc="eval student")

    def eval_domains(self) -> List[str]:
        return sorted({ex.domain for ex in self.eval_set})

    def accuracy_by_domain(self) -> Dict[str, float]:
        """pass@1 of the student on each domain's held-out questions. The per-question outcomes are kept
        in self.last_outcomes (domain -> list of bools, in eval-set order) for paired comparisons."""
        self._sync_engine()
        self.last_outcomes = {dom: [] for dom in self.eval_domains()}
        return {dom: evaluate(self.sampler, self.codec, self.engine,
                              [ex for ex in self.eval_set if ex.domain == dom],
                              max_new_tokens=self.cfg.eval_max_new_tokens, progress=self.cfg.progress,
                              verifier=self.cfg.verifier, desc=f"eval student[{dom}]",
                              outcomes=self.last_outcomes[dom])
                for dom in self.eval_domains()}

    def kl_to_teachers(self, teacher_of=None) -> Dict[str, float]:
        """Per domain: reverse KL(student || teacher) on the first n_eval_kl held-out questions of that
        domain (gopd.metrics.kl_to_teacher: the student's samples, scored by plain forwards). The teacher
        is the domain's own unless teacher_of(domain) names another model (e.g. the other domain's
        teacher, to check that routing moves each domain towards its own teacher only)."""
        cfg = self.cfg
        self._sync_engine()
        out = {}
        for dom in self.eval_domains():
            subset = [ex for ex in self.eval_set if ex.domain == dom][:cfg.n_eval_kl]
            teacher = teacher_of(dom) if teacher_of else self.teacher_for(dom)
            if isinstance(teacher, ServedTeacher):
                continue  # the metric scores with the teacher's own forward; a served one has none here
            out[dom] = kl_to_teacher(self.sampler, teacher, self.codec, self.engine, subset,
                                     max_new_tokens=cfg.max_new_tokens, teacher_prompt_fn=self.teacher_prompt,
                                     temperature=cfg.temperature, seed=cfg.seed + 2)
        return out

    def evaluation(self) -> dict:
        """The metrics of one evaluation point: accuracy (pass@1 on the held-out set), and with n_eval_kl
        > 0 kl_to_teacher (token-mean over the domains' questions, each domain weighted by its question
        count); with several domains also per-domain values. Under torchrun rank 0 evaluates (on its full
        replica of the student) and the other ranks return {} (every rank must call this: it refreshes
        the replica)."""
        self._sync_engine()
        row = {}
        if not self.world.is_main:
            return row
        by_dom = self.accuracy_by_domain()
        sizes = {dom: sum(ex.domain == dom for ex in self.eval_set) for dom in by_dom}
        row["accuracy"] = sum(by_dom[d] * sizes[d] for d in by_dom) / max(1, sum(sizes.values()))
        if len(by_dom) > 1:
            row["accuracy_by_domain"] = by_dom
        if self.cfg.n_eval_kl > 0:
            kls = self.kl_to_teachers()
            weights = {d: min(sizes[d], self.cfg.n_eval_kl) for d in kls}
            if kls:  # none when every teacher is served
                row["kl_to_teacher"] = sum(kls[d] * weights[d] for d in kls) / max(1, sum(weights.values()))
            if len(kls) > 1:
                row["kl_to_teacher_by_domain"] = kls
        return row

    def evaluate_teachers(self, outcomes: Optional[dict] = None) -> dict:
        """pass@1 of each domain's teacher (with its privileged prompt) on that domain's held-out questions;
        `outcomes`, a dict, receives domain -> per-question bools."""
        out = {}
        for dom in self.eval_domains():
            subset = [ex for ex in self.eval_set if ex.domain == dom]
            if isinstance(self.teacher_for(dom), ServedTeacher):
                continue  # a served teacher is scored, not sampled from, by this trainer
            kept = [] if outcomes is not None else None
            out[dom] = evaluate(self.teacher_for(dom), self.codec, self.engine, subset,
                                max_new_tokens=self.cfg.eval_max_new_tokens, progress=self.cfg.progress,
                                verifier=self.cfg.verifier, desc=f"eval teacher[{dom}]",
                                prompt_fn=self.teacher_prompt, outcomes=kept)
            if outcomes is not None:
                outcomes[dom] = kept
        return out

    def save(self) -> None:
        if self.policy is not None:
            checkpoint.save_sharded(self.run_dir, model=self.policy, optimizer=self.optimizer,
                                    scheduler=self.scheduler, step=self.step, bad_steps=self.bad_steps)
            return
        checkpoint.save(self.ckpt_path, model=self.student, optimizer=self.optimizer, scheduler=self.scheduler,
                        step=self.step, bad_steps=self.bad_steps)

    def train(self) -> List[dict]:
        cfg = self.cfg
        rows = []
        if self.step == 0 and cfg.eval_at_start:
            row = dict(step=0, **self.evaluation())
            if cfg.eval_teachers and self.world.is_main:
                row["teacher_accuracy"] = self.evaluate_teachers()
            self.log(row)
            rows.append(row)
        with phase(f"train {os.path.basename(os.path.normpath(self.run_dir))}", total=cfg.steps, done=self.step,
                   bar=cfg.progress, leave=True) as steps:
            while self.step < cfg.steps:
                self._run_step(steps, rows)
        if cfg.save_final_model:
            self._sync_engine()  # under torchrun: the full weights, gathered into the replica
            if self.world.is_main:
                self.sampler.save_pretrained(os.path.join(self.run_dir, "final"))
                tok = self.codec.tok
                if hasattr(tok, "save_pretrained"):
                    tok.save_pretrained(os.path.join(self.run_dir, "final"))
        if self.world.is_main:
            plot_metrics(self.metrics_path, os.path.join(self.run_dir, "metrics.png"))
        distributed.barrier()  # the run's files are complete when any rank returns
        return rows

    def _run_step(self, steps, rows: List[dict]) -> None:
        """One optimizer step with its bookkeeping: the stop on max_bad_steps, evaluation every eval_every
        steps and at the end, the metrics row, the checkpoint every save_every steps and at the end."""
        cfg = self.cfg
        row = self.train_step()
        if row.get("skipped") and self.bad_steps:
            note(f"step {row['step']}: non-finite loss or gradient, step skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= cfg.max_bad_steps:
                self.log(row)
                raise TrainingStopped(f"{self.bad_steps} non-finite steps in a row (max_bad_steps="
                                      f"{cfg.max_bad_steps}); stopping. The last checkpoint is intact.")
        last = self.step == cfg.steps
        if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
            row.update(self.evaluation())
        self.log(row)
        rows.append(row)
        steps.advance(loss=f"{row['loss']:.4g}")
        if (cfg.save_every and self.step % cfg.save_every == 0) or last:
            self.save()


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The seed of the generator that samples prompt `index` of step `step`'s global batch: a function of
    (seed, step, index) only, so a rank's share of the batch does not change what a prompt samples."""
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % 2**63


def _optimizer(student: torch.nn.Module, cfg: Config):
    """AdamW on the student's trainable parameters, and a linear warmup over warmup_steps (then constant)."""
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warm = max(0, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return optimizer, scheduler


def _clip_grad_norm(parameters, max_norm: float) -> float:
    """clip_grad_norm_, returning the total norm before clipping as a float. Under FSDP2 the gradients
    are DTensor shards and so is the norm; full_tensor() reduces it to the global norm on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def _check_distributed(cfg: Config, world, student) -> None:
    """Settings the data-parallel trainer does not support, refused before anything is loaded."""
    if cfg.rollout_engine != "hf":
        raise ConfigError(f"rollout_engine {cfg.rollout_engine!r} is not supported under torchrun; "
                          "use rollout_engine: hf")
    if cfg.batch_size < world.size:
        raise ConfigError(f"batch_size {cfg.batch_size} is less than the {world.size} ranks: every rank "
                          "needs at least one prompt per step")
    if student is not None:
        raise ConfigError("a preloaded student cannot be trained under torchrun (each rank loads cfg.student)")


def bf16_autocast_supported(device: torch.device) -> bool:
    """CPU autocast supports bfloat16 everywhere (slow without AVX512-BF16 / AMX, but correct);
    CUDA needs compute capability >= 8.0 (torch.cuda.is_bf16_supported)."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def plot_metrics(metrics_path: str, png_path: str) -> Optional[str]:
    """Curves of loss, reward, kl, advantage, entropy and accuracy; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(metrics_path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    names = ["loss", "reward", "kl", "advantage", "entropy", "accuracy", "kl_to_teacher"]
    fig, axes = plt.subplots(2, 4, figsize=(15, 6))
    axes.flat[-1].axis("off")
    for ax, name in zip(axes.flat, names):
        pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path
