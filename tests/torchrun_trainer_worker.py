"""Run by tests/test_trainer_distributed.py under torchrun (2 gloo ranks): the CLI's `gopd train` three ways.

    python -m torch.distributed.run --nproc_per_node=2 tests/torchrun_trainer_worker.py OUT CONFIG [--set ...]

OUT/straight: 2 steps in one go. OUT/resumed: 1 step; then a resume to 2 steps whose checkpoint write fails
(an injected error inside torch.distributed.checkpoint.save, after a partial file was written); then the same
resume again, which must start from the intact step-1 checkpoint. One torchrun launch for all of it: the
process start-up (torch + transformers imports) is most of the test's time. The process group is set up
here once; each `gopd.cli.main` call builds a fresh Trainer that reloads everything from the run folder.
OUT/seq: 2 steps with reduction seq-mean-token-mean on ragged rollouts (``ragged_rollouts``).
"""

import contextlib
import os
import sys

import torch.distributed.checkpoint as dcp

from gopd import cli, distributed
from gopd.rollout import HFRollout

SEQ_REDUCTION = "seq-mean-token-mean"


@contextlib.contextmanager
def ragged_rollouts():
    """hf rollouts cut before the first token whose id is divisible by 5 (a pseudo-eos; the tiny random
    models never sample the real one): ragged responses, a function of each response's tokens alone, so the
    same whichever rank samples it. With the smoke config the two ranks then hold different numbers of
    responses (2 and 1), so a per-rank sequence count would give another loss than the global one."""
    real = HFRollout.generate

    def generate(self, *args, **kwargs):
        roll = real(self, *args, **kwargs)
        for i, r in enumerate(roll.responses):
            n = next((j for j, t in enumerate(r) if t % 5 == 0), len(r))
            roll.responses[i], roll.logprobs[i] = r[:n], roll.logprobs[i][:n]
        return roll

    HFRollout.generate = generate
    try:
        yield
    finally:
        HFRollout.generate = real


def train(config, out, *args):
    rc = cli.main(["train", "--config", config, "--set", f"out_dir={out}", *args])
    if rc != 0:
        raise SystemExit(f"gopd train {args} returned {rc}")


def main(out, config, *overrides):
    with distributed.process_group("cpu") as world:
        assert world.size == 2, world
        train(config, os.path.join(out, "straight"), *overrides, "--set", "steps=2")
        resumed = os.path.join(out, "resumed")
        train(config, resumed, *overrides, "--set", "steps=1")

        real_save = dcp.save

        def failing_save(state, *, checkpoint_id, **kwargs):
            os.makedirs(checkpoint_id, exist_ok=True)
            with open(os.path.join(checkpoint_id, f"__{world.rank}_0.distcp"), "wb") as fh:
                fh.write(b"partial")
            raise OSError("injected: disk full while writing the checkpoint")

        dcp.save = failing_save
        try:
            train(config, resumed, *overrides, "--set", "steps=2", "--resume")
            raise SystemExit("the injected checkpoint failure did not stop the run")
        except OSError as err:
            assert "injected" in str(err), err
        finally:
            dcp.save = real_save
        with open(os.path.join(resumed, "checkpoints", "LATEST")) as fh:
            assert fh.read().strip() == "step-000001", "a failed save must leave LATEST on the last good one"
        train(config, resumed, *overrides, "--set", "steps=2", "--resume")
        with ragged_rollouts():
            train(config, os.path.join(out, "seq"), *overrides, "--set", "steps=2", "--set",
                  f"reduction={SEQ_REDUCTION}")


if __name__ == "__main__":
    main(*sys.argv[1:])
