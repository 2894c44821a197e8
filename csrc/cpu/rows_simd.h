// Vectorised row kernels for fp32 / bf16 / fp16 logits (fp32 math), written once against the
// vector operations `Ops` (simd_avx2.h: 8 lanes, simd_avx512.h: 16 lanes). row_dispatch.h includes this
// file once per ISA, inside that ISA's namespace and `#pragma GCC target` region, and calls a copy
// only when the CPU has its features. No include guard on purpose.
//
// Forward, per row (the stats of the contract, laid out as stats_layout.h says):
//   pass 1  M_m = max_v z_m(v) for the three models (the row's one read from memory);
//   pass 2  with the maxima fixed (the row is now in cache; the next row is prefetched meanwhile,
//           see NextRow in row_dispatch.h), a vector of columns at a time,
//             w = exp(z'_s - M'_s),  S_m += exp(z'_m - M'_m),
//             A_ss += w (z'_s - M'_s),  A_st += w (z'_t - M'_t),  A_sr += w (z'_r - M'_r)
//           with z'_m = z_m * (1/T_m) rounded to fp32 once and M'_m = M_m * (1/T_m) (rounding is
//           monotonic, so M'_m is the max of the z'_m and the max column has z'_m - M'_m = 0 exactly).
//           Every later use (the target's log-prob, the backward) recomputes the same rounded z'_m, so
//           stats and gradients agree with each other as plain fp32 torch's do (an FMA here would
//           make the backward's z' differ from the one lse was built from, by up to an ulp of z').
//   then    lse_m = M'_m + log S_m,  E_S = A_ss / S_s - log S_s,  E_m = A_sm / S_s - log S_m.
// Fixing the maxima first keeps the online rescaling of the generic kernel out of the inner loop,
// which is three exps, a compare and a few adds / FMAs per vector of columns.
// Sums are fp32 vectors over blocks of kBlockCols columns, added to fp64 row totals: the fp32
// rounding error grows with kBlockCols / kWidth, not with V. A column with w = 0 (z_s = -inf) adds
// nothing to the A's (masked, never 0 * -inf). The ragged tail (V mod kWidth columns) is padded
// with -inf, which adds nothing to any sum or max.
//
// Statistics are written in fp64; the backward takes each lse as two floats (hi + lo) and computes
// (z' - hi) - lo, which is exact where it matters (z' near the top of the row, hi ~ z').
//
// Backward, per row, zero where p(v) = 0, with p = exp(z'_s - lse_s),
//   c = (z'_s - lse_s) - ct (z'_t - lse_t) - cr (z'_r - lse_r), a = g_loss / T_s,
//   so out(v) = p(v) (a (c(v) - L) - g_lp / T_s), L = sum_v p c (summed by the backward itself);
//   the target column gets + g_lp / T_s.
// Entries below kTinyGrad<float> = 2^-100 in magnitude are written as 0 (rows_generic.h, zero_if_tiny, says why).

using Vec = Ops::Vec;
constexpr int W = Ops::kWidth;
constexpr int64_t kBlockCols = 1024;

template <typename scalar_t>
GOPD_INLINE Vec load_tail(const scalar_t* p, int64_t n) {
  alignas(64) float buf[W];
  for (int j = 0; j < W; ++j) buf[j] = j < n ? static_cast<float>(p[j]) : -std::numeric_limits<float>::infinity();
  return Ops::load(static_cast<const float*>(buf));
}

template <typename scalar_t>
GOPD_INLINE void store_tail(scalar_t* o, Vec g, int64_t n) {
  alignas(64) float buf[W];
  Ops::store(static_cast<float*>(buf), g);
  for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(buf[j]);
}

// Sum of the lanes, pairwise, in fp64.
GOPD_INLINE double hsum(Vec v) {
  alignas(64) float b[W];
  Ops::store(static_cast<float*>(b), v);
  double d[W];
  for (int j = 0; j < W; ++j) d[j] = b[j];
  for (int w = W / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) d[j] += d[j + w];
  return d[0];
}

