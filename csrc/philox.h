// The noise of the contract (ddim_fast/reference.py, ddim_fast/layout.py): Philox4x32-10
// (Salmon et al., SC'11; Random123's constants) and Box-Muller, as triton's randn4x.
//
//     z at (seed, global sample n, step k, element j of the sample, stream s)
//       = output j % 4 of Philox4x32-10(counter (j / 4, n mod 2^32, k, s + (n >> 32) << STREAM_BITS),
//                                       key (seed_lo, seed_hi)),
//         u = float(r >= 0 ? r : ~r) * 4.6566127342e-10f   (r as int32),
//         (z0, z1) = BoxMuller(u0, u1), (z2, z3) = BoxMuller(u2, u3).
//
// Two paths that give the same bits: plain C++ that gcc vectorizes (normals_portable, ~1.5 ns
// per normal per core with AVX-512), and hand-written AVX-512 (normals_avx512, ~0.9 ns), picked
// at load time; torch.randn takes ~3.4 ns. log, sin and cos are written out (fdlibm's logf;
// sin/cos by quadrant reduction and cephes' polynomials) because libm's scalar calls do not
// vectorize. They are within ~1 float32 ulp, so the noise is within ~1e-6 of reference.gaussian.
//
// Included by ddim_step.cpp only (inside its anonymous namespace); needs DDIM_INLINE.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // Weyl key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

struct NoiseKey {
  uint32_t k0, k1;        // seed & 0xffffffff, seed >> 32
  uint32_t step;          // counter word 2
  uint32_t stream;        // low bits of counter word 3 (DDIM_STREAM_X_T / DDIM_STREAM_STEP)
  int64_t sample_offset;  // global index of sample 0 of the batch (seed[1])
};

// Counters (g0 + i, c1, step, c3) for i in [0, G): r0 -> a[i], r1 -> b[i], r2 -> a[G + i],
// r3 -> b[G + i], so that the Box-Muller pairs (r0, r1) and (r2, r3) are runs of 2G pairs.
DDIM_INLINE void philox_groups(uint32_t g0, int64_t G, uint32_t c1_in, uint32_t c3_in, const NoiseKey& key,
                               uint32_t* a, uint32_t* b) {
  for (int64_t i = 0; i < G; ++i) {
    uint32_t c0 = g0 + static_cast<uint32_t>(i), c1 = c1_in, c2 = key.step, c3 = c3_in;
    uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
    for (int r = 0; r < 10; ++r) {
      const uint64_t pb = static_cast<uint64_t>(c2) * kPhiloxRoundB;
      const uint64_t pa = static_cast<uint64_t>(c0) * kPhiloxRoundA;
      const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(pb);
      c3 = static_cast<uint32_t>(pa);
      c0 = n0;
      c2 = n2;
      k0 += kPhiloxKeyA;
      k1 += kPhiloxKeyB;
    }
    a[i] = c0;
    b[i] = c1;
    a[G + i] = c2;
    b[G + i] = c3;
  }
}

DDIM_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

DDIM_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Triton's uint_to_uniform_float: the word as int32, negative ones mirrored (~r), times 2^-31.
DDIM_INLINE float uniform(uint32_t r) {
  const int32_t s = static_cast<int32_t>(r);
  return static_cast<float>(s < 0 ? ~s : s) * 4.6566127342e-10f;
}

