// The vector operations rows_simd.h is written against, for AVX2 + FMA + F16C (8 fp32 lanes).
// Included by row_dispatch.h inside `namespace avx2` and a matching `#pragma GCC target` region; no include
// guard on purpose (each ISA namespace gets its own copy).
struct Ops {
  using Vec = __m256;
  static constexpr int kWidth = 8;

  GOPD_INLINE static Vec set1(float x) { return _mm256_set1_ps(x); }
  GOPD_INLINE static Vec zero() { return _mm256_setzero_ps(); }
  GOPD_INLINE static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  GOPD_INLINE static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  GOPD_INLINE static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  GOPD_INLINE static Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  GOPD_INLINE static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c
  GOPD_INLINE static Vec fmsub(Vec a, Vec b, Vec c) { return _mm256_fmsub_ps(a, b, c); }    // a b - c
  GOPD_INLINE static Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  // x where w != 0 (NaN included), else +0: 0 * -inf never reaches a sum, a NaN w does.
  GOPD_INLINE static Vec where_nonzero(Vec w, Vec x) { return _mm256_and_ps(_mm256_cmp_ps(w, zero(), _CMP_NEQ_UQ), x); }
  // w x where w != 0 (NaN included), else +0.
  GOPD_INLINE static Vec mul_where_nonzero(Vec w, Vec x) { return mul(w, where_nonzero(w, x)); }
  // x, or +0 where |x| < kTinyGrad<float> (rows_generic.h); NaN and inf are kept (unordered compare).
  GOPD_INLINE static Vec zero_if_tiny(Vec x) {
    const Vec mag = _mm256_andnot_ps(set1(-0.0f), x);
    return _mm256_and_ps(_mm256_cmp_ps(mag, set1(kTinyGrad<float>), _CMP_NLT_UQ), x);
  }
  // acc + w x where w != 0 (NaN included), else acc (x is zeroed first, so a -inf x never meets w = 0).
  GOPD_INLINE static Vec add_prod_where_nonzero(Vec acc, Vec w, Vec x) { return fmadd(w, where_nonzero(w, x), acc); }

#include "cpu/simd_exp_poly.h"

  // e^x, |error| about 1 ulp: x = n ln2 + r, e^r from exp_reduced (simd_exp_poly.h), 2^n from
  // the exponent bits. x < -87.3 (incl. -inf) gives exactly 0; NaN stays NaN: max(lo, x) and
  // min(hi, .) return their second operand, x, for a NaN x, and the NLT_UQ compare keeps unordered
  // lanes.
  GOPD_INLINE static Vec exp(Vec x) {
    const Vec lo = set1(-87.33654f);
    const Vec xc = _mm256_min_ps(set1(88.0f), _mm256_max_ps(lo, x));
    const Vec n = _mm256_round_ps(mul(xc, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const Vec y = exp_reduced(xc, n);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_NLT_UQ), mul(y, _mm256_castsi256_ps(bits)));
  }

  GOPD_INLINE static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  GOPD_INLINE static Vec load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  GOPD_INLINE static Vec load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

  GOPD_INLINE static void store(float* o, Vec g) { _mm256_storeu_ps(o, g); }
  GOPD_INLINE static void store(c10::Half* o, Vec g) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm256_cvtps_ph(g, _MM_FROUND_TO_NEAREST_INT));
  }
  GOPD_INLINE static void store(c10::BFloat16* o, Vec g) {
    // Round to nearest even on the upper 16 bits; NaN becomes the canonical quiet NaN.
    const __m256i b = _mm256_castps_si256(g);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(g, g, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm256_castsi256_si128(packed));
  }

  GOPD_INLINE static float first(Vec v) { return _mm256_cvtss_f32(v); }
  GOPD_INLINE static float hmax(Vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
};
