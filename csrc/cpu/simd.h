// Small SIMD layer for the fastlm CPU kernels: one float vector type whose width follows the build target
// (16 lanes with AVX-512, 8 with AVX/AVX2, 4 otherwise), written with GCC/Clang vector extensions so that one source
// serves every target. FMA and dtype conversions use intrinsics where the target has them (the build passes
// -ffp-contract=off, so a * b + c is rounded twice as written and fused multiply-adds are spelled out as vfma).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <utility>
#include <vector>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastlm_cpu {

#if defined(__AVX512F__)
#define FASTLM_VEC_BYTES 64
#elif defined(__AVX__)
#define FASTLM_VEC_BYTES 32
#else
#define FASTLM_VEC_BYTES 16
#endif

constexpr int kW = FASTLM_VEC_BYTES / 4;  // float lanes per vector

typedef float vfloat __attribute__((vector_size(FASTLM_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(FASTLM_VEC_BYTES)));
// Unaligned, aliasing-safe views for loads and stores from plain float arrays.
typedef float vfloat_u __attribute__((vector_size(FASTLM_VEC_BYTES), aligned(4), may_alias));
typedef uint16_t vhalf_u __attribute__((vector_size(FASTLM_VEC_BYTES / 2), aligned(2), may_alias));
typedef uint16_t vu16 __attribute__((vector_size(FASTLM_VEC_BYTES / 2)));
typedef uint32_t vu32 __attribute__((vector_size(FASTLM_VEC_BYTES)));

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vfloat vset1(float s) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(s);
#elif defined(__AVX__)
  return _mm256_set1_ps(s);
#else
  return vfloat{} + s;  // (0 + -0 = +0 here, harmless for every use)
#endif
}
inline vfloat vload(const float* p) { return *reinterpret_cast<const vfloat_u*>(p); }
inline void vstore(float* p, vfloat v) { *reinterpret_cast<vfloat_u*>(p) = v; }

// a * b + c with one rounding where the target has FMA.
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// The scalar a * b + c rounded as vfma rounds it (once with FMA, twice without): a dot product written with it
// matches, bit for bit, a tile product's lane that sums the same terms in the same order.
inline float sfma(float a, float b, float c) {
#if defined(__AVX512F__) || defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Makes v opaque to the optimizer so that it stays in a register: without it GCC re-loads a vector operand for
// every FMA that uses it (twice the loads of a dot-product loop, which then runs load-bound).
inline void keep_in_register(vfloat& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__SSE__)
  asm("" : "+x"(v));
#endif
}

inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline float hsum(vfloat v) {
  // pairwise halving: log2(kW) vector adds instead of kW scalar ones (the AVX form adds in the same order)
#if defined(__AVX__) && !defined(__AVX512F__)
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#else
  float buf[kW];
  std::memcpy(buf, &v, sizeof(buf));
  for (int w = kW / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) buf[i] += buf[i + w];
  return buf[0];
#endif
}

// out[0..3] = the horizontal sums of a0..a3 (one transpose-and-add tree with AVX instead of four reductions).
inline void hsum4(vfloat a0, vfloat a1, vfloat a2, vfloat a3, float* out) {
#if defined(__AVX512F__)
  // per 128-bit lane: pairs of a0/a1 and a2/a3 interleaved and added, then one lane of four partial sums
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1));  // (AVX512F, not DQ)
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), hi);
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#elif defined(__AVX__)
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit half
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
#else
  out[0] = hsum(a0), out[1] = hsum(a1), out[2] = hsum(a2), out[3] = hsum(a3);
#endif
}

// 2^x for x <= 126, accurate to about 1 ulp; exactly 0 for x < -126 (including -inf), NaN stays NaN.
// Round x to n + f with |f| <= 1/2, evaluate 2^f by its degree-7 Taylor polynomial (truncation error < 6e-9
// relative), and put n into the exponent: with AVX-512 by VSCALEFPS (12 instructions a vector), otherwise by adding
// it to the exponent field (19); both give the same bits.
inline vfloat vexp2(vfloat x) {
  constexpr float kCoef[8] = {1.0f, 6.931471805599453e-01f, 2.402265069591007e-01f, 5.550410866482158e-02f,
                              9.618129107628477e-03f, 1.3333558146428443e-03f, 1.5403530393381606e-04f,
                              1.525273380405984e-05f};
#if defined(__AVX512F__)
  // VMINPS returns its second operand, x, for a NaN; NaN compares "not less than" -126, so it is kept
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(126.0f), x);
  const __mmask16 keep = _mm512_cmp_ps_mask(xc, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(kCoef[7]);
  for (int k = 6; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kCoef[k]));
  return _mm512_maskz_scalef_ps(keep, p, n);