// Natural log for normal positive floats (fdlibm/musl logf, < 1 ulp):
// x = 2^k (1 + f), 1 + f in [sqrt(2)/2, sqrt(2)), log(1 + f) = 2 atanh(s), s = f / (2 + f).
DDIM_INLINE float log_positive(float x) {
  constexpr float ln2_hi = 6.9313812256e-01f, ln2_lo = 9.0580006145e-06f;
  constexpr float Lg1 = 0.66666662693f, Lg2 = 0.40000972152f, Lg3 = 0.28498786688f, Lg4 = 0.24279078841f;
  uint32_t ix = float_to_bits(x);
  ix += 0x3f800000u - 0x3f3504f3u;
  const int32_t k = static_cast<int32_t>(ix >> 23) - 0x7f;
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = bits_to_float(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * std::fma(w, Lg4, Lg2);
  const float t2 = z * std::fma(w, Lg3, Lg1);
  const float R = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  return std::fma(dk, ln2_hi, (std::fma(s, hfsq + R, dk * ln2_lo) - hfsq) + f);
}

// sin and cos of th in [0, 2 pi] to ~0.6 ulp. Quadrant q = round(th 2/pi); y = th - q pi/2 is
// carried as y1 + c (y1 = th - q float(pi/2) is exact under FMA, c = -q (pi/2 - float(pi/2))),
// then cephes' sinf/cosf minimax polynomials on [-pi/4, pi/4] with 1 - y^2/2 carried exactly.
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kTwoOverPiF = 0.636619746685028076171875f;
constexpr float kPio2F = 1.57079637050628662109375f;  // float(pi/2), above pi/2
constexpr float kPio2Rest = -4.371139006309477e-08f;  // pi/2 - kPio2F
constexpr float kS1 = -1.6666654611e-1f, kS2 = 8.3321608736e-3f, kS3 = -1.9515295891e-4f;
constexpr float kC1 = 4.166664568298827e-2f, kC2 = -1.388731625493765e-3f, kC3 = 2.443315711809948e-5f;

DDIM_INLINE void sincos_2pi(float th, float& s_out, float& c_out) {
  const int32_t q = static_cast<int32_t>(std::fma(th, kTwoOverPiF, 0.5f));
  const float qf = static_cast<float>(q);
  const float y1 = std::fma(-qf, kPio2F, th);
  const float c = qf * -kPio2Rest;
  const float z = y1 * y1;
  const float ps = std::fma(z, std::fma(z, kS3, kS2), kS1);
  const float sy = y1 + std::fma(y1 * z, ps, std::fma(c * -0.5f, z, c));
  const float zl = std::fma(y1, y1, -z);  // z + zl = y1^2 exactly
  const float hz = 0.5f * z;
  const float t = 1.0f - hz;
  const float e = (1.0f - t) - hz;  // t + e = 1 - hz exactly
  const float pc = std::fma(z, std::fma(z, kC3, kC2), kC1);
  const float cy = t + std::fma(z * z, pc, std::fma(-c, y1, std::fma(-0.5f, zl, e)));
  const bool odd = (q & 1) != 0;
  const float s = odd ? cy : sy;
  const float co = odd ? sy : cy;
  s_out = (q & 2) ? -s : s;
  c_out = ((q + 1) & 2) ? -co : co;
}

constexpr int64_t kMaxNoiseGroups = 512;  // Philox groups per normals() call (2,048 normals; a multiple of 32)

// P uniform pairs (a[p], b[p]) -> (r cos th, r sin th), r = sqrt(-2 log u1), th = 2 pi u2, u1 >= 1e-7:
// Triton's pair_uniform_to_normal.
DDIM_INLINE void box_muller(const uint32_t* a, const uint32_t* b, int64_t P, float* zc, float* zs) {
  for (int64_t p = 0; p < P; ++p) {
    const float u1 = std::max(uniform(a[p]), 1.0e-7f);
    const float th = kTwoPi * uniform(b[p]);
    const float r = std::sqrt(-2.0f * log_positive(u1));
    float s, c;
    sincos_2pi(th, s, c);
    zc[p] = r * c;
    zs[p] = r * s;
  }
}


// The normals of groups [g0, g0 + G) of one sample (counter words 1 and 3: c1, c3; G <=
// kMaxNoiseGroups), interleaved: zz[4 i + w] = output w of group g0 + i.
DDIM_INLINE void normals_portable(uint32_t g0, int64_t G, uint32_t c1, uint32_t c3, const NoiseKey& key, float* zz) {
  alignas(64) uint32_t a[2 * kMaxNoiseGroups], b[2 * kMaxNoiseGroups];
  alignas(64) float zc[2 * kMaxNoiseGroups], zs[2 * kMaxNoiseGroups];
  philox_groups(g0, G, c1, c3, key, a, b);
  box_muller(a, b, 2 * G, zc, zs);
  for (int64_t i = 0; i < G; ++i) {
    zz[4 * i + 0] = zc[i];
    zz[4 * i + 1] = zs[i];
    zz[4 * i + 2] = zc[G + i];
    zz[4 * i + 3] = zs[G + i];
  }
}

#if DDIM_HAVE_AVX512_NOISE
// The second path (AVX-512 CPUs): the same operations in the same order as normals_portable
// (FMAs where it calls std::fma), hence the same bits (tests/test_cpp_kernel.py), at 0.9 ns per
// normal instead of 1.5. Kept because the whole step at eta = 1 is 1.67x faster with it: 206 us
// against 344 us for 64x3x32x32 on 1 thread of a Zen 4 core (bench/test_bench_step.py, eta1,
// speedup_avx512_noise; the rule for a second path is >= 1.3x end to end).
#define DDIM_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// Philox for 32 groups in 4 independent chains of 8 groups, each group in a 64-bit lane (the
// value in the low half; vpmuludq ignores the high half, so it is never cleaned): per round 2
// multiplies, 2 shifts, 2 xor3 per chain. Measured per normal: 0.31 ns, against 0.36 with 2
// chains (the multiply latency shows) and 0.55 with 16 groups in 32-bit lanes (odd/even
// products and blends). Writes the words as 16-lane vectors: w[64 k + 16 j + lane] = word j of
// group 16 k + lane.
constexpr int kChains = 4;                     // Philox chains of 8 groups in flight (6: no faster)
constexpr int64_t kPhiloxBlock = 8 * kChains;  // groups per philox_block call

DDIM_AVX512 static inline void philox_block(uint32_t g, uint32_t n, uint32_t w3, const NoiseKey& key, const __m512i* k0,
                                            const __m512i* k1, uint32_t* w) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i mA = _mm512_set1_epi64(kPhiloxRoundA), mB = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
  for (int b = 0; b < kChains; ++b) {
    c0[b] = _mm512_add_epi64(_mm512_set1_epi64(g + 8u * b), lane);
    c1[b] = _mm512_set1_epi64(n);
    c2[b] = _mm512_set1_epi64(key.step);
    c3[b] = _mm512_set1_epi64(w3);
  }
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
#pragma GCC unroll 8
    for (int b = 0; b < kChains; ++b) {
      const __m512i pb = _mm512_mul_epu32(c2[b], mB), pa = _mm512_mul_epu32(c0[b], mA);
      c0[b] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[b], k0[r], 0x96);  // hi(pb) ^ c1 ^ k0
      c2[b] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[b], k1[r], 0x96);  // hi(pa) ^ c3 ^ k1
      c1[b] = pb;
      c3[b] = pa;
    }
  }
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int b = 0; b < kChains; b += 2, w += 64) {
    _mm512_store_si512(w + 0, _mm512_permutex2var_epi32(c0[b], low_halves, c0[b + 1]));
    _mm512_store_si512(w + 16, _mm512_permutex2var_epi32(c1[b], low_halves, c1[b + 1]));
    _mm512_store_si512(w + 32, _mm512_permutex2var_epi32(c2[b], low_halves, c2[b + 1]));
    _mm512_store_si512(w + 48, _mm512_permutex2var_epi32(c3[b], low_halves, c3[b + 1]));
  }
}

