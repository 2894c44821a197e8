"""Backend registry: the row kernels every backend implements, and the `auto` choice.

The contract every backend implements
-------------------------------------
A backend is a module ``gopd_kernels.backends.<name>`` with a ``DTYPES`` tuple (the logit dtypes its
kernels take) and three functions. All the G-OPD
objective logic (advantage, PPO clip, IS weight, reductions) lives once, in Python, on O(N)
per-token statistics (``gopd_kernels.objective``); a backend only does the vocabulary-wide work.

``available() -> tuple[bool, str]``
    Whether the backend can run here; if not, a message saying why and how to build it.

``rows_forward(zs, zt, zr, targets, ts, tt, tr, ignore_index) -> stats``
    zs: [N, V] student logits; zt, zr: [N, V] teacher / reference logits or None. Each has
    stride(-1) == 1 (any row stride: the API may pass a column-slice of a padded vocabulary).
    All three share one dtype (fp16, bf16, fp32, or fp64 where supported). targets: [N] int64,
    each in [0, V) or == ignore_index (the API range-checks them on the host for CPU tensors only; on a
    GPU an out-of-range target must read nothing and give that row NaN log-probabilities).
    ts, tt, tr: temperatures (python floats > 0).
    Returns stats: [NSTATS, N], rows named in gopd_kernels._layout: float64 if zs is float64, else
    float32 or float64.
    Every backend here returns fp64 for every input: an fp32 lse_m of magnitude |z / T| ~ 1e4 is
    only good to ~5e-4, and every log-probability the backward recomputes from it would carry that
    error (tests/test_backends.py, test_gradient_error_does_not_grow_with_a_logit_offset).
    rows_backward receives the stats its own rows_forward returned.
    With log p_m = z_m / T_m - lse_m (computed in fp32 or better, never in the input dtype):
        LSE_S/T/R  lse_m = logsumexp(z_m / T_m)
        LP_S/T/R   log p_m(target)
        E_S        sum_v p_s(v) log p_s(v)        (= -entropy of the student)
        E_T, E_R   sum_v p_s(v) log p_t(v), sum_v p_s(v) log p_r(v)
    Conventions (the non-finite rule of gopd_kernels.reference, at row level): a column where
    p_s(v) == 0 (z_s = -inf) contributes 0 to E_* (never 0 * -inf); a model that is -inf where
    p_s > 0 has E = -inf; a NaN or +inf logit, or a row that is -inf everywhere, makes that model's
    log-probabilities (LP, E; with the student, every E) NaN -- the masks test p != 0, not p > 0, so
    NaN is never dropped; a masked row (target == ignore_index) gets 0 in every stat and costs no
    vocabulary pass; the stats of a model that is None are 0.

``rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out) -> out``
    Writes the gradient w.r.t. zs into ``out`` ([N, V], dtype of zs; ``out`` may BE zs, for an
    in-place backward, so read z_s(v) before writing out(v)). g_lp, g_loss: [N] fp32 (fp64 with fp64
    input) upstream gradients of the per-token outputs lp_s and L, where
    L = E_S - lam * E_T - (1 - lam) * E_R. For each valid row i and column v:
        p(v)  = exp(z_s(v) / ts - lse_s)
        c(v)  = log p_s(v) - lam * log p_t(v) - (1 - lam) * log p_r(v)
        out(v) = ( g_loss_i * p(v) * (c(v) - L_i) + g_lp_i * ([v == y_i] - p(v)) ) / ts
    A backend may instead sum L_i = sum_v p(v) c(v) over the row it is given (the C++ CPU kernel does,
    for fp32 / 16-bit rows: c - L is then exactly consistent); on a whole row the two agree, and the
    vocab-parallel path (gopd_kernels/vocab_parallel.py) is written so that either gives its gradient.
    A term whose coefficient is 0 (lam, 1 - lam, g_loss_i, or p(v)) is 0 even when the log is
    -inf; a model that is None drops its term (zr None happens only with lam == 1). Masked rows
    get out = 0. A valid row whose gradient is undefined gets NaN in every column: when g_lp_i or
    g_loss_i is not finite, when L_i is not finite and g_loss_i != 0, or when lse_s is not finite. A backend may write an entry whose magnitude is below 2^-100 (~7.9e-31; for fp64
    input, the smallest normal double) as 0; the CPU backend does, because such entries put
    subnormals into the dH / dW GEMMs, which x86 runs many-fold slower (csrc/cpu/rows_generic.h,
    zero_if_tiny).

Optional, ``rows_forward_backward(zs, zt, zr, targets, g_lp, g_loss, lam, ts, tt, tr, ignore_index, out)
-> stats`` (the CPU backend has it): rows_forward, then rows_backward with upstream gradients known
before the forward, row by row, so each row is read from memory once. Same results as the two calls.

A backend that does not support a dtype raises TypeError naming the dtype and backend.
"""

from __future__ import annotations

import importlib

from .. import tuning
from .._layout import E_R, E_S, E_T, LP_R, LP_S, LP_T, LSE_R, LSE_S, LSE_T, NSTATS  # noqa: F401
from .._options import BACKENDS  # noqa: F401  (re-exported: backends.BACKENDS)

_MODULES: dict = {}  # name -> module, filled by get (a dict lookup is what torch.compile traces)

_BUILD_HINT = "build the extension with `pip install --no-build-isolation -e .` (or `make test`)"


def get(name: str):
    """Return the backend module `name`, or raise a ValueError saying why it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    module = _MODULES.get(name)
    if module is None:
        try:
            module = _MODULES[name] = importlib.import_module(f"gopd_kernels.backends.{name}")
        except ImportError as exc:  # a backend whose module or dependency is missing
            raise ValueError(f"backend={name!r} is not available here: {exc}") from exc
    ok, why = module.available()
    if not ok:
        raise ValueError(f"backend={name!r} is not available here: {why}")
    return module


def is_available(name: str) -> bool:
    try:
        get(name)
    except ValueError:
        return False
    return True


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its cost: that function imports torch._dynamo
    (about half of `import gopd_kernels`'s time) only to set this one attribute, which Dynamo reads when
    it meets the function while tracing. tests/test_compile.py checks torch's decorator still sets it."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def resolve(name: str, device) -> str:
    """Map backend="auto" to a concrete backend for tensors on `device`, and check it can run here.

    Under torch.compile this runs once, eagerly, while tracing (its answer is fixed for the given
    name and device: availability is probed once per process), so the probes (imports of the
    extension or of triton) never enter the graph."""
    if name != "auto":
        get(name)  # raises with a clear message if unknown / not built
        return name
    fast = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    order = tuning.preferred(device, fast + ("torch",))  # the measured winner on this device first
    for cand in order:
        if cand == "torch" and cand != order[0]:
            break  # reached only because no faster backend can run here
        if is_available(cand):
            return cand
    _warn_fallback(device.type, fast)
    return "torch"


_WARNED: set = set()


def _warn_fallback(device_type: str, candidates) -> None:
    """Once per device type: auto found no fast backend, so the plain-torch one (correct, slow) runs."""
    if device_type in _WARNED:
        return
    _WARNED.add(device_type)
    import warnings

    reasons = []
    for cand in candidates:
        try:
            get(cand)
        except ValueError as exc:
            reasons.append(str(exc))
    warnings.warn(f"gopd_kernels: backend='auto' on {device_type} tensors uses the plain-torch backend (slower) "
                  f"because {'; '.join(reasons)}", RuntimeWarning, stacklevel=3)
