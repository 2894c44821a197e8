"""Autograd functions around a backend's row kernels.

LogitRows          [N, V] logits in; the row outputs (objective.Rows: lp_s, the full-mode loss L, the
                   stats, the log-probs at the top-k ids) out, differentiable w.r.t. the student logits
                   with any per-token upstream gradient.
FusedLinearRows    hidden states + LM-head weights in; the same outputs. Chunks over tokens and
                   recomputes each chunk's logits in backward: memory O(chunk x V), never [N, V].
FusedLinearLoss    the same, for a scalar loss: the gradient is computed in the forward pass chunk
                   by chunk (no recompute) and only scaled by the upstream scalar in backward.
OnchipFusedLinearRows  impl="onchip": FusedLinearRows' outputs from Triton kernels that keep the logit
                   tiles on chip.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _compile, _workspace, backends
from ._layout import LP_S, LSE_R, LSE_S, NSTATS
from ._validate import compiling, math_dtype
from .objective import Rows, full_loss_from_stats

# Elements of one temporary of the top-k tail sums (fp64: 32 MiB), whatever the rows' count.
_TAIL_ELEMENTS = 1 << 22


def _tail_log_mass(z, ids, temp, lse):
    """[n] log P(tail) = logsumexp over the columns not in ids of (z / T - lse): a masked logsumexp in the
    statistics' precision (fp64), exact for a tail of any size; -inf for an empty one. The row's lse is
    subtracted before the sum, in fp64: logsumexp(z / T) - lse in fp32 would be the difference of two
    numbers of size |z / T|, off by eps |z / T|, and every tail token's gradient p(v) (c_tail - L) carries
    that error (lam times over). O(rows x V) temporaries, taken in sub-chunks."""
    n, v = z.shape
    out = lse.new_empty(n)
    step = max(1, _TAIL_ELEMENTS // max(v, 1))
    for a in range(0, n, step):
        x = z[a:a + step].to(lse.dtype) / temp - lse[a:a + step, None]
        x = x.scatter(1, ids[a:a + step], float("-inf"))
        out[a:a + step] = torch.logsumexp(x, -1)
    return out


class RowConfig:
    """A backend's row kernels with the scalars every call needs, plus the O(N k) top-k gathers.

    Eagerly the kernels are called on the backend module; while torch.compile traces, through the custom
    ops of gopd_kernels._compile (the same for every backend)."""

    def __init__(self, backend: str, lam, temperatures, ignore_index):
        self.name = backend
        self.backend = backends.get(backend)
        self.traced = compiling()
        self.lam = float(lam)
        self.ts, self.tt, self.tr = temperatures
        self.ignore_index = int(ignore_index)

    @classmethod
    def from_options(cls, backend: str, opts):
        return cls(backend, opts.lam, opts.temps, opts.ignore_index)

    def _rows_forward(self, zs, zt, zr, targets):
        args = (zs, zt, zr, targets, self.ts, self.tt, self.tr, self.ignore_index)
        if self.traced:
            return _compile.rows_forward(self.name, *args)
        return self.backend.rows_forward(*args)

    def _rows_backward(self, zs, zt, zr, targets, stats, g_lp, g_loss, out):
        args = (zs, zt, zr, targets, stats, g_lp, g_loss, self.lam, self.ts, self.tt, self.tr, self.ignore_index,
                out)
        if self.traced:
            _compile.rows_backward(self.name, *args)
            return out
        return self.backend.rows_backward(*args)

    def forward(self, zs, zt, zr, targets):
        return self._rows_forward(zs, zt, zr, targets)

    def backward(self, zs, zt, zr, targets, stats, g_lp, g_loss, out):
        return self._rows_backward(zs, zt, zr, targets, stats, g_lp, g_loss, out)

    @property
    def has_forward_backward(self):
        return hasattr(self.backend, "rows_forward_backward")

    def forward_backward(self, zs, zt, zr, targets, g_lp, g_loss, out):
        args = (zs, zt, zr, targets, g_lp, g_loss, self.lam, self.ts, self.tt, self.tr, self.ignore_index, out)
        if self.traced:
            return _compile.rows_forward_backward(self.name, *args)
        return self.backend.rows_forward_backward(*args)

    def gather(self, zs, zr, ids, stats):
        """The bucket log-masses of mode="topk" for the student and the reference, [n, k + 1] each in the
        stats' dtype: log p(id_j) = z(id_j) / T - lse for the k ids, then the tail's log P(tail). [n, 0] for
        k = 0 (the other modes), and for the reference when there is none."""
        n, k = ids.shape
        if k == 0:
            return stats.new_zeros((n, 0)), stats.new_zeros((n, 0))

        def buckets(z, temp, lse):
            at_ids = z.gather(1, ids).to(stats.dtype) / temp - lse[:, None]
            return torch.cat([at_ids, _tail_log_mass(z, ids, temp, lse)[:, None]], 1)

        lpk_s = buckets(zs, self.ts, stats[LSE_S])
        return lpk_s, (stats.new_zeros((n, 0)) if zr is None else buckets(zr, self.tr, stats[LSE_R]))

    def backward_with_ids(self, zs, zt, zr, targets, stats, g_lp, g_loss, out, ids, g_k, lpk_s):
        """backward() plus the gradient g_k [n, k + 1] of the student's bucket log-masses lpk_s (gather).

        With g_j the ids' part, g_t the tail's, G = sum_j g_j, P_t = exp(log P(tail)) and r = g_t / P_t:
        d/dz(v) of sum_j g_j log p(id_j) + g_t log P(tail) is, times T_s,
            sum_j g_j [v == id_j] + (r - G - g_t) p(v) - r p(v) [v in ids],
        so the row kernel runs with g_lp + (G + g_t - r) (its dense term -g_lp p(v) is then right) and two
        O(n k) scatters move its one-hot part off the target and add the ids' terms."""
        if ids.shape[1] == 0:
            return self.backward(zs, zt, zr, targets, stats, g_lp, g_loss, out)
        g_k = g_k.to(g_lp.dtype)
        g_ids, g_t = g_k[:, :-1], g_k[:, -1]
        zero = torch.zeros((), dtype=g_k.dtype, device=g_k.device)
        valid = targets != self.ignore_index  # masked rows' log-masses are not read: they may hold anything
        p_ids = torch.where(valid[:, None], lpk_s[:, :-1], -math.inf).exp()
        r = torch.where(valid & (g_t != 0), g_t / lpk_s[:, -1].exp(), zero)  # an empty tail (P_t = 0) has g_t = 0
        extra = g_ids.sum(1) + g_t - r
        self.backward(zs, zt, zr, targets, stats, (g_lp + extra).contiguous(), g_loss, out)
        at_y = valid & (targets >= 0) & (targets < zs.shape[1])
        column = torch.where(at_y, targets, torch.zeros_like(targets))
        out.scatter_add_(1, column[:, None], (torch.where(at_y, -extra, zero) / self.ts).to(out.dtype)[:, None])
        out.scatter_add_(1, ids, ((g_ids - r[:, None] * p_ids) / self.ts).to(out.dtype))
        return out

    def reduce_hidden_grad(self, dh):
        """The hidden-state gradient once every chunk is in (a vocab-parallel config sums it over ranks)."""
        return dh


