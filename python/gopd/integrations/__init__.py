"""Adapters that put gopd's fused G-OPD loss inside other training frameworks.

trl: GOPDConfig / GOPDTrainer on TRL's on-policy DistillationTrainer (`pip install .[trl]`).
"""
