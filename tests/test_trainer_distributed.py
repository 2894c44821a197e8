"""`gopd train` under torchrun: 2 gloo ranks on CPU against one process, and resume.

One torchrun launch (tests/torchrun_trainer_worker.py) trains the smoke config with 2 ranks: 2 steps
straight, and 1 step + a resume (through an injected checkpoint-write failure) to 2 steps. The global
batch of 3 prompts is split unevenly (rank 0: 2 prompts, rank 1: 1; micro-batches of 1, so rank 1 pads
with a zero-loss micro-batch): a per-rank token-mean, rollouts that depended on the split, or a wrong
micro-batch padding would change the loss, the gradient norm or the weights.

  (a) the 2-rank run logs the same loss, gradient norm and diagnostics as one process on the same global
      batch, and ends with the same student weights (within fp32 rounding: micro-batches are padded
      differently);
  (b) the resumed run equals the straight one exactly (same ranks, same operations), and the failed
      checkpoint write left the previous checkpoint usable;
  (c) with reduction seq-mean-token-mean on ragged responses, the 2-rank run equals one process: the
      denominator is the global response count / W (ranks hold 2 and 1 responses), not a rank's own.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import need

need("transformers")
need("yaml")
need("safetensors")

from safetensors.torch import load_file  # noqa: E402
from torchrun_trainer_worker import SEQ_REDUCTION, ragged_rollouts  # noqa: E402

from gopd import config as config_mod  # noqa: E402
from gopd.trainer import Trainer  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
WORKER = os.path.join(os.path.dirname(__file__), "torchrun_trainer_worker.py")
OVERRIDES = ("batch_size=3", "micro_batch_size=1", "n_eval=2", "eval_teachers=false", "eval_max_new_tokens=4",
             "save_every=1", "save_final_model=true", "progress=false")
NOT_COMPARED = {"time_s", "rollout_s", "tokens_per_s", "peak_mem_mb", "accuracy"}


def rows_of(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def training_metrics(rows):
    return [{k: v for k, v in r.items() if k not in NOT_COMPARED} for r in rows if r["step"] > 0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("torchrun")
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(__file__) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
           str(out), SMOKE, *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    one = out / "one"
    Trainer(config_mod.load(SMOKE, OVERRIDES + ("steps=2", f"out_dir={one}", "threads=1"))).train()
    with ragged_rollouts():
        Trainer(config_mod.load(SMOKE, OVERRIDES + ("steps=2", f"out_dir={out / 'one_seq'}", "threads=1",
                                                    f"reduction={SEQ_REDUCTION}"))).train()
    return out, proc


def weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


@pytest.mark.parametrize("two_ranks, one_process", [("straight", "one"), ("seq", "one_seq")])
def test_two_ranks_match_one_process(runs, two_ranks, one_process):
    out, proc = runs
    two, one = rows_of(out / two_ranks / "metrics.jsonl"), rows_of(out / one_process / "metrics.jsonl")
    assert [r["step"] for r in two] == [0, 1, 2]  # rank 0 alone writes the metrics
    assert proc.stdout.count("\"step\": ") == 4  # and prints the last row, once per completed gopd train
    a, b = training_metrics(two), training_metrics(one)
    if two_ranks == "seq":  # ragged: fewer tokens than 3 full responses of max_new_tokens = 8
        assert all(0 < r["n_tokens"] < 24 for r in b), [r["n_tokens"] for r in b]
    for got, want in zip(a, b):
        assert got.keys() == want.keys()
        assert got["n_tokens"] == want["n_tokens"]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (got["step"], key)
    w2, w1 = weights(out / two_ranks), weights(out / one_process)
    assert w2.keys() == w1.keys()
    moved = max(float((w1[k] - weights_at_start(k)).abs().max()) for k in w1)
    assert moved > 1e-4  # the steps changed the student, so equal weights mean equal updates
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


_START = {}


def weights_at_start(name):
    if not _START:
        from gopd.models import load_model
        cfg = config_mod.load(SMOKE, OVERRIDES)
        _START.update(load_model(cfg.student)[0].state_dict())
    return _START[name]


def test_resume_continues_exactly(runs):
    out, _ = runs
    straight, resumed = out / "straight", out / "resumed"
    assert training_metrics(rows_of(resumed / "metrics.jsonl")) == training_metrics(rows_of(straight / "metrics.jsonl"))
    w_s, w_r = weights(straight), weights(resumed)
    assert all(torch.equal(w_s[k], w_r[k]) for k in w_s)
    # A sharded checkpoint per step folder, only the newest kept, no temp folder left behind.
    ckpts = resumed / "checkpoints"
    assert (ckpts / "LATEST").read_text().strip() == "step-000002"
    assert sorted(os.listdir(ckpts)) == ["LATEST", "step-000002"]
    assert sorted(p for p in os.listdir(ckpts / "step-000002") if p.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    assert not (resumed / "checkpoint.pt").exists()


def test_share_splits_the_global_batch_contiguously():
    from gopd.distributed import World, share
    shares = [list(share(7, World(r, 3))) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(share(3, World(r, 2))) for r in range(2)] == [[0, 1], [2]]


def test_settings_refused_under_torchrun():
    from gopd.config import ConfigError
    from gopd.distributed import World
    from gopd.trainer import _check_distributed
    with pytest.raises(ConfigError, match="batch_size 3 is less than the 4 ranks"):
        _check_distributed(config_mod.load(SMOKE, ("batch_size=3",)), World(0, 4), None)
    with pytest.raises(ConfigError, match="rollout_engine 'vllm' is not supported under torchrun"):
        _check_distributed(config_mod.load(SMOKE, ("rollout_engine=vllm",)), World(0, 2), None)
