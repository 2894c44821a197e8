// C++ CPU implementations of torch.ops.gopd.rows_forward / rows_backward / rows_forward_backward
// (schemas in csrc/module.cpp): the tensor checks, a call's rows on torch's thread pool, and the
// registration. The kernels a row runs are chosen in row_dispatch.h.
//
// Contract (gopd_kernels/backends/__init__.py): for each valid row i, with z'_m = z_m / T_m and
// log p_m = z'_m - lse_m,
//   stats[:, i] = lse_s, lse_t, lse_r, log p_s(y), log p_t(y), log p_r(y),
//                 E_S = sum_v p_s log p_s, E_T = sum_v p_s log p_t, E_R = sum_v p_s log p_r
// (the rows of stats_layout.h), and the backward writes
//   out(v) = ( g_loss_i p(v) (c(v) - L_i) + g_lp_i ([v == y_i] - p(v)) ) / T_s,
//   c = log p_s - lam log p_t - (1 - lam) log p_r,  L = E_S - lam E_T - (1 - lam) E_R,
// with entries below kTinyGrad (2^-100 for fp32 math) in magnitude written as 0 (rows_generic.h).
//
// Rows are independent and each row's arithmetic order is fixed, so results do not depend on the
// number of threads (at::parallel_for over rows, torch's OpenMP pool, honours torch.set_num_threads).
// Accumulation is fp32 for fp16 / bf16 / fp32 input and fp64 for fp64 input; the statistics are
// written in fp64 for every input, and the backward takes each lse as hi + lo in the accumulation type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/isa.h"
#include "cpu/row_dispatch.h"
#include "ops.h"
#include "stats_layout.h"

namespace gopd {
namespace cpu {
namespace {

// The checks every entry point starts with: the logits ([N, V] CPU tensors of one supported dtype,
// stride(-1) == 1) and the targets ([N] int64).
void check_logits_and_targets(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                              const c10::optional<at::Tensor>& zr, const at::Tensor& targets) {
  TORCH_CHECK(zs.device().is_cpu(), "gopd cpu backend: zs must be a CPU tensor");
  TORCH_CHECK(zs.dim() == 2, "gopd cpu backend: zs must be [N, V], got ", zs.sizes());
  TORCH_CHECK(zs.stride(1) == 1, "gopd cpu backend: zs must have stride(-1) == 1");
  for (const auto* z : {&zt, &zr}) {
    if (!z->has_value()) continue;
    const at::Tensor& t = z->value();
    TORCH_CHECK(t.device().is_cpu(), "gopd cpu backend: teacher / reference logits must be CPU tensors");
    TORCH_CHECK(t.sizes() == zs.sizes(), "gopd cpu backend: teacher / reference logits must have the shape of zs ",
                zs.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.stride(1) == 1, "gopd cpu backend: teacher / reference logits must have stride(-1) == 1");
    TORCH_CHECK(t.scalar_type() == zs.scalar_type(), "gopd cpu backend: all logits must share one dtype");
  }
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == zs.size(0),
              "gopd cpu backend: targets must be a CPU int64 tensor of shape [N]");
  const auto dt = zs.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && dt != at::kBFloat16 && dt != at::kHalf) {
    TORCH_CHECK_TYPE(false, "gopd cpu backend: unsupported dtype ", dt,
                     " (expected float16, bfloat16, float32 or float64)");
  }
}

void check_target(int64_t y, int64_t v) {
  TORCH_CHECK(y >= 0 && y < v, "gopd cpu backend: target ", y, " out of range [0, ", v, ")");
}

// The upstream gradients of a backward, as contiguous [N] tensors in the accumulation dtype.
struct UpstreamGrads {
  at::Tensor g_lp, g_loss;
};

// Checks a backward's out ([N, V], dtype of zs, stride(-1) == 1) and its upstream gradients ([N] each);
// returns the gradients in the accumulation dtype (fp64 for fp64 logits, else fp32).
UpstreamGrads checked_out_and_grads(const at::Tensor& zs, const at::Tensor& out, const at::Tensor& g_lp,
                                    const at::Tensor& g_loss) {
  TORCH_CHECK(out.device().is_cpu() && out.sizes() == zs.sizes() && out.scalar_type() == zs.scalar_type() &&
                  out.stride(1) == 1,
              "gopd cpu backend: out must be a CPU tensor with the shape and dtype of zs and stride(-1) == 1");
  const int64_t n = zs.size(0);
  TORCH_CHECK(g_lp.numel() == n && g_loss.numel() == n, "gopd cpu backend: g_lp and g_loss must have N elements");
  const auto acc_dtype = zs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {g_lp.to(acc_dtype).contiguous().reshape({n}), g_loss.to(acc_dtype).contiguous().reshape({n})};
}

// fp64 statistics for every input dtype (rows_generic.h, forward_row: an fp32 lse loses log-prob bits);
// a masked row's stay 0.
at::Tensor new_stats(const at::Tensor& zs) { return at::zeros({NSTATS, zs.size(0)}, zs.options().dtype(at::kDouble)); }

// Statistic k of row i is stats[k * n + i] (stats_layout.h).
void store_stats(const double* row, double* stats, int64_t n, int64_t i) {
  for (int k = 0; k < NSTATS; ++k) stats[k * n + i] = row[k];
}
void load_stats(const double* stats, int64_t n, int64_t i, double* row) {
  for (int k = 0; k < NSTATS; ++k) row[k] = stats[k * n + i];
}

template <typename scalar_t>
const scalar_t* opt_ptr(const c10::optional<at::Tensor>& z) {
  return z.has_value() ? z->data_ptr<scalar_t>() : nullptr;
}

int64_t opt_stride(const c10::optional<at::Tensor>& z) { return z.has_value() ? z->stride(0) : 0; }

// The three models' [N, V] logits as raw rows (a missing model gives nullptr rows).
template <typename scalar_t>
struct Logits {
  const scalar_t *s, *t, *r;
  int64_t ss, st, sr;
  Logits(const at::Tensor& zs, const c10::optional<at::Tensor>& zt, const c10::optional<at::Tensor>& zr)
      : s(zs.data_ptr<scalar_t>()), t(opt_ptr<scalar_t>(zt)), r(opt_ptr<scalar_t>(zr)), ss(zs.stride(0)),
        st(opt_stride(zt)), sr(opt_stride(zr)) {}
  const scalar_t* s_row(int64_t i) const { return s + i * ss; }
  const scalar_t* t_row(int64_t i) const { return t ? t + i * st : nullptr; }
  const scalar_t* r_row(int64_t i) const { return r ? r + i * sr : nullptr; }
  // Row i + 1 of a thread's range [., end), for NextRow's prefetch; none after its last row.
  NextRow<scalar_t> after(int64_t i, int64_t end) const {
    NextRow<scalar_t> n;
    if (i + 1 < end) {
      n.s = s_row(i + 1);
      n.t = t_row(i + 1);
      n.r = r_row(i + 1);
    }
    return n;
  }
};

// The accumulation type for logits of type scalar_t: fp64 for fp64, else fp32.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// What a backward writes and from what: the gradient rows of out, the upstream gradients per row and
// the terms kept.
template <typename scalar_t>
struct BackwardTarget {
  using acc_t = acc_type<scalar_t>;
  scalar_t* out;
  int64_t out_stride;
  const acc_t *g_lp, *g_loss;
  RowCoef<acc_t> coef;
  scalar_t* row(int64_t i) const { return out + i * out_stride; }
  void zero_row(int64_t i, int64_t v) const { std::fill(row(i), row(i) + v, static_cast<scalar_t>(0)); }
};

int64_t grain_rows(int64_t v) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(v, 1)); }