#else
  const vint underflow = x < vset1(-126.0f);
  x = x < vset1(-126.0f) ? vset1(-126.0f) : x;  // clamps written so that NaN passes (a max / min would drop it)
  x = x > vset1(126.0f) ? vset1(126.0f) : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
  const vfloat t = x + vset1(magic);
  const vfloat n = t - vset1(magic);
  const vfloat f = x - n;
  vfloat p = vset1(kCoef[7]);
  for (int k = 6; k >= 0; --k) p = vfma(p, f, vset1(kCoef[k]));
  int32_t magic_bits;
  std::memcpy(&magic_bits, &magic, 4);
  const vint ni = (vint)t - magic_bits;  // vector casts reinterpret bits
  const vint scale_bits = (ni + 127) << 23;
  const vfloat r = p * (vfloat)scale_bits;
  return (vfloat)((vint)r & ~underflow);
#endif
}

// The logistic 1 / (1 + 2^x) for any x: exactly 0 where 2^x overflows (vexp2 stops at 2^126), NaN for NaN.
inline vfloat vlogistic2(vfloat x) {
  const vfloat r = vset1(1.0f) / (vset1(1.0f) + vexp2(x));
  return x > vset1(126.0f) ? vset1(0.0f) : r;
}

// The lane-wise maximum with NaN kept: a NaN in either operand gives NaN (vmax keeps its second operand then).
inline vfloat vmax_nan(vfloat a, vfloat b) { return a > b || a != a ? a : b; }

// ---- element conversions -----------------------------------------------------------------------------------------

// Calls f with a value of the C++ type of a float32, bfloat16 or float16 dtype (the kernels' dispatch; callers have
// checked the dtype is one of the three).
template <typename F>
void with_float_type(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f(float{});
    case c10::ScalarType::BFloat16:
      return f(c10::BFloat16{});
    default:
      return f(c10::Half{});
  }
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }

// kW consecutive elements of type T as a float vector.
inline vfloat vload_cvt(const float* p) { return vload(p); }

inline vfloat vload_cvt(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: zero-extend and shift. Spelled with intrinsics where the target has them:
  // GCC compiles the generic form to half-width extensions plus an insert (five instructions instead of two).
#if defined(__AVX512F__)
  return (vfloat)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
  return (vfloat)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  const vu16 h = *reinterpret_cast<const vhalf_u*>(p);
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  return (vfloat)w;
#endif
}

