// The part of e^x both ISAs share, included inside each `struct Ops` after its arithmetic members
// (set1, mul, add, fmadd, fnmadd): with n = round(x / ln2), r = x - n ln2 (ln2 split in two, so r is
// exact for |n| < 2^10), returns e^r by a degree-7 polynomial, |r| <= ln2 / 2, about 1 ulp
// (Cephes' expf constants). The caller rounds n and applies 2^n its own way. No include guard on
// purpose (each Ops gets its own copy).
GOPD_INLINE static Vec exp_reduced(Vec xc, Vec n) {
  Vec r = fnmadd(n, set1(0.693359375f), xc);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  Vec p = set1(1.9875691500e-4f);
  p = fmadd(p, r, set1(1.3981999507e-3f));
  p = fmadd(p, r, set1(8.3334519073e-3f));
  p = fmadd(p, r, set1(4.1665795894e-2f));
  p = fmadd(p, r, set1(1.6666665459e-1f));
  p = fmadd(p, r, set1(5.0000001201e-1f));
  return add(fmadd(mul(p, r), r, r), set1(1.0f));
}
