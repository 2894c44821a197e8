// The vector operations rows_simd.h is written against, for AVX-512 F/BW/VL/DQ (16 fp32 lanes).
// Included by row_dispatch.h inside `namespace avx512` and a matching `#pragma GCC target` region; no
// include guard on purpose (each ISA namespace gets its own copy).
struct Ops {
  using Vec = __m512;
  static constexpr int kWidth = 16;

  GOPD_INLINE static Vec set1(float x) { return _mm512_set1_ps(x); }
  GOPD_INLINE static Vec zero() { return _mm512_setzero_ps(); }
  GOPD_INLINE static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  GOPD_INLINE static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  GOPD_INLINE static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  GOPD_INLINE static Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  GOPD_INLINE static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
  GOPD_INLINE static Vec fmsub(Vec a, Vec b, Vec c) { return _mm512_fmsub_ps(a, b, c); }    // a b - c
  GOPD_INLINE static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
  // x where w != 0 (NaN included), else +0: 0 * -inf never reaches a sum, a NaN w does.
  GOPD_INLINE static Vec where_nonzero(Vec w, Vec x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(w, zero(), _CMP_NEQ_UQ), x); }
  // w x where w != 0 (NaN included), else +0: one masked multiply.
  GOPD_INLINE static Vec mul_where_nonzero(Vec w, Vec x) { return _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(w, zero(), _CMP_NEQ_UQ), w, x); }
  // x, or +0 where |x| < kTinyGrad<float> (rows_generic.h); NaN and inf are kept (unordered compare).
  GOPD_INLINE static Vec zero_if_tiny(Vec x) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_andnot_ps(set1(-0.0f), x), set1(kTinyGrad<float>), _CMP_NLT_UQ), x);
  }
  // acc + w x where w != 0 (NaN included), else acc: one masked FMA (the compare is shared by the compiler across calls with one w).
  GOPD_INLINE static Vec add_prod_where_nonzero(Vec acc, Vec w, Vec x) {
    return _mm512_mask3_fmadd_ps(w, x, acc, _mm512_cmp_ps_mask(w, zero(), _CMP_NEQ_UQ));
  }

#include "cpu/simd_exp_poly.h"

  // e^x with the shared reduction and polynomial (simd_exp_poly.h), 16 lanes; 2^n applied by scalef, which
  // also gives 0 / inf at the ends of the range, so there is no upper clamp and no exponent-bit
  // arithmetic. x < -87.3 (incl. -inf) gives exactly 0, as in simd_avx2.h; NaN stays NaN: max(lo, x)
  // returns x for a NaN x, and the NLT_UQ compare keeps unordered lanes.
  GOPD_INLINE static Vec exp(Vec x) {
    const Vec lo = set1(-87.33654f);
    const Vec xc = _mm512_max_ps(lo, x);
    const Vec n = _mm512_roundscale_ps(mul(xc, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Vec y = exp_reduced(xc, n);
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y, n);
  }

  GOPD_INLINE static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  GOPD_INLINE static Vec load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  GOPD_INLINE static Vec load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

  GOPD_INLINE static void store(float* o, Vec g) { _mm512_storeu_ps(o, g); }
  GOPD_INLINE static void store(c10::Half* o, Vec g) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT));
  }
  GOPD_INLINE static void store(c10::BFloat16* o, Vec g) {
    // Round to nearest even on the upper 16 bits; NaN becomes the canonical quiet NaN.
    const __m512i b = _mm512_castps_si512(g);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(g, g, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(r));
  }

  GOPD_INLINE static float first(Vec v) { return _mm512_cvtss_f32(v); }
  GOPD_INLINE static float hmax(Vec v) { return _mm512_reduce_max_ps(v); }
};