DDIM_AVX512 static inline __m512 uniform16(__m512i r) {
  const __m512i s = _mm512_xor_si512(r, _mm512_srai_epi32(r, 31));  // r < 0 ? ~r : r
  return _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(4.6566127342e-10f));
}

DDIM_AVX512 static inline __m512 log16(__m512 x) {  // log_positive, lane-wise
  const __m512i ix0 = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(0x3f800000 - 0x3f3504f3));
  const __m512i k = _mm512_sub_epi32(_mm512_srli_epi32(ix0, 23), _mm512_set1_epi32(0x7f));
  const __m512i ix = _mm512_add_epi32(_mm512_and_si512(ix0, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f3504f3));
  const __m512 f = _mm512_sub_ps(_mm512_castsi512_ps(ix), _mm512_set1_ps(1.0f));
  const __m512 s = _mm512_div_ps(f, _mm512_add_ps(_mm512_set1_ps(2.0f), f));
  const __m512 z = _mm512_mul_ps(s, s);
  const __m512 w = _mm512_mul_ps(z, z);
  const __m512 t1 = _mm512_mul_ps(w, _mm512_fmadd_ps(w, _mm512_set1_ps(0.24279078841f), _mm512_set1_ps(0.40000972152f)));
  const __m512 t2 = _mm512_mul_ps(z, _mm512_fmadd_ps(w, _mm512_set1_ps(0.28498786688f), _mm512_set1_ps(0.66666662693f)));
  const __m512 R = _mm512_add_ps(t2, t1);
  const __m512 hfsq = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), f), f);
  const __m512 dk = _mm512_cvtepi32_ps(k);
  __m512 v = _mm512_fmadd_ps(s, _mm512_add_ps(hfsq, R), _mm512_mul_ps(dk, _mm512_set1_ps(9.0580006145e-06f)));
  v = _mm512_add_ps(_mm512_sub_ps(v, hfsq), f);
  return _mm512_fmadd_ps(dk, _mm512_set1_ps(6.9313812256e-01f), v);
}