inline vfloat vload_cvt(const c10::Half* p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vfloat v;
  for (int i = 0; i < kW; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// v rounded to T (to nearest even, as c10's conversions round) and stored as kW consecutive elements.
inline void vstore_cvt(float* p, vfloat v) { vstore(p, v); }

inline void vstore_cvt(c10::BFloat16* p, vfloat v) {
  // round the low 16 bits away, ties to even; NaN becomes the quiet NaN 0x7fc0, as in c10::BFloat16(float)
  const vu32 u = (vu32)v;
  const vu32 nan = (vu32)(v != v);
  const vu32 r = (((u + ((u >> 16) & 1u) + 0x7fffu) >> 16) & ~nan) | (0x7fc0u & nan);
  *reinterpret_cast<vhalf_u*>(p) = __builtin_convertvector(r, vu16);
}

inline void vstore_cvt(c10::Half* p, vfloat v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < kW; ++i) p[i] = static_cast<c10::Half>(v[i]);
#endif
}

#if defined(__AVX512F__)
// r[i] = element c of each row becomes row c: the 16 x 16 block of 32-bit elements transposed in registers
// (unpacks of 32- and 64-bit elements within 128-bit lanes, then two rounds of 128-bit lane shuffles; 64 shuffles).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c]: lane k holds rows i .. i + 3 of column 4k + c
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v01 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v23 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i w01 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44),
                  w23 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(v01, w01, 0x88), t[4 + c] = _mm512_shuffle_i32x4(v01, w01, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(v23, w23, 0x88), t[12 + c] = _mm512_shuffle_i32x4(v23, w23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

// The kW x kW block of rows src + r * lds (r < kW, elements of type T) widened and stored transposed:
// dst[c * ldd + r] = src[r * lds + c]. With AVX, kW whole-row loads and one 8 x 8 shuffle network in registers
// (24 shuffles and 8 whole-vector stores, against 64 scalar loads and stores); with AVX-512 the 16 x 16 one.
template <typename T>
inline void transpose_block(const T* src, int64_t lds, float* dst, int64_t ldd) {
#if defined(__AVX512F__)
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = (__m512i)vload_cvt(src + i * lds);
  transpose16(r);
  for (int c = 0; c < 16; ++c) vstore(dst + c * ldd, (vfloat)r[c]);
#elif defined(__AVX__)
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = vload_cvt(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + c] = column c (and c + 4 in the upper half) of rows i .. i + 3
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    vstore(dst + c * ldd, _mm256_permute2f128_ps(u[c], u[c + 4], 0x20));
    vstore(dst + (c + 4) * ldd, _mm256_permute2f128_ps(u[c], u[c + 4], 0x31));
  }
#else
  for (int r = 0; r < kW; ++r)
    for (int c = 0; c < kW; ++c) dst[c * ldd + r] = to_float(src[r * lds + c]);
#endif
}

// Up to kW elements (a row's tail when n < kW): n elements of type T as a float vector whose other lanes hold pad,
// and the first n lanes of v stored (rounded as vstore_cvt rounds); whole vectors when n == kW.
template <typename T>
inline vfloat vload_cvt_n(const T* p, int64_t n, float pad = 0.0f) {
  if (n >= kW) return vload_cvt(p);
  float buf[kW];
  for (int i = 0; i < kW; ++i) buf[i] = i < n ? to_float(p[i]) : pad;
  return vload(buf);
}

template <typename T>
inline void vstore_cvt_n(T* p, vfloat v, int64_t n) {
  if (n >= kW) return vstore_cvt(p, v);
  float buf[kW];
  vstore(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = from_float<T>(buf[i]);
}

// An allocator aligned to a cache line: malloc aligns to 16 bytes, so a buffer's whole-vector accesses would straddle
// two lines in turn (a 32- or 64-byte access that splits costs two; the attention kernels' tiles ran 1-3 % slower so).
// Elements are default-initialized, as by new T[n]: a vector of n floats is NOT zeroed (its user writes it first;
// a scratch panel of megabytes is not filled twice), only vector(n, value) sets them.
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    if constexpr (sizeof...(Args) == 0)
      ::new (static_cast<void*>(p)) U;
    else
      ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  bool operator==(const LineAligned&) const { return true; }
  bool operator!=(const LineAligned&) const { return false; }
};
using Floats = std::vector<float, LineAligned<float>>;

// Asks for the cache lines of a row of D elements ahead of use: into L1 (Locality 3) or only as far as L2 (2).
template <int Locality = 3, typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * int64_t(sizeof(T)); off += 64) __builtin_prefetch(bytes + off, 0, Locality);
}

// Elements per parallel task of the row-wise kernels (norms, RoPE, cross-entropy): below that, threads cost more
// than they save.
constexpr int64_t kGrainElems = 16384;

// acc[u] = f(acc[u], v) over the vectors v of row p[0..n), the lanes past the row's end loaded as pad: four
// accumulators (the caller's starting values) keep the pipeline busy and each chain a quarter as long.
template <typename T, typename F>
inline void row_fold(const T* p, int64_t n, float pad, vfloat (&acc)[4], F f) {
  int64_t c = 0;
  for (; c + 4 * kW <= n; c += 4 * kW)
    for (int u = 0; u < 4; ++u) acc[u] = f(acc[u], vload_cvt(p + c + u * kW));
  for (; c + kW <= n; c += kW) acc[0] = f(acc[0], vload_cvt(p + c));
  if (c < n) acc[1] = f(acc[1], vload_cvt_n(p + c, n - c, pad));
}

// The horizontal sum of row_fold from zeros.
template <typename T, typename F>
inline float row_sum(const T* p, int64_t n, float pad, F f) {
  vfloat acc[4] = {};
  row_fold(p, n, pad, acc, f);
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

}  // namespace fastlm_cpu
