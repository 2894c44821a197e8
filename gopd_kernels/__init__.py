"""gopd_kernels: fused Generalized On-Policy Distillation (G-OPD) losses for PyTorch.

    import gopd_kernels as gk
    out = gk.gopd_loss(student_logits, targets, teacher_logits, ref_logits, lam=1.25, mode="full")
    out.loss.backward()

See docs/design.md for the math, the backends and the options; ``gopd_kernels.reference`` is the
plain-PyTorch definition every backend is tested against.
"""

from . import backends, distributed, reference
from ._options import ADVANTAGE_FROM, BACKENDS, IMPLS, MODES, REDUCTIONS, SEQUENCE_REDUCTIONS
from ._output import GOPDOutput
from ._workspace import release_workspace
from .api import fused_linear_gopd_loss, fused_linear_logprobs, gopd_loss
from .distributed import global_num_items
from .modules import FusedLinearGOPDLoss, GOPDHead, GOPDLoss

__version__ = "0.1.0"

__all__ = ["gopd_loss", "fused_linear_gopd_loss", "fused_linear_logprobs", "GOPDLoss", "FusedLinearGOPDLoss",
           "GOPDHead", "global_num_items", "GOPDOutput", "release_workspace", "reference", "backends",
           "distributed", "MODES", "REDUCTIONS", "SEQUENCE_REDUCTIONS", "ADVANTAGE_FROM", "IMPLS",
           "BACKENDS", "__version__"]