// sincos_2pi, lane-wise.
DDIM_AVX512 static inline void sincos16(__m512 th, __m512& s_out, __m512& c_out) {
  const __m512i q = _mm512_cvttps_epi32(_mm512_fmadd_ps(th, _mm512_set1_ps(kTwoOverPiF), _mm512_set1_ps(0.5f)));
  const __m512 qf = _mm512_cvtepi32_ps(q);
  const __m512 y1 = _mm512_fnmadd_ps(qf, _mm512_set1_ps(kPio2F), th);
  const __m512 c = _mm512_mul_ps(qf, _mm512_set1_ps(-kPio2Rest));
  const __m512 z = _mm512_mul_ps(y1, y1);
  const __m512 ps = _mm512_fmadd_ps(z, _mm512_fmadd_ps(z, _mm512_set1_ps(kS3), _mm512_set1_ps(kS2)), _mm512_set1_ps(kS1));
  const __m512 sy = _mm512_add_ps(
      y1, _mm512_fmadd_ps(_mm512_mul_ps(y1, z), ps, _mm512_fmadd_ps(_mm512_mul_ps(c, _mm512_set1_ps(-0.5f)), z, c)));
  const __m512 zl = _mm512_fmsub_ps(y1, y1, z);
  const __m512 hz = _mm512_mul_ps(_mm512_set1_ps(0.5f), z);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_sub_ps(one, hz);
  const __m512 e = _mm512_sub_ps(_mm512_sub_ps(one, t), hz);
  const __m512 pc = _mm512_fmadd_ps(z, _mm512_fmadd_ps(z, _mm512_set1_ps(kC3), _mm512_set1_ps(kC2)), _mm512_set1_ps(kC1));
  const __m512 cy = _mm512_add_ps(
      t, _mm512_fmadd_ps(_mm512_mul_ps(z, z), pc,
                         _mm512_fnmadd_ps(c, y1, _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), zl, e))));
  const __mmask16 odd = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  // Negate where (q & 2) (sin) and ((q + 1) & 2) (cos): bit 1 of q moved to the sign bit, a ^ (b & c).
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  const __m512i s_q = _mm512_slli_epi32(q, 30), c_q = _mm512_slli_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(1)), 30);
  s_out = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(_mm512_mask_blend_ps(odd, sy, cy)), s_q, sign, 0x78));
  c_out = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(_mm512_mask_blend_ps(odd, cy, sy)), c_q, sign, 0x78));
}

// (r cos th, r sin th) for 16 uniform pairs (a, b): box_muller, lane-wise.
DDIM_AVX512 static inline void box_muller16(__m512i a, __m512i b, __m512& zc, __m512& zs) {
  const __m512 u1 = _mm512_max_ps(uniform16(a), _mm512_set1_ps(1.0e-7f));
  const __m512 th = _mm512_mul_ps(_mm512_set1_ps(kTwoPi), uniform16(b));
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(u1)));
  __m512 s, c;
  sincos16(th, s, c);
  zc = _mm512_mul_ps(r, c);
  zs = _mm512_mul_ps(r, s);
}