def no_autocast(device):
    """Autocast off for our own GEMMs and row math: under torch.autocast a matmul would run (and round
    its output) in 16 bits, and the logits must reach the softmax in the math dtype
    (_validate.math_dtype). Used around the bodies of every autograd function here; backward too,
    since a backward called inside an autocast region runs with it."""
    return torch.autocast(device_type=device.type, enabled=False)


def _autocast_off(method):
    """Runs an autograd function's forward / backward with autocast off (no_autocast) on the device of
    its first tensor argument."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        with no_autocast(device):
            return method(ctx, *args)

    return wrapper


def _grad_or_zeros(g, like, dtype=None):
    dtype = dtype or like.dtype
    return torch.zeros(like.shape, dtype=dtype, device=like.device) if g is None else g.to(dtype).contiguous()


def _row_outputs(ctx, cfg, stats, lpk_s, lpk_r):
    """(lp_s, L, stats, lpk_s, lpk_r): stats and the reference's lpk_r carry no gradient."""
    ctx.mark_non_differentiable(stats, lpk_r)
    return stats[LP_S].clone(), full_loss_from_stats(stats, cfg.lam), stats, lpk_s, lpk_r


class LogitRows(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, zs, zt, zr, targets, ids, cfg: RowConfig, inplace_backward: bool):
        stats = cfg.forward(zs, zt, zr, targets)
        lpk_s, lpk_r = cfg.gather(zs, zr, ids, stats)
        ctx.cfg, ctx.inplace = cfg, inplace_backward
        ctx.save_for_backward(zs, zt, zr, targets, ids, stats, lpk_s)
        return _row_outputs(ctx, cfg, stats, lpk_s, lpk_r)

    @staticmethod
    @_autocast_off
    def backward(ctx, g_lp, g_loss, _g_stats, g_k, _g_kr):
        zs, zt, zr, targets, ids, stats, lpk_s = ctx.saved_tensors
        out = zs if ctx.inplace else torch.empty_like(zs)
        ctx.cfg.backward_with_ids(zs, zt, zr, targets, stats, _grad_or_zeros(g_lp, stats[0]),
                                  _grad_or_zeros(g_loss, stats[0]), out, ids,
                                  _grad_or_zeros(g_k, lpk_s, stats.dtype), lpk_s)
        return out, None, None, None, None, None, None


