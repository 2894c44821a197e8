"""gopd.integrations.verl through verl 0.9.1's own loss code on CPU (no Ray, no GPU, no model).

The batches are laid out as verl's actor hands them to a distillation loss: packed (nested, jagged) prompt +
response sequences, the student's log-probs over every packed row, the teacher server's log-probs, and
response-level old / ref log-probs. Every loss is compared with ``gopd_kernels.reference`` (or, for the top-k
path, ``gopd_kernels.gopd_loss(mode="topk")``), value and gradient. `make test-verl` builds the venv these
run in; elsewhere (no verl) the module skips, and under GOPD_TEST_VERL=1 a missing verl fails instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import verl  # noqa: F401  (loads the plug-in through its entry point)
except ImportError as err:
    if os.environ.get("GOPD_TEST_VERL") == "1":
        pytest.fail(f"verl is not importable ({err}); `make test-verl` installs it", pytrace=False)
    pytest.skip(f"verl is not importable here ({err}); `make test-verl` builds a venv with verl 0.9.1",
                allow_module_level=True)

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.distillation import losses as verl_losses  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig  # noqa: E402

import gopd_kernels as gk  # noqa: E402
from gopd.integrations.verl import settings as S  # noqa: E402
from gopd.integrations.verl import startup  # noqa: E402
from gopd_kernels import reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "verl_gopd.sh"
V = 11
IS_CAP = 5.0


def nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


class Batch:
    """A ragged batch: prompts of lengths P, responses of lengths R, logits of every packed row [N, V]
    (row j predicts token j + 1), masks inside the responses, and the per-token inputs, all float64."""

    def __init__(self, seed, prompt_lens=(3, 1, 4), response_lens=(5, 2, 7), topk=None):
        g = torch.Generator().manual_seed(seed)
        self.P, self.R = list(prompt_lens), list(response_lens)
        self.B = len(self.P)
        total = sum(self.P) + sum(self.R)
        self.logits = (torch.randn(total, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
        self.tokens = [torch.randint(0, V, (p + r,), generator=g) for p, r in zip(self.P, self.R)]
        self.mask = [torch.rand(r, generator=g) > 0.25 for r in self.R]
        self.mask[0][0] = True
        # Per response token: teacher, reference, old (sampling) and rollout-engine log-probs.
        self.lp_t = [-torch.rand(r, generator=g, dtype=torch.float64) * 3 for r in self.R]
        self.lp_r = [-torch.rand(r, generator=g, dtype=torch.float64) * 3 for r in self.R]
        self.lp_s0 = [x.detach() for x in self.response_rows(self.student_logprobs_packed())]
        self.lp_old = [x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in self.lp_s0]
        self.lp_roll = [x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in self.lp_old]
        if topk is not None:
            t_logits = torch.randn(total, V, generator=g, dtype=torch.float64) * 2
            top = torch.log_softmax(t_logits, -1).topk(topk, -1)
            # Rows that predict no response token hold the server's placeholders (ids 0, log-probs 0).
            keep = torch.zeros(total, dtype=torch.bool)
            for s, p, r in zip(self.starts(), self.P, self.R):
                keep[s + p - 1: s + p - 1 + r] = True
            self.t_ids = torch.where(keep[:, None], top.indices, torch.zeros_like(top.indices))
            self.t_lps = torch.where(keep[:, None], top.values, torch.zeros_like(top.values))

    # -- the packed layout ---------------------------------------------------------------------------
    def starts(self):
        out, s = [], 0
        for p, r in zip(self.P, self.R):
            out.append(s)
            s += p + r
        return out

    def student_logprobs_packed(self):
        """[N] log p_s(next token) at every packed row (what verl's engine returns as log_probs)."""
        nxt = torch.cat([torch.roll(t, -1) for t in self.tokens])
        return torch.log_softmax(self.logits, -1).gather(1, nxt[:, None]).squeeze(1)

    def response_rows(self, packed):
        """The rows that predict response tokens, per sequence (verl's no_padding_2_padding slice)."""
        return [packed[s + p - 1: s + p - 1 + r] for s, p, r in zip(self.starts(), self.P, self.R)]

    def packed_teacher(self):
        """teacher_logprobs [N, 1] as the server returns them: the response rows hold lp_t, others junk."""
        full = torch.full((self.logits.shape[0],), -7.0, dtype=torch.float64)
        for s, p, r, lp in zip(self.starts(), self.P, self.R, self.lp_t):
            full[s + p - 1: s + p - 1 + r] = lp
        return full[:, None]

    def data(self, *, ref=True, is_weights=True, topk=False, batch_num_tokens=None):
        n_tokens = int(sum(m.sum() for m in self.mask))
        offsets = torch.tensor([0] + self.starts()[1:] + [self.logits.shape[0]])
        tensors = {
            "prompts": nested([t[:p] for t, p in zip(self.tokens, self.P)]),
            "responses": nested([t[p:] for t, p in zip(self.tokens, self.P)]),
            "input_ids": torch.nested.nested_tensor_from_jagged(torch.cat(self.tokens), offsets=offsets),
            "response_mask": nested([m.long() for m in self.mask]),
            "old_log_probs": nested(self.lp_old),
        }
        if topk:
            tensors["teacher_ids"] = torch.nested.nested_tensor_from_jagged(self.t_ids, offsets=offsets)
            tensors["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged(self.t_lps, offsets=offsets)
        else:
            tensors["teacher_logprobs"] = torch.nested.nested_tensor_from_jagged(self.packed_teacher(),
                                                                                 offsets=offsets)
        if ref:
            tensors["ref_log_prob"] = nested(self.lp_r)
        if is_weights:  # verl's own token-level truncated IS weights, cap 5
            w, _ = compute_rollout_correction_weights(
                self.pad(self.lp_old) - self.pad(self.lp_roll), self.pad(self.mask).float(),
                rollout_is="token", rollout_is_threshold=IS_CAP)
            tensors["rollout_is_weights"] = w
        return tu.get_tensordict(tensors, non_tensor_dict={
            "dp_size": 1, "batch_num_tokens": batch_num_tokens or n_tokens, "global_batch_size": self.B})

    def pad(self, rows, value=0):
        return torch.nn.utils.rnn.pad_sequence([x.to(torch.float64) if x.dtype != torch.bool else x
                                                for x in rows], batch_first=True, padding_value=value)

    def model_output(self):
        lp = self.student_logprobs_packed()
        return {"log_probs": torch.nested.nested_tensor_from_jagged(lp, offsets=torch.tensor(
            [0] + self.starts()[1:] + [self.logits.shape[0]]))}

    # -- gopd's reference on the same tokens --------------------------------------------------------
    def reference_per_token(self, lam, advantage="current"):
        """[B, R] per-token loss of gopd_kernels.reference (sampled), on the response rows."""
        rows = self.response_rows(self.logits)
        out = []
        for b in range(self.B):
            targets = torch.where(self.mask[b], self.tokens[b][self.P[b]:], torch.full_like(self.mask[b], -100,
                                                                                            dtype=torch.long))
            lp_t = self.lp_t[b]
            if advantage == "old":
                # The reference's advantage subtracts the current lp_s; the fork's subtracts lp_old. Shifting
                # the teacher by (lp_s - lp_old) / lam (detached) turns one into the other exactly.
                lp_t = lp_t + (self.lp_s0[b] - self.lp_old[b]) / lam
            res = reference.gopd_loss(rows[b], targets, teacher_logprobs=lp_t, ref_logprobs=self.lp_r[b],
                                      lam=lam, mode="sampled", old_logprobs=self.lp_old[b],
                                      rollout_logprobs=self.lp_roll[b], clip_eps=0.2, dual_clip=3.0,
                                      is_cap=IS_CAP, reduction="none")
            out.append(res.loss)
        return out


def aggregate(per_token, mask, mode, batch_num_tokens):
    if mode == "token-mean":
        return sum(x.sum() for x in per_token) / batch_num_tokens
    if mode == "seq-mean-token-mean":
        seqs = [x.sum() / m.sum() for x, m in zip(per_token, mask) if m.any()]
        return sum(seqs) / len(per_token)
    if mode == "seq-mean-token-sum":
        return sum(x.sum() for x in per_token) / len(per_token)
    raise ValueError(mode)


def configs(loss_mode="gopd", agg="token-mean", **loss_overrides):
    actor = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=agg,
                        use_kl_loss=True, kl_loss_coef=0.0)
    kw = dict(loss_mode=loss_mode, use_task_rewards=False, use_policy_gradient=(loss_mode == "gopd"),
              loss_max_clamp=None, log_prob_min_clamp=None, clip_ratio=0.2, clip_ratio_low=0.2,
              clip_ratio_high=0.2)
    kw.update(loss_overrides)
    return actor, DistillationConfig(enabled=False, distillation_loss=DistillationLossConfig(**kw))


@pytest.fixture
def env(monkeypatch):
    def set_(lam=None, advantage=None):
        for key, val in ((S.ENV_LAM, lam), (S.ENV_ADVANTAGE, advantage)):
            if val is None:  # setenv first, so that the undo also removes what check_config exports
                monkeypatch.setenv(key, "")
                monkeypatch.delenv(key)
            else:
                monkeypatch.setenv(key, str(val))
    set_()
    return set_


# -- loading -----------------------------------------------------------------------------------------

def test_import_verl_loads_the_plugin_and_registers_both_losses(tmp_path):
    code = ("import sys, verl\n"
            "from verl.trainer.distillation import losses as L\n"
            "import verl.utils.config as C\n"
            "s = L.DISTILLATION_SETTINGS_REGISTRY\n"
            "print('loaded', 'gopd.integrations.verl' in sys.modules)\n"
            "print('gopd', s['gopd'].use_estimator, s['gopd'].use_topk)\n"
            "print('gopd_topk', s['gopd_topk'].use_estimator, s['gopd_topk'].use_topk)\n"
            "print('hooks', getattr(L.compute_topk_loss, '_gopd_route', False), "
            "getattr(C.validate_config, '_gopd_check', False))\n")
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    # Outside the checkout: its own gopd_kernels.egg-info (written by an editable install, possibly older
    # than pyproject.toml's entry points) would shadow the installed metadata.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "FAILED" not in out.stderr, out.stderr
    lines = out.stdout.split("\n")
    assert "loaded True" in lines and "gopd True False" in lines and "gopd_topk False True" in lines, out.stdout
    assert "hooks True True" in lines, out.stdout


def test_plugin_reports_its_own_import_failure(monkeypatch, capsys):
    """verl swallows a plug-in's import error at debug level; ours prints it to stderr before re-raising."""
    import importlib

    for name in [m for m in sys.modules if m.startswith("gopd.integrations.verl")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gopd_kernels", None)  # `import gopd_kernels` fails inside the plug-in
    with pytest.raises(ImportError):
        importlib.import_module("gopd.integrations.verl")
    err = capsys.readouterr().err
    assert "gopd verl plug-in: FAILED to load" in err and "gopd_kernels" in err, err


# -- the sampled loss through verl's distillation_loss ---------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [1.0, 1.25])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("advantage", ["current", "old"])
def test_sampled_loss_through_verl_equals_reference(env, seed, lam, agg, advantage):
    env(lam=lam, advantage=advantage)
    batch = Batch(seed)
    actor, dist = configs(agg=agg)
    data = batch.data()
    loss, metrics = verl_losses.distillation_loss(actor, dist, batch.model_output(), data)
    (grad,) = torch.autograd.grad(loss, batch.logits)

    logits = batch.logits
    per_token = batch.reference_per_token(lam, advantage)
    want = aggregate(per_token, batch.mask, agg, data["batch_num_tokens"])
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(loss, want.to(loss.dtype), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    assert metrics["gopd/lam"] == lam


def test_sampled_token_mean_equals_the_reference_mean_reduction(env):
    """The global token mean: verl's batch_num_tokens is the reference's num_items_in_batch."""
    env(lam=1.25)
    batch = Batch(5)
    actor, dist = configs()
    data = batch.data(is_weights=False, batch_num_tokens=40)
    loss, _ = verl_losses.distillation_loss(actor, dist, batch.model_output(), data)
    rows = batch.response_rows(batch.logits)
    targets = torch.cat([torch.where(m, t[p:], torch.full_like(m, -100, dtype=torch.long))
                         for t, p, m in zip(batch.tokens, batch.P, batch.mask)])
    want = reference.gopd_loss(torch.cat(rows), targets, teacher_logprobs=torch.cat(batch.lp_t),
                               ref_logprobs=torch.cat(batch.lp_r), lam=1.25, old_logprobs=torch.cat(batch.lp_old),
                               reduction="mean", num_items_in_batch=40).loss
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_lam_one_reads_no_reference(env):
    env(lam=1.0)
    batch = Batch(3)
    actor, dist = configs()
    with_ref, _ = verl_losses.distillation_loss(actor, dist, batch.model_output(), batch.data())
    batch.lp_r = [torch.full_like(x, float("-inf")) for x in batch.lp_r]  # would be NaN if it were read
    without, _ = verl_losses.distillation_loss(actor, dist, batch.model_output(), batch.data(ref=False))
    assert torch.isfinite(without)
    torch.testing.assert_close(with_ref, without)


def test_lam_changes_the_loss(env):
    """The lam channel is live: GOPD_LAM reaches the loss."""
    batch = Batch(4)
    actor, dist = configs()
    values = []
    for lam in (1.0, 1.25):
        env(lam=lam)
        values.append(verl_losses.distillation_loss(actor, dist, batch.model_output(), batch.data())[0])
    assert not torch.allclose(values[0], values[1])


# -- start-up checks -------------------------------------------------------------------------------------

def recipe_overrides():
    """The G-OPD block of examples/verl_gopd.sh: one `key=value` per line between its two markers."""
    text = RECIPE.read_text()
    block = text.split("# >>> G-OPD settings")[1].split("# <<< G-OPD settings")[0]
    return [line.strip() for line in block.splitlines() if re.match(r"^\s*\+{0,2}[\w.]+=\S", line)]


def training_config(overrides):
    """verl's full default PPO config (its generated YAML) with the overrides applied, as Hydra would."""
    path = Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml"
    config = OmegaConf.load(path)
    for item in overrides:
        key, value = item.lstrip("+").split("=", 1)
        OmegaConf.update(config, key, OmegaConf.from_dotlist([f"v={value}"]).v, force_add=True)
    return config


def test_the_recipe_passes_the_startup_check_and_exports_lam(env):
    config = training_config(recipe_overrides())
    options = startup.check_config(config)
    assert options == S.Options(lam=1.25, advantage="current")
    assert config.ray_kwargs.ray_init.runtime_env.env_vars[S.ENV_LAM] == "1.25"
    assert os.environ[S.ENV_LAM] == "1.25"
    assert OmegaConf.select(config, "actor_rollout_ref.actor.loss_agg_mode") == "seq-mean-token-mean"


WRONG = [
    ("distillation.enabled", "False"),
    ("distillation.distillation_loss.use_task_rewards", "True"),
    ("distillation.distillation_loss.use_policy_gradient", "False"),
    ("distillation.distillation_loss.loss_max_clamp", "10.0"),
    ("actor_rollout_ref.actor.use_kl_loss", "False"),
    ("actor_rollout_ref.actor.kl_loss_coef", "0.001"),
    ("algorithm.use_kl_in_reward", "True"),
    ("actor_rollout_ref.rollout.temperature", "0.7"),
    ("actor_rollout_ref.rollout.top_p", "0.9"),
    ("actor_rollout_ref.rollout.top_k", "20"),
    ("algorithm.rollout_correction.rollout_is", "sequence"),
    ("algorithm.rollout_correction.rollout_is_threshold", "0.5_5.0"),
    ("algorithm.rollout_correction.rollout_is_batch_normalize", "True"),
    ("algorithm.rollout_correction.rollout_rs", "token_k1"),
    ("algorithm.rollout_correction.bypass_mode", "True"),
    ("actor_rollout_ref.rollout.calculate_log_probs", "False"),
]


@pytest.mark.parametrize("key,value", WRONG)
def test_startup_check_names_each_wrong_setting(env, key, value):
    config = training_config(recipe_overrides() + [f"{key}={value}"])
    with pytest.raises(S.GOPDVerlConfigError, match=re.escape(key)):
        startup.check_config(config)


@pytest.mark.parametrize("key,value", [
    ("distillation.distillation_loss.use_policy_gradient", "True"),
    ("actor_rollout_ref.actor.use_fused_kernels", "True"),
    ("actor_rollout_ref.actor.strategy", "megatron"),
    ("gopd.lam", "1.25"),
])
def test_startup_check_of_the_topk_loss(env, key, value):
    base = [o for o in recipe_overrides()
            if not o.lstrip("+").startswith(("gopd.lam", "distillation.distillation_loss.use_policy_gradient"))]
    good = base + ["distillation.distillation_loss.loss_mode=gopd_topk",
                   "distillation.distillation_loss.use_policy_gradient=False"]
    assert startup.check_config(training_config(good)) == S.Options(lam=1.0)
    with pytest.raises(S.GOPDVerlConfigError, match=re.escape(key.replace("gopd.lam", S.ENV_LAM))):
        startup.check_config(training_config(good + [f"+{key}={value}" if key.startswith("gopd") else
                                                     f"{key}={value}"]))


@pytest.mark.parametrize("setup,match", [
    (dict(env_lam="abc"), "GOPD_LAM"),
    (dict(env_lam="1.5"), "disagree"),
    (dict(extra="+gopd.lamda=1.25"), "gopd.lamda"),
    (dict(extra="+gopd.advantage=older"), "gopd.advantage"),
    (dict(extra="distillation.distillation_loss.loss_mode=k1"), "loss_mode"),
])
def test_startup_check_of_the_options(env, setup, match):
    env(lam=setup.get("env_lam"))
    overrides = recipe_overrides() + ([setup["extra"]] if "extra" in setup else [])
    with pytest.raises(S.GOPDVerlConfigError, match=re.escape(match)):
        startup.check_config(training_config(overrides))


def test_other_losses_are_not_checked(env):
    config = training_config(["distillation.distillation_loss.loss_mode=k1",
                              "actor_rollout_ref.rollout.temperature=0.7"])
    assert startup.check_config(config) is None


def test_verl_validate_config_runs_the_check(env, monkeypatch):
    """The driver hook: verl's launcher calls verl.utils.config.validate_config before Ray starts."""
    import verl.utils.config as verl_config

    calls = []
    monkeypatch.setattr(verl_config, "validate_config", lambda config, *a, **k: calls.append(config))
    startup.install_driver_check()
    bad = training_config(recipe_overrides() + ["actor_rollout_ref.rollout.temperature=0.6"])
    with pytest.raises(S.GOPDVerlConfigError, match="rollout.temperature"):
        verl_config.validate_config(bad, use_reference_policy=True, use_critic=False)
    assert calls == [bad]  # verl's own validation ran first


@pytest.mark.parametrize("overrides,match", [
    (dict(use_task_rewards=True), "use_task_rewards"),
    (dict(use_policy_gradient=False), "use_policy_gradient"),
    (dict(loss_max_clamp=10.0), "loss_max_clamp"),
])
def test_worker_check_inside_the_loss(env, overrides, match):
    """A run launched without verl's validation still stops at the first loss call, naming the setting."""
    env(lam=1.25)
    batch = Batch(0)
    actor, dist = configs(**overrides)
    with pytest.raises(S.GOPDVerlConfigError, match=match):
        verl_losses.distillation_loss(actor, dist, batch.model_output(), batch.data())


def test_worker_check_needs_ref_log_probs_when_lam_is_not_one(env):
    env(lam=1.25)
    batch = Batch(0)
    actor, dist = configs()
    with pytest.raises(S.GOPDVerlConfigError, match="ref_log_prob"):
        verl_losses.distillation_loss(actor, dist, batch.model_output(), batch.data(ref=False))


# -- the top-k loss through verl's top-k path ------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("is_weights", [False, True])
def test_topk_through_verl_equals_gopd_loss_topk(env, seed, is_weights):
    env(lam=1.0)
    k = 4
    batch = Batch(seed, topk=k)
    actor, dist = configs("gopd_topk")
    data = batch.data(topk=True, is_weights=is_weights)
    # 1. verl's logits processor (the actor's forward) on the packed student logits [1, N, V] ...
    rows = verl_losses.distillation_ppo_loss(actor, dist, data=data, student_logits=batch.logits[None])
    offsets = torch.tensor([0] + batch.starts()[1:] + [batch.logits.shape[0]])
    model_output = {key: torch.nested.nested_tensor_from_jagged(v[0], offsets=offsets) for key, v in rows.items()}
    model_output["log_probs"] = batch.model_output()["log_probs"]
    # 2. ... then its final policy loss.
    loss, _ = verl_losses.distillation_ppo_loss(actor, dist, model_output=model_output, data=data)
    (grad,) = torch.autograd.grad(loss, batch.logits)

    resp = torch.cat(batch.response_rows(batch.logits))
    targets = torch.cat([torch.where(m, t[p:], torch.full_like(m, -100, dtype=torch.long))
                         for t, p, m in zip(batch.tokens, batch.P, batch.mask)])
    ids = torch.cat(batch.response_rows(batch.t_ids))
    lps = torch.cat(batch.response_rows(batch.t_lps))
    per_token = gk.gopd_loss(resp, targets, mode="topk", teacher_topk_ids=ids, teacher_topk_logprobs=lps,
                             reduction="none", backend="torch").loss
    if is_weights:
        w = torch.cat([x[: r] for x, r in zip(data["rollout_is_weights"], batch.R)])
        per_token = per_token * w
    want = per_token.sum() / data["batch_num_tokens"]
    (want_grad,) = torch.autograd.grad(want, batch.logits)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_topk_route_leaves_verls_own_topk_loss_alone(env):
    batch = Batch(0, topk=3)
    actor, dist = configs("forward_kl_topk", use_policy_gradient=False)
    out = verl_losses.distillation_ppo_loss(actor, dist, data=batch.data(topk=True),
                                            student_logits=batch.logits[None].float())
    assert {"distillation_losses", "student_mass", "teacher_mass"} <= set(out)


def test_topk_refuses_lam_other_than_one(env):
    env(lam=1.25)
    batch = Batch(0, topk=3)
    actor, dist = configs("gopd_topk")
    with pytest.raises(S.GOPDVerlConfigError, match="lam"):
        verl_losses.distillation_ppo_loss(actor, dist, data=batch.data(topk=True), student_logits=batch.logits[None])


def test_topk_under_sequence_parallelism_gives_each_rank_its_rows(env, monkeypatch):
    """With Ulysses sequence parallelism each rank holds a slice of the packed rows (padded to a multiple of
    the group size, verl's slice_input_tensor); the ranks' per-row losses put together are the whole one."""
    import verl.utils.ulysses as ulysses

    env(lam=1.0)
    batch = Batch(2, topk=3)
    actor, dist = configs("gopd_topk")
    data = batch.data(topk=True)
    whole = verl_losses.distillation_ppo_loss(actor, dist, data=data, student_logits=batch.logits[None])
    whole = whole["distillation_losses"][0]
    n, sp = batch.logits.shape[0], 2
    padded = torch.nn.functional.pad(batch.logits, (0, 0, 0, (-n) % sp))
    parts = []
    monkeypatch.setattr(ulysses, "get_ulysses_sequence_parallel_world_size", lambda *a: sp)
    monkeypatch.setattr(ulysses.dist, "get_world_size", lambda *a: sp)
    for rank in range(sp):
        monkeypatch.setattr(ulysses, "get_ulysses_sequence_parallel_rank", lambda *a, r=rank: r)
        local = padded.reshape(sp, -1, V)[rank]
        parts.append(verl_losses.distillation_ppo_loss(actor, dist, data=data, student_logits=local[None])
                     ["distillation_losses"][0])
    joined = torch.cat(parts)
    torch.testing.assert_close(joined[:n], whole)
    assert bool((joined[n:] == 0).all())