template <typename scalar_t>
GOPD_INLINE float row_max(const scalar_t* z, int64_t v) {
  Vec m0 = Ops::set1(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t j = 0;
  for (; j + 2 * W <= v; j += 2 * W) {
    m0 = Ops::max(m0, Ops::load(z + j));
    m1 = Ops::max(m1, Ops::load(z + j + W));
  }
  for (; j + W <= v; j += W) m0 = Ops::max(m0, Ops::load(z + j));
  if (j < v) m0 = Ops::max(m0, load_tail(z + j, v - j));
  return Ops::hmax(Ops::max(m0, m1));
}

// M' = max / T; an all -inf row uses 0 (its sums are then 0, as in the generic kernel) so that no
// -inf - -inf NaN appears inside the loop.
GOPD_INLINE float shift_of(float mx, float inv_t) {
  return mx == -std::numeric_limits<float>::infinity() ? 0.0f : mx * inv_t;
}

// acc[0..2] = S_s, S_t, S_r; acc[3..5] = A_ss, A_st, A_sr.
template <bool HT, bool HR, bool TAIL, typename scalar_t>
GOPD_INLINE void accumulate(const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, int64_t j, int64_t n, Vec its,
                            Vec itt, Vec itr, Vec ms, Vec mt, Vec mr, Vec* acc) {
  const Vec ds = Ops::sub(Ops::mul(TAIL ? load_tail(zs + j, n) : Ops::load(zs + j), its), ms);
  const Vec w = Ops::exp(ds);
  acc[0] = Ops::add(acc[0], w);
  acc[3] = Ops::add_prod_where_nonzero(acc[3], w, ds);
  if (HT) {
    const Vec dt = Ops::sub(Ops::mul(TAIL ? load_tail(zt + j, n) : Ops::load(zt + j), itt), mt);
    acc[1] = Ops::add(acc[1], Ops::exp(dt));
    acc[4] = Ops::add_prod_where_nonzero(acc[4], w, dt);
  }
  if (HR) {
    const Vec dr = Ops::sub(Ops::mul(TAIL ? load_tail(zr + j, n) : Ops::load(zr + j), itr), mr);
    acc[2] = Ops::add(acc[2], Ops::exp(dr));
    acc[5] = Ops::add_prod_where_nonzero(acc[5], w, dr);
  }
}

template <bool HT, bool HR, typename scalar_t>
void row_sums(const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, int64_t v, float its, float itt, float itr,
              float ms, float mt, float mr, double* s, const NextRow<scalar_t>& next) {
  const Vec vits = Ops::set1(its), vitt = Ops::set1(itt), vitr = Ops::set1(itr);
  const Vec vms = Ops::set1(ms), vmt = Ops::set1(mt), vmr = Ops::set1(mr);
  for (int64_t start = 0; start < v; start += kBlockCols) {
    const int64_t end = std::min(v, start + kBlockCols);
    Vec acc[6];
    for (auto& a : acc) a = Ops::zero();
    int64_t j = start;
    for (; j + W <= end; j += W) {
      next.fetch(j);
      accumulate<HT, HR, false>(zs, zt, zr, j, W, vits, vitt, vitr, vms, vmt, vmr, acc);
    }
    if (j < end) accumulate<HT, HR, true>(zs, zt, zr, j, end - j, vits, vitt, vitr, vms, vmt, vmr, acc);
    for (int k = 0; k < 6; ++k) s[k] += hsum(acc[k]);
  }
}

// The nine stats of one valid row, in fp64 (zt / zr may be nullptr: their stats are left untouched).
template <typename scalar_t>
void forward_row(const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, int64_t v, int64_t y, float its,
                 float itt, float itr, double* st, const NextRow<scalar_t>& next) {
  const bool ht = zt != nullptr, hr = zr != nullptr;
  const float ms = shift_of(row_max(zs, v), its);
  const float mt = ht ? shift_of(row_max(zt, v), itt) : 0.0f;
  const float mr = hr ? shift_of(row_max(zr, v), itr) : 0.0f;
  double s[6] = {0, 0, 0, 0, 0, 0};
  if (ht && hr) row_sums<true, true>(zs, zt, zr, v, its, itt, itr, ms, mt, mr, s, next);
  else if (ht) row_sums<true, false>(zs, zt, zr, v, its, itt, itr, ms, mt, mr, s, next);
  else if (hr) row_sums<false, true>(zs, zt, zr, v, its, itt, itr, ms, mt, mr, s, next);
  else row_sums<false, false>(zs, zt, zr, v, its, itt, itr, ms, mt, mr, s, next);
  const double log_ss = std::log(s[0]);
  st[LSE_S] = ms + log_ss;
  st[LP_S] = static_cast<double>(static_cast<float>(zs[y]) * its - ms) - log_ss;
  st[E_S] = s[3] / s[0] - log_ss;
  if (ht) {
    const double log_st = std::log(s[1]);
    st[LSE_T] = mt + log_st;
    st[LP_T] = static_cast<double>(static_cast<float>(zt[y]) * itt - mt) - log_st;
    st[E_T] = s[4] / s[0] - log_st;
  }
  if (hr) {
    const double log_sr = std::log(s[2]);
    st[LSE_R] = mr + log_sr;
    st[LP_R] = static_cast<double>(static_cast<float>(zr[y]) * itr - mr) - log_sr;
    st[E_R] = s[5] / s[0] - log_sr;
  }
}

// The gradient of one row from its coefficients b (rows_generic.h, BackwardRow: each lse_m as hi + lo,
// the fp64 statistic split into two floats, so z' - lse keeps its low bits) and the teacher's and
// reference's 1 / T.
template <bool UT, bool UR, typename scalar_t>
void backward_row_impl(const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, scalar_t* out, int64_t v,
                       int64_t y, const BackwardRow<float>& b, float inv_tt, float inv_tr) {
  const float a_s = b.g_loss * b.inv_ts, g_lp_s = b.g_lp * b.inv_ts;  // g_loss / T_s, g_lp / T_s
  const Vec its = Ops::set1(b.inv_ts), itt = Ops::set1(inv_tt), itr = Ops::set1(inv_tr);
  const Vec ls = Ops::set1(b.lse_s), lt = Ops::set1(b.lse_t), lr = Ops::set1(b.lse_r);
  const Vec ls_lo = Ops::set1(b.lo_s), lt_lo = Ops::set1(b.lo_t), lr_lo = Ops::set1(b.lo_r);
  const Vec ct = Ops::set1(b.ct), cr = Ops::set1(b.cr), a = Ops::set1(a_s);
  auto log_p_and_c = [&](Vec xs, Vec xt, Vec xr, Vec& p) GOPD_LAMBDA_INLINE {
    const Vec lp = Ops::sub(Ops::sub(Ops::mul(xs, its), ls), ls_lo);
    p = Ops::exp(lp);
    Vec c = lp;
    if (UT) c = Ops::fnmadd(ct, Ops::sub(Ops::sub(Ops::mul(xt, itt), lt), lt_lo), c);
    if (UR) c = Ops::fnmadd(cr, Ops::sub(Ops::sub(Ops::mul(xr, itr), lr), lr_lo), c);
    return c;
  };
  const Vec zero = Ops::zero();
  // L = sum_v p(v) c(v) from this pass's own p and c (a first sweep over the row, from cache), not
  // from the forward's sums: c - L is then exactly consistent, as in a log-softmax backward, and a
  // one-hot row gets an exactly zero loss gradient however large its logits.
  float loss = 0.0f;
  if (a_s != 0.0f) {
    double pc = 0.0;
    for (int64_t start = 0; start < v; start += kBlockCols) {
      const int64_t end = std::min(v, start + kBlockCols);
      Vec acc = zero;
      int64_t j = start;
      for (; j + W <= end; j += W) {
        Vec p;
        const Vec c = log_p_and_c(Ops::load(zs + j), UT ? Ops::load(zt + j) : zero, UR ? Ops::load(zr + j) : zero, p);
        acc = Ops::add_prod_where_nonzero(acc, p, c);
      }
      if (j < end) {
        const int64_t n = end - j;
        Vec p;
        const Vec c = log_p_and_c(load_tail(zs + j, n), UT ? load_tail(zt + j, n) : zero,
                                  UR ? load_tail(zr + j, n) : zero, p);
        acc = Ops::add_prod_where_nonzero(acc, p, c);
      }
      pc += hsum(acc);
    }
    loss = static_cast<float>(pc);
  }
  const Vec lv = Ops::set1(loss), glp = Ops::set1(g_lp_s);
  // a (c - L) - g_lp / T_s, with c - L formed first: folding a L + g_lp / T_s into one constant
  // would round away the small difference left on a near one-hot row.
  auto grad = [&](Vec xs, Vec xt, Vec xr) GOPD_LAMBDA_INLINE {
    Vec p;
    const Vec c = log_p_and_c(xs, xt, xr, p);
    return Ops::zero_if_tiny(Ops::mul_where_nonzero(p, Ops::fmsub(a, Ops::sub(c, lv), glp)));
  };
  auto at = [](const scalar_t* z, int64_t i) { return Ops::set1(z == nullptr ? 0.0f : static_cast<float>(z[i])); };
  // The target column is computed first in fp32 and written last: out may alias zs, and adding
  // g_lp / T_s after a round to bf16 would round twice.
  const float g_y = zero_if_tiny(Ops::first(grad(at(zs, y), at(zt, y), at(zr, y))) + g_lp_s);
  int64_t j = 0;
  // Every vector is loaded before the store of the same columns: out may alias zs.
  for (; j + W <= v; j += W) {
    const Vec xs = Ops::load(zs + j);
    const Vec xt = UT ? Ops::load(zt + j) : zero;
    const Vec xr = UR ? Ops::load(zr + j) : zero;
    Ops::store(out + j, grad(xs, xt, xr));
  }
  if (j < v) {
    const int64_t n = v - j;
    const Vec xs = load_tail(zs + j, n);
    const Vec xt = UT ? load_tail(zt + j, n) : zero;
    const Vec xr = UR ? load_tail(zr + j, n) : zero;
    store_tail(out + j, grad(xs, xt, xr), n);
  }
  out[y] = static_cast<scalar_t>(g_y);
}

// A teacher / reference term runs only where it is kept and g_loss reaches it.
template <typename scalar_t>
void backward_row(const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, scalar_t* out, int64_t v, int64_t y,
                  const BackwardRow<float>& b, float inv_tt, float inv_tr) {
  const bool with_loss = b.g_loss != 0;
  const bool use_t = with_loss && b.use_t, use_r = with_loss && b.use_r;
  if (use_t && use_r) backward_row_impl<true, true>(zs, zt, zr, out, v, y, b, inv_tt, inv_tr);
  else if (use_t) backward_row_impl<true, false>(zs, zt, zr, out, v, y, b, inv_tt, inv_tr);
  else if (use_r) backward_row_impl<false, true>(zs, zt, zr, out, v, y, b, inv_tt, inv_tr);
  else backward_row_impl<false, false>(zs, zt, zr, out, v, y, b, inv_tt, inv_tr);
}