_GEMM_ERRORS = (RuntimeError, TypeError, NotImplementedError, ValueError)


@functools.lru_cache(maxsize=None)
def gemm_out_dtype_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, bool]:
    """(mm, addmm): whether this torch *runs*, on `device`, a `dtype` x `dtype` GEMM with fp32 output
    as torch.mm(a, b, out_dtype=float32), and as torch.addmm(acc, a, b, out_dtype=float32, out=acc)
    accumulating into an fp32 buffer -- checked by running both once on tiny matrices (results
    compared), not by looking for the overloads: torch 2.8 / 2.9 have them, but their addmm kernel
    requires `acc` to have the matrices' dtype and raises; CPU builds raise NotImplementedError. Cached
    per (device, dtype); the probe synchronises once."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False, False
    return _probe_gemm_out_dtype(device, dtype)


def _probe_gemm_out_dtype(device, dtype, mm=torch.mm, addmm=torch.addmm):
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device).to(dtype)
    b = torch.tensor([[0.5, -1.0], [2.0, 0.25]], device=device).to(dtype)
    want = torch.tensor([[4.5, -0.5], [9.5, -2.0]])
    mm_ok = addmm_ok = False
    try:
        out = mm(a, b.t().contiguous().t(), out_dtype=torch.float32)
        mm_ok = out.dtype == torch.float32 and torch.equal(out.cpu(), want)
    except _GEMM_ERRORS:
        pass
    try:
        acc = torch.full((2, 2), 1.0, dtype=torch.float32, device=device)
        addmm(acc, a, b, beta=1.0, out_dtype=torch.float32, out=acc)
        addmm_ok = acc.dtype == torch.float32 and torch.equal(acc.cpu(), want + 1.0)
    except _GEMM_ERRORS:
        pass
    return bool(mm_ok), bool(addmm_ok)


def linear_logits(hidden, weight, bias, vocab, dtype):
    """Logits hidden @ weight[:vocab].T (+ bias) of one chunk in `dtype` (fp32 / fp64, the math
    dtype); never rounded to 16 bits.

    A bf16 / fp16 pair on CUDA uses the GEMM's fp32 output (accumulated in fp32 by cuBLAS); other
    mixes are up-cast to `dtype` first (16-bit hidden states beside an fp32 head: an fp32 GEMM).
    """
    weight = weight[:vocab]
    if (dtype == torch.float32 and hidden.dtype == weight.dtype and hidden.dtype in (torch.float16, torch.bfloat16)
            and gemm_out_dtype_support(hidden.device, hidden.dtype)[0]):
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:
        logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias[:vocab].to(dtype)
    return logits


def _chunks(n, chunk):
    for start in range(0, n, chunk):
        yield slice(start, min(n, start + chunk))


class _Heads:
    """(hidden, weight, bias) of the student, teacher and reference; teacher / ref may be None.

    On CPU each head's fp32 chunk logits go into one buffer reused across chunks: a fresh
    [chunk, V] allocation per chunk would be page-faulted in (zeroed by the OS) every time. The
    buffers come from, and go back to, the workspace kept between calls (_workspace); `release()`
    returns them, and nothing may use a chunk's logits after it.

    Logits are in the math dtype ``self.dtype`` (fp32, or fp64 if any input is fp64: the rule of
    _validate.math_dtype). A CPU head whose weight is in another dtype (bf16 / fp16: the CPU has no
    GEMM with fp32 output from 16-bit inputs; or fp32 in an fp64 call) has its weight up-cast: into
    one buffer that the heads share for the whole call (the peak of a single up-cast copy of W,
    filled by a copy instead of a fresh, page-faulted allocation per head and chunk). The student's
    head is computed last, so the buffer still holds its weight for dH (cpu_weight("s")).
    """

    def __init__(self, hs, ws, bs, ht, wt, bt, hr, wr, br, vocab):
        self.s, self.t, self.r, self.vocab = (hs, ws, bs), (ht, wt, bt), (hr, wr, br), vocab
        self.dtype = math_dtype(hs, ws, bs, ht, wt, bt, hr, wr, br)
        self._buffers = {}
        self._w_up, self._w_up_key = None, None  # the shared fp32 copy of one 16-bit weight, and whose

    def _head(self, key):
        return {"s": self.s, "t": self.t, "r": self.r}[key]

    def cpu_weight(self, key):
        """Head `key`'s weight[:vocab] as its CPU GEMMs take it: itself in the math dtype, else its
        copy in the shared buffer (re-filled when it holds another head's weight); None off CPU."""
        w = self._head(key)[1][: self.vocab]
        if w.device.type != "cpu":
            return None
        if w.dtype == self.dtype:
            return w
        if compiling():  # a traced graph plans its own memory (see _one)
            return w.to(self.dtype)
        if self._w_up_key != key:
            if self._w_up is None:  # sized for the widest head, so it serves every head
                d_max = max(head[1].shape[1] for head in (self.s, self.t, self.r) if head[1] is not None)
                self._w_up = torch.empty(d_max * self.vocab, dtype=self.dtype)
            self._w_up[: w.numel()].view(w.shape).copy_(w)
            self._w_up_key = key
        return self._w_up[: w.numel()].view(w.shape)

    def _one(self, key, rows):
        h, w, b = self._head(key)
        if h is None:
            return None
        h = h[rows]
        if h.device.type != "cpu" or compiling():
            # Under torch.compile the CPU path too: the pooled buffers (a lock, out= GEMMs into reused
            # storage) are eager-mode memory management that a traced graph does for itself.
            return linear_logits(h, w, b, self.vocab, self.dtype)
        w = self.cpu_weight(key)
        h = h.to(w.dtype)
        numel = h.shape[0] * self.vocab
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:  # the first chunk is the largest: once per head
            if buf is not None:
                _workspace.give_back([buf])
            buf = self._buffers[key] = _workspace.take(numel, w.dtype)
        out = buf[:numel].view(h.shape[0], self.vocab)
        torch.mm(h, w.t(), out=out)
        if b is not None:
            out += b[: self.vocab].to(out.dtype)
        return out

    def logits(self, rows):
        """(student, teacher, reference) logits of the chunk `rows`, in the math dtype."""
        zt, zr = self._one("t", rows), self._one("r", rows)
        return self._one("s", rows), zt, zr

    def release(self):
        if self._buffers:
            _workspace.give_back(list(self._buffers.values()))
            self._buffers.clear()
        self._w_up, self._w_up_key = None, None


class _GradAccumulator:
    """dH, dW, db of the student head, built chunk by chunk: dh[rows] = dz @ W, dW += dz^T h, db += sum dz.

    Accumulators are in the math dtype `acc` (fp32, or fp64). The first chunk writes dW / db with beta = 0 (its
    input is ignored, NaN included), so a [V, D] buffer is never zero-filled only to be overwritten;
    rows of a padded W beyond the vocabulary are zeroed once. One that is not needed is None.
    """

    def __init__(self, hs, ws, bs, need_h, need_w, need_b, acc):
        self.acc, self.ws = acc, ws
        # Every row of dh is written by exactly one chunk (the chunks tile [0, N)).
        self.dh = torch.empty_like(hs) if need_h else None
        self.dw = torch.empty(ws.shape, dtype=acc, device=ws.device) if need_w else None
        self.db = torch.empty(bs.shape, dtype=acc, device=bs.device) if (bs is not None and need_b) else None
        self.first = True

    def add(self, dz, hs_chunk, rows, weight=None):
        """`weight`: the student's weight[:V] if the caller already has it in the accumulation dtype."""
        v = dz.shape[1]
        beta = 0.0 if self.first else 1.0
        if self.first:
            for g in (self.dw, self.db):
                if g is not None:
                    g[v:].zero_()
            self.first = False
        dh, dw, db, ws = self.dh, self.dw, self.db, self.ws
        if _tensor_core_grads(dz, hs_chunk, ws):
            # bf16 / fp16 head on CUDA: the logit gradient (fp32 from the row kernel) is rounded to the
            # input dtype once, as plain torch's gradient would be, so dH and dW run on tensor cores;
            # cuBLAS accumulates in fp32 and dW's cross-chunk sum stays fp32 (out_dtype). Up-casting W
            # instead would copy all of W to fp32 on every chunk and run the GEMMs an order of
            # magnitude slower.
            dz_lp = dz.to(hs_chunk.dtype)
            if dh is not None:
                torch.mm(dz_lp, ws[:v], out=dh[rows])
            if dw is not None:
                torch.addmm(dw[:v], dz_lp.t(), hs_chunk, beta=beta, out_dtype=torch.float32, out=dw[:v])
        else:
            dzc = dz.to(self.acc)
            if dh is not None:
                w = weight if weight is not None and weight.dtype == self.acc else ws[:v].to(self.acc)
                if dh.dtype == self.acc:
                    torch.mm(dzc, w, out=dh[rows])
                else:
                    dh[rows] = (dzc @ w).to(dh.dtype)
            if dw is not None:
                dw[:v].addmm_(dzc.t(), hs_chunk.to(self.acc), beta=beta)
        if db is not None:
            col_sum = dz.sum(0, dtype=self.acc)
            if beta == 0.0:
                db[:v] = col_sum
            else:
                db[:v] += col_sum

    def result(self):
        """(dh, dw, db); with no chunk at all (N = 0) they are zeros."""
        if self.first:
            for g in (self.dh, self.dw, self.db):
                if g is not None:
                    g.zero_()
        return self.dh, self.dw, self.db


def _tensor_core_grads(dz, hs_chunk, ws):
    return (hs_chunk.dtype in (torch.bfloat16, torch.float16) and ws.dtype == hs_chunk.dtype
            and gemm_out_dtype_support(dz.device, hs_chunk.dtype)[1])


class _ChunkRows:
    """The row outputs of all chunks, filled chunk by chunk: stats [NSTATS, N] in the dtype the backend
    returns (fp64, so the backward's recomputed log-probs keep their precision), and the log-probs at the
    top-k buckets [N, k + 1]; made on the first chunk, or in the heads' math dtype when there was none."""

    def __init__(self, n, k, has_ref):
        self.n, self.k, self.has_ref = n, k + 1 if k else 0, has_ref  # k ids and the tail
        self.stats = self.lpk_s = self.lpk_r = None

    def put(self, rows, stats_c, lpk_s, lpk_r):
        if self.stats is None:
            self._make(stats_c.dtype, stats_c.device)
        self.stats[:, rows] = stats_c
        if self.k:
            self.lpk_s[rows] = lpk_s
            if self.has_ref:
                self.lpk_r[rows] = lpk_r

    def _make(self, dtype, device):
        self.stats = torch.zeros(NSTATS, self.n, dtype=dtype, device=device)
        self.lpk_s = torch.zeros(self.n, self.k, dtype=dtype, device=device)
        self.lpk_r = torch.zeros(self.n, self.k if self.has_ref else 0, dtype=dtype, device=device)

    def result(self, heads):
        if self.stats is None:
            self._make(heads.dtype, heads.s[0].device)
        return self.stats, self.lpk_s, self.lpk_r


class FusedLinearRows(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, hs, ws, bs, ht, wt, bt, hr, wr, br, targets, ids, cfg: RowConfig, vocab: int, chunk: int):
        heads = _Heads(hs, ws, bs, ht, wt, bt, hr, wr, br, vocab)
        n = targets.shape[0]
        out = _ChunkRows(n, ids.shape[1], hr is not None)
        try:
            for rows in _chunks(n, chunk):
                zs, zt, zr = heads.logits(rows)
                stats_c = cfg.forward(zs, zt, zr, targets[rows])
                out.put(rows, stats_c, *cfg.gather(zs, zr, ids[rows], stats_c))
        finally:
            heads.release()
        stats, lpk_s, lpk_r = out.result(heads)
        ctx.cfg, ctx.vocab, ctx.chunk = cfg, vocab, chunk
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, hr, wr, br, targets, ids, stats, lpk_s)
        return _row_outputs(ctx, cfg, stats, lpk_s, lpk_r)

    @staticmethod
    @_autocast_off
    def backward(ctx, g_lp, g_loss, _g_stats, g_k, _g_kr):
        hs, ws, bs, ht, wt, bt, hr, wr, br, targets, ids, stats, lpk_s = ctx.saved_tensors
        heads = _Heads(hs, ws, bs, ht, wt, bt, hr, wr, br, ctx.vocab)
        g_lp, g_loss = _grad_or_zeros(g_lp, stats[0]), _grad_or_zeros(g_loss, stats[0])
        g_k = _grad_or_zeros(g_k, lpk_s, stats.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _GradAccumulator(hs, ws, bs, need_h, need_w, need_b, heads.dtype)
        try:
            for rows in _chunks(targets.shape[0], ctx.chunk):
                zs, zt, zr = heads.logits(rows)
                ctx.cfg.backward_with_ids(zs, zt, zr, targets[rows], stats[:, rows], g_lp[rows], g_loss[rows], zs,
                                          ids[rows], g_k[rows], lpk_s[rows])
                grads.add(zs, hs[rows], rows, heads.cpu_weight("s"))
        finally:
            heads.release()
        dh, dw, db = grads.result()
        dh = ctx.cfg.reduce_hidden_grad(dh)
        return (dh, None if dw is None else dw.to(ws.dtype),
                None if db is None else db.to(bs.dtype)) + (None,) * 11


class FusedLinearLoss(torch.autograd.Function):
    """Scalar loss whose gradient is built in forward.

    `objective(rows: objective.Rows, sl) -> per-token loss of the chunk sl, already scaled by its reduction
    weight` must be row-local (token i's loss depends only on row i), which holds for every G-OPD mode.
    `known_grads`: None, or the [N] gradients (g_lp, g_loss) of the scaled loss when they do not
    depend on the statistics (objective.stat_free_gradients); a backend with rows_forward_backward
    then runs each row's forward and backward together, reading its logits once.
    Returns (loss, stats, lpk_s, lpk_r); backward multiplies the stored dH, dW, db by the upstream scalar.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, hs, ws, bs, ht, wt, bt, hr, wr, br, targets, ids, cfg: RowConfig, vocab: int, chunk: int,
                objective, known_grads=None):
        heads = _Heads(hs, ws, bs, ht, wt, bt, hr, wr, br, vocab)
        n = targets.shape[0]
        out = _ChunkRows(n, ids.shape[1], hr is not None)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _GradAccumulator(hs, ws, bs, need_h, need_w, need_b, heads.dtype)
        total = torch.zeros((), dtype=torch.float64, device=hs.device)
        try:
            need_grads = need_h or need_w or need_b
            together = need_grads and known_grads is not None and cfg.has_forward_backward
            for rows in _chunks(n, chunk):
                zs, zt, zr = heads.logits(rows)
                y = targets[rows]
                if together:
                    g_lp, g_loss = (g[rows] for g in known_grads)
                    stats_c = cfg.forward_backward(zs, zt, zr, y, g_lp, g_loss, out=zs)
                    lpk = cfg.gather(zs, zr, ids[rows], stats_c)  # k = 0: known gradients are full mode's
                    out.put(rows, stats_c, *lpk)
                    total += objective(Rows(stats_c[LP_S], full_loss_from_stats(stats_c, cfg.lam), stats_c, *lpk),
                                       rows).sum()
                    grads.add(zs, hs[rows], rows, heads.cpu_weight("s"))
                    continue
                stats_c = cfg.forward(zs, zt, zr, y)
                lpk_s, lpk_r = cfg.gather(zs, zr, ids[rows], stats_c)
                out.put(rows, stats_c, lpk_s, lpk_r)
                with torch.enable_grad():
                    leaves = (stats_c[LP_S].clone(), full_loss_from_stats(stats_c, cfg.lam), lpk_s.clone())
                    leaves = tuple(x.requires_grad_(True) for x in leaves)
                    loss_c = objective(Rows(*leaves[:2], stats_c, leaves[2], lpk_r), rows).sum()
                    g_lp, g_loss, g_k = torch.autograd.grad(loss_c, leaves, allow_unused=True, materialize_grads=True)
                total += loss_c.detach()
                if need_grads:
                    cfg.backward_with_ids(zs, zt, zr, y, stats_c, g_lp.contiguous(), g_loss.contiguous(), zs,
                                          ids[rows], g_k, lpk_s)
                    grads.add(zs, hs[rows], rows, heads.cpu_weight("s"))
        finally:
            heads.release()
        dh, dw, db = grads.result()
        dh = cfg.reduce_hidden_grad(dh)
        stats, lpk_s, lpk_r = out.result(heads)
        # Kept on ctx, not saved for backward, so that backward can hand these very tensors to autograd,
        # which then adopts them as .grad without a copy (a saved tensor has a second owner, and a
        # [V, D] copy at that point would be the step's peak memory).
        ctx.grads = (dh, dw, db)
        ctx.dtypes = (ws.dtype, None if bs is None else bs.dtype)
        ctx.mark_non_differentiable(stats, lpk_s, lpk_r)
        return total, stats, lpk_s, lpk_r

    @staticmethod
    @_autocast_off
    def backward(ctx, g_total, *_g_rows):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_gopd_loss: this loss was already backpropagated once. With a scalar reduction "
                "its gradient is built in the forward pass and handed over on the first backward, so "
                "retain_graph=True cannot replay it; compute the loss again, or use reduction='none' (which "
                "recomputes in backward) and reduce it yourself.")
        grads, ctx.grads = ctx.grads, None
        need = ctx.needs_input_grad[:3]
        dtypes = (grads[0].dtype if grads[0] is not None else None, *ctx.dtypes)
        out = []
        for grad, dtype, needed in zip(grads, dtypes, need):
            if not needed or grad is None:
                out.append(None)
                continue
            # Scaled in place (ours alone), always: testing g_total != 1 first would synchronise with
            # the device on every step, for a pass over dW that costs about a millisecond on a GPU.
            grad.mul_(g_total.to(grad.dtype))
            out.append(grad.to(dtype))
        del grads
        return (*out, *(None,) * 13)


def _onchip_heads(hs, ws, ht, wt, hr, wr):
    """The heads as the on-chip kernels take them: each head's hidden and weight in one dtype (tl.dot
    takes one), all in fp64 when the math dtype is (_validate.math_dtype). A head whose pair already
    shares a dtype is passed as it is (no copy); otherwise both are up-cast to the math dtype, never
    rounded down."""
    dtype = math_dtype(hs, ws, ht, wt, hr, wr)

    def prep(h, w):
        if h is None or (h.dtype == w.dtype and (dtype != torch.float64 or h.dtype == dtype)):
            return h, w
        return h.to(dtype), w.to(dtype)

    return (*prep(hs, ws), *prep(ht, wt), *prep(hr, wr))


class OnchipFusedLinearRows(torch.autograd.Function):
    """impl="onchip": the outputs of FusedLinearRows (lp_s, L, stats) from the kernels of
    gopd_kernels/triton/onchip.py, which form the logit tiles on chip: no [N, V] or [chunk, V] tensor.
    Backward recomputes the tiles (the upstream gradient is per token); with a scalar loss the same
    path is taken (no gradient in forward: it would need the per-token gradients inside the kernel's
    pass, or a second pass). No biases (the op checks). Gradients reach the student's hidden and weight."""

    @staticmethod
    @_autocast_off
    def forward(ctx, hs, ws, ht, wt, hr, wr, targets, cfg: RowConfig, vocab: int):
        from .triton import onchip

        stats, _zy = onchip.onchip_forward(*_onchip_heads(hs, ws, ht, wt, hr, wr), targets, cfg.ts, cfg.tt,
                                           cfg.tr, cfg.ignore_index, vocab=vocab)
        ctx.cfg, ctx.vocab = cfg, vocab
        ctx.set_materialize_grads(False)  # an unused L (sampled mode) arrives as None: see backward
        ctx.save_for_backward(hs, ws, ht, wt, hr, wr, targets, stats)
        ctx.mark_non_differentiable(stats)
        return stats[LP_S].clone(), full_loss_from_stats(stats, cfg.lam), stats

    @staticmethod
    @_autocast_off
    def backward(ctx, g_lp, g_loss, _g_stats):
        from .triton import onchip

        hs, ws, ht, wt, hr, wr, targets, stats = ctx.saved_tensors
        cfg = ctx.cfg
        dh, dw = onchip.onchip_backward(
            *_onchip_heads(hs, ws, ht, wt, hr, wr), targets, stats, _grad_or_zeros(g_lp, stats[0]),
            _grad_or_zeros(g_loss, stats[0]), cfg.lam, cfg.ts, cfg.tt, cfg.tr, cfg.ignore_index, vocab=ctx.vocab,
            need_full=g_loss is not None)  # no upstream L gradient (sampled mode): teacher / reference unread
        need_h, need_w = ctx.needs_input_grad[:2]
        return (dh.to(hs.dtype) if need_h else None, dw.to(ws.dtype) if need_w else None) + (None,) * 7