// The rows of one call as the kernels take them: the logits in zs's dtype, the targets, the inverse
// temperatures and this process's ISA.
template <typename scalar_t>
struct Rows {
  using acc_t = acc_type<scalar_t>;
  Logits<scalar_t> z;
  const int64_t* y;
  int64_t n, v, ignore_index;
  InvTemps<acc_t> inv;
  Isa isa;

  // row(i, scratch, next) for each row whose target is not ignore_index (range-checked first),
  // masked(i) for the others, over ranges of rows on torch's thread pool (results do not depend on
  // the split: rows are independent). Each range has its own scratch, runs with subnormals flushed
  // (SubnormalsAsZero), and passes row i + 1 of the range as next (the forward prefetches it).
  template <typename RowFn, typename MaskedFn>
  void for_each(const RowFn& row, const MaskedFn& masked) const {
    at::parallel_for(0, n, grain_rows(v), [&](int64_t begin, int64_t end) {
      const SubnormalsAsZero ftz;
      Scratch<acc_t> scratch;
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) {
          masked(i);
          continue;
        }
        check_target(y[i], v);
        row(i, scratch, z.after(i, end));
      }
    });
  }

  // The stats of valid row i into stats_row[NSTATS].
  void forward(int64_t i, Scratch<acc_t>& scratch, const NextRow<scalar_t>& next, double* stats_row) const {
    forward_one_row<scalar_t, acc_t>(isa, z.s_row(i), z.t_row(i), z.r_row(i), v, y[i], inv, scratch, stats_row,
                                     next);
  }

  // The gradient of valid row i from its stats_row[NSTATS] into b's row i.
  void backward(int64_t i, const double* stats_row, const BackwardTarget<scalar_t>& b, Scratch<acc_t>& scratch) const {
    backward_one_row<scalar_t, acc_t>(isa, z.s_row(i), z.t_row(i), z.r_row(i), b.row(i), v, y[i], stats_row,
                                      b.g_lp[i], b.g_loss[i], inv, b.coef, scratch);
  }

  BackwardTarget<scalar_t> backward_target(at::Tensor& out, const UpstreamGrads& g, double lam) const {
    return {out.data_ptr<scalar_t>(), out.stride(0), g.g_lp.data_ptr<acc_t>(), g.g_loss.data_ptr<acc_t>(),
            RowCoef<acc_t>(z.t != nullptr, z.r != nullptr, lam)};
  }
};