// normals_portable, for G rounded up to a multiple of 16 (zz must hold 4 * that many floats).
// Two passes (all Philox words, then all Box-Muller) run faster than one fused loop (0.97 ns
// against 1.13 ns per normal): each loop keeps its own dependency chains in flight.
DDIM_AVX512 __attribute__((noinline)) void normals_avx512(uint32_t g0, int64_t G, uint32_t n, uint32_t w3,
                                                          const NoiseKey& key, float* zz) {
  alignas(64) uint32_t words[4 * kMaxNoiseGroups];
  __m512i k0[10], k1[10];  // round keys
  uint32_t w0 = key.k0, w1 = key.k1;
  for (int r = 0; r < 10; ++r, w0 += kPhiloxKeyA, w1 += kPhiloxKeyB) {
    k0[r] = _mm512_set1_epi64(w0);
    k1[r] = _mm512_set1_epi64(w1);
  }
  for (int64_t i = 0; i < G; i += kPhiloxBlock) philox_block(g0 + static_cast<uint32_t>(i), n, w3, key, k0, k1, words + 4 * i);
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i quad_lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  const __m512i quad_hi = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
  const uint32_t* w = words;
  for (int64_t i = 0; i < G; i += 16, zz += 64, w += 64) {
    __m512 zc01, zs01, zc23, zs23;
    box_muller16(_mm512_load_si512(w), _mm512_load_si512(w + 16), zc01, zs01);       // outputs 0, 1 of each group
    box_muller16(_mm512_load_si512(w + 32), _mm512_load_si512(w + 48), zc23, zs23);  // outputs 2, 3
    // 4 x 16 -> 16 x 4, zz[4 g + j] = (zc01, zs01, zc23, zs23)[j][g]: pairs, then pairs of pairs.
    const __m512 p = _mm512_permutex2var_ps(zc01, pair_lo, zs01), q = _mm512_permutex2var_ps(zc01, pair_hi, zs01);
    const __m512 r = _mm512_permutex2var_ps(zc23, pair_lo, zs23), t = _mm512_permutex2var_ps(zc23, pair_hi, zs23);
    _mm512_storeu_ps(zz + 0, _mm512_permutex2var_ps(p, quad_lo, r));
    _mm512_storeu_ps(zz + 16, _mm512_permutex2var_ps(p, quad_hi, r));
    _mm512_storeu_ps(zz + 32, _mm512_permutex2var_ps(q, quad_lo, t));
    _mm512_storeu_ps(zz + 48, _mm512_permutex2var_ps(q, quad_hi, t));
  }
}

static const bool kUseAvx512 = [] {
  __builtin_cpu_init();  // static initializers may run before libgcc's own
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}();
#else
static const bool kUseAvx512 = false;
#endif

// 0: the portable path, 1: AVX-512 (where the CPU has it). Settable for benchmarks and tests
// (ddim_fast_C::noise_impl); every step reads it once.
std::atomic<int> g_noise_impl{kUseAvx512 ? 1 : 0};

// The normals of groups [g0, g0 + G) of global sample n, interleaved (zz[4 i + w] = output w of
// group g0 + i); zz holds 4 kMaxNoiseGroups floats (the AVX-512 path writes whole 16-groups).
DDIM_INLINE void normals(uint32_t g0, int64_t G, int64_t n, const NoiseKey& key, bool fast, float* zz) {
  const uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(n) & 0xffffffffu);
  const uint32_t c3 = key.stream + (static_cast<uint32_t>(static_cast<uint64_t>(n) >> 32) << DDIM_STREAM_BITS);
#if DDIM_HAVE_AVX512_NOISE
  if (fast) {
    normals_avx512(g0, G, c1, c3, key, zz);
    return;
  }
#endif
  (void)fast;
  normals_portable(g0, G, c1, c3, key, zz);
}

// z[0, len) = the noise of flat elements [e0, e0 + len) of a (B, D) batch (element b D + j is
// element j of sample sample_offset + b). A segment never crosses a sample; a sample's first
// and last groups may be cut, so the normals go through a scratch buffer and are copied.
DDIM_INLINE void fill_noise(float* z, int64_t e0, int64_t len, int64_t D, const NoiseKey& key, bool fast) {
  alignas(64) float zz[4 * kMaxNoiseGroups];
  const int64_t end = e0 + len;
  for (int64_t e = e0; e < end;) {
    const int64_t s = e / D;
    const int64_t j = e - s * D;
    const int64_t g0 = j >> 2;
    // at most kMaxNoiseGroups groups, and never past the sample's end
    const int64_t seg = std::min({end - e, D - j, 4 * kMaxNoiseGroups - (j & 3)});
    const int64_t G = ((j + seg + 3) >> 2) - g0;
    normals(static_cast<uint32_t>(g0), G, key.sample_offset + s, key, fast, zz);
    std::memcpy(z, zz + (j & 3), static_cast<size_t>(seg) * sizeof(float));
    z += seg;
    e += seg;
  }
}
