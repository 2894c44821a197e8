"""gopd: a thin Generalized On-Policy Distillation trainer built on the gopd_kernels fused ops.

    gopd train --config configs/smoke.yaml --set lam=1.25
    gopd eval  --config configs/demo.yaml
    gopd demo

Modules: config (dataclass + YAML), data (JSONL + synthetic tasks), models (loading, freezing, vocab
checks), rollout (sampling engines), scoring (hidden states for the fused op), trainer (the loop),
eval (pass@1 verifier), checkpoint (atomic save / resume; sharded under torchrun), distributed (process
group and rank helpers), sharded_student (the FSDP2 student and its sampling replica), cli.
"""

from .config import Config, ConfigError

__all__ = ["Config", "ConfigError"]