// body(rows) with rows the Rows of this call in zs's dtype (inputs checked by the caller); nothing to
// do for N = 0.
template <typename F>
void with_rows(const at::Tensor& zs, const c10::optional<at::Tensor>& zt, const c10::optional<at::Tensor>& zr,
               const at::Tensor& targets, double ts, double tt, double tr, int64_t ignore_index, const F& body) {
  const int64_t n = zs.size(0), v = zs.size(1);
  if (n == 0) return;
  const at::Tensor tg = targets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs.scalar_type(), "gopd_rows_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    body(Rows<scalar_t>{Logits<scalar_t>(zs, zt, zr), tg.data_ptr<int64_t>(), n, v, ignore_index,
                        InvTemps<acc_t>(ts, tt, tr), cpu_isa()});
  });
}

at::Tensor rows_forward_cpu(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                            const c10::optional<at::Tensor>& zr, const at::Tensor& targets, double ts, double tt,
                            double tr, int64_t ignore_index) {
  check_logits_and_targets(zs, zt, zr, targets);
  at::Tensor stats = new_stats(zs);
  double* S = stats.data_ptr<double>();
  with_rows(zs, zt, zr, targets, ts, tt, tr, ignore_index, [&](const auto& rows) {
    rows.for_each(
        [&](int64_t i, auto& scratch, const auto& next) {
          double row[NSTATS];
          rows.forward(i, scratch, next, row);
          store_stats(row, S, rows.n, i);
        },
        [](int64_t) {});  // masked: stats stay 0, no vocabulary pass
  });
  return stats;
}

void rows_backward_cpu(const at::Tensor& zs, const c10::optional<at::Tensor>& zt, const c10::optional<at::Tensor>& zr,
                       const at::Tensor& targets, const at::Tensor& stats, const at::Tensor& g_lp,
                       const at::Tensor& g_loss, double lam, double ts, double tt, double tr, int64_t ignore_index,
                       at::Tensor out) {
  check_logits_and_targets(zs, zt, zr, targets);
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 2 && stats.size(0) == NSTATS && stats.size(1) == zs.size(0),
              "gopd cpu backend: stats must be [", NSTATS, ", N] on CPU");
  const UpstreamGrads grads = checked_out_and_grads(zs, out, g_lp, g_loss);
  // Statistics are read in fp64 (as rows_forward writes them; fp32 stats from elsewhere are widened).
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const double* S = st.data_ptr<double>();
  with_rows(zs, zt, zr, targets, ts, tt, tr, ignore_index, [&](const auto& rows) {
    const auto target = rows.backward_target(out, grads, lam);
    rows.for_each(
        [&](int64_t i, auto& scratch, const auto&) {
          double row[NSTATS];
          load_stats(S, rows.n, i, row);
          rows.backward(i, row, target, scratch);
        },
        [&](int64_t i) { target.zero_row(i, rows.v); });
  });
}

// rows_forward, then rows_backward with the given (g_lp, g_loss), row by row: each row's backward reads
// the logits its forward has just brought into this core's cache, so the [N, V] logits are read from
// memory once instead of twice. For callers whose per-token gradients do not depend on the statistics
// (known before the forward). Returns the stats; out may be zs itself.
at::Tensor rows_forward_backward_cpu(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                                     const c10::optional<at::Tensor>& zr, const at::Tensor& targets,
                                     const at::Tensor& g_lp, const at::Tensor& g_loss, double lam, double ts, double tt,
                                     double tr, int64_t ignore_index, at::Tensor out) {
  check_logits_and_targets(zs, zt, zr, targets);
  const UpstreamGrads grads = checked_out_and_grads(zs, out, g_lp, g_loss);
  at::Tensor stats = new_stats(zs);
  double* S = stats.data_ptr<double>();
  with_rows(zs, zt, zr, targets, ts, tt, tr, ignore_index, [&](const auto& rows) {
    const auto target = rows.backward_target(out, grads, lam);
    rows.for_each(
        [&](int64_t i, auto& scratch, const auto& next) {
          double row[NSTATS];
          rows.forward(i, scratch, next, row);
          store_stats(row, S, rows.n, i);
          rows.backward(i, row, target, scratch);
        },
        [&](int64_t i) { target.zero_row(i, rows.v); });  // masked: stats stay 0, gradient 0
  });
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(gopd, CPU, m) {
  // Through the shared signatures (csrc/ops.h): a kernel that differs from them does not compile.
  m.impl("rows_forward", static_cast<gopd::RowsForwardFn*>(&rows_forward_cpu));
  m.impl("rows_backward", static_cast<gopd::RowsBackwardFn*>(&rows_backward_cpu));
  m.impl("rows_forward_backward", static_cast<gopd::RowsForwardBackwardFn*>(&rows_forward_backward_cpu));
}

}  // namespace cpu
}  // namespace gopd
