// The noise of the contract (ddim_fast/reference.py, ddim_fast/layout.py): Philox4x32-10
// (Salmon et al., SC'11; Random123's constants) and Box-Muller, as triton's randn4x.
//
//     z at (seed, global sample n, step k, element j of the sample, stream s)
//       = output j % 4 of Philox4x32-10(counter (j / 4, n mod 2^32, k, s + (n >> 32) << STREAM_BITS),
//                                       key (seed_lo, seed_hi)),
//         u = float(r >= 0 ? r : ~r) * 4.6566127342e-10f   (r as int32),
//         (z0, z1) = BoxMuller(u0, u1), (z2, z3) = BoxMuller(u2, u3).
//
// Three paths that give the same bits, picked at load time (ddim_fast_C::noise_impl): plain C++
// that gcc vectorizes (normals_portable, ~2.0 ns per normal per core in the AVX-512 build, where
// its table loads are gathers; 4.4 ns with AVX2 on Zen 3, whose gathers are microcoded),
// hand-written AVX-512 (normals_avx512, ~0.54 ns on Sapphire Rapids: Philox 0.27, Box-Muller
// 0.23) and hand-written AVX2 + FMA (normals_avx2, 1.9 ns on Zen 3: Philox 0.65, Box-Muller 1.3,
// whose 16 vpermps a call are its largest cost); torch.randn takes ~2.4 ns (Sapphire Rapids) and
// ~4.5 ns (Zen 3) on one thread. log, sin and cos are written out because libm's scalar calls do
// not vectorize: table-driven, with no division and no branch (neg2_log, sincos_sector), within
// ~1.2 ulp (log) and 4e-8 (sin, cos; the quadrant-reduction version before took 0.44 ns per
// normal for Box-Muller on AVX-512, against 0.23).
// The noise stays within 1e-6 of reference.gaussian (tests/test_cpp_kernel.py; over 2^25 draws
// the largest gap is 9.5e-7 = 2 ulp at |z| ~ 4, as before: mostly torch's own rounding).
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
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's 2^-31 (rounds to 2^-31 (1 - 2^-24))
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

// Triton's uint_to_uniform_float: the word as int32, negative ones mirrored (~r), times 2^-31
// (4.6566127342e-10f is the float just below 2^-31, so u is rounded: keep the multiply).
DDIM_INLINE int32_t uniform_int(uint32_t r) {
  const int32_t s = static_cast<int32_t>(r);
  return s ^ (s >> 31);  // s < 0 ? ~s : s, in [0, 2^31)
}

DDIM_INLINE float uniform(uint32_t r) { return static_cast<float>(uniform_int(r)) * kUniformScale; }

// The tables and polynomial coefficients below were computed once with mpmath (200 bits):
//  - log: z in [kLogOff, 2 kLogOff) (~[0.7, 1.4)) falls in 16 intervals by its top 4 mantissa bits
//    (after subtracting kLogOff). Interval i has a float invc_i near 1 / its midpoint (exactly 1
//    for the interval holding 1, so log(u) near u = 1 keeps its relative accuracy), picked among
//    the 8,193 floats nearest that so that 2 log(invc_i) is within 2e-4 ulp of a float (a
//    "Gal accurate table"): the table values are all but exact. Stored: -2 invc_i and
//    2 log(invc_i). Then z invc_i = 1 + r with |r| < 0.0297, and -2 log1p(r) is
//    rho + rho^2 (B1 + B2 rho + B3 rho^2 + B4 rho^3) with rho = -2 r (relative error 6e-10;
//    a least-squares fit, weighted for relative error, of log1p on |r| <= 0.03).
//  - sin / cos: th in [0, 2 pi] falls in 32 sectors by the top 5 bits of s2; sector q has a float
//    angle a_q within 0.004 of (q + 1/2) pi / 16 whose sin and cos are within 0.014 ulp of the
//    floats stored (Gal's accurate tables again), so sin(th) = sin a_q cos y + cos a_q sin y with
//    y = th - a_q, |y| < 0.102, and sin y, cos y - 1 by short fitted polynomials (absolute errors
//    4e-12 and 2e-10).
// No division, no libm call, no branch: 16 lanes of the same operations in the AVX-512 path.
constexpr uint32_t kLogOff = 0x3f330000u;  // z = the float x scaled into [kLogOff, 2 kLogOff)
constexpr float kSectorAngle[32] = {
    0x1.92573e0000000p-4f, 0x1.2dcbe80000000p-2f, 0x1.f6768e0000000p-2f, 0x1.5fff8e0000000p-1f,
    0x1.c492d80000000p-1f, 0x1.143b660000000p+0f, 0x1.46da280000000p+0f, 0x1.792b3c0000000p+0f,
    0x1.ab05840000000p+0f, 0x1.ddc4680000000p+0f, 0x1.0819480000000p+1f, 0x1.21324e0000000p+1f,
    0x1.3a48a60000000p+1f, 0x1.5383860000000p+1f, 0x1.6c59420000000p+1f, 0x1.85864c0000000p+1f,
    0x1.9e91ba0000000p+1f, 0x1.b7adb80000000p+1f, 0x1.d1244a0000000p+1f, 0x1.ea3d680000000p+1f,
    0x1.0161ac0000000p+2f, 0x1.0e51f80000000p+2f, 0x1.1ab41c0000000p+2f, 0x1.2717620000000p+2f,
    0x1.33c4b40000000p+2f, 0x1.4056320000000p+2f, 0x1.4d1b440000000p+2f, 0x1.59b2320000000p+2f,
    0x1.65f4e00000000p+2f, 0x1.72f2e00000000p+2f, 0x1.7f1a9c0000000p+2f, 0x1.8b9f1e0000000p+2f,
};
constexpr float kSectorSin[32] = {
    0x1.91b1b00000000p-4f, 0x1.2972440000000p-2f, 0x1.e28a8a0000000p-2f, 0x1.44eae00000000p-1f,
    0x1.8be5f20000000p-1f, 0x1.c354140000000p-1f, 0x1.ea06e00000000p-1f, 0x1.fd91be0000000p-1f,
    0x1.fd94980000000p-1f, 0x1.e9cf980000000p-1f, 0x1.c328180000000p-1f, 0x1.8b59840000000p-1f,
    0x1.446c980000000p-1f, 0x1.e1251c0000000p-2f, 0x1.29d57c0000000p-2f, 0x1.9286920000000p-4f,
    -0x1.8da0080000000p-4f, -0x1.2825600000000p-2f, -0x1.e405b80000000p-2f, -0x1.4546fe0000000p-1f,
    -0x1.8a9dc40000000p-1f, -0x1.c4152a0000000p-1f, -0x1.e9dc680000000p-1f, -0x1.fd5c420000000p-1f,
    -0x1.fd9e4a0000000p-1f, -0x1.ea32c80000000p-1f, -0x1.c32cbe0000000p-1f, -0x1.8b2aca0000000p-1f,
    -0x1.45f3c20000000p-1f, -0x1.df4f1c0000000p-2f, -0x1.2bdbde0000000p-2f, -0x1.9f6ea20000000p-4f,
};
constexpr float kSectorCos[32] = {
    0x1.fd882c0000000p-1f, 0x1.e9ec840000000p-1f, 0x1.c396c00000000p-1f, 0x1.8bb14e0000000p-1f,
    0x1.44aaba0000000p-1f, 0x1.e383cc0000000p-2f, 0x1.28c4620000000p-2f, 0x1.8ea5c60000000p-4f,
    -0x1.8dbc3a0000000p-4f, -0x1.2a308e0000000p-2f, -0x1.e427e20000000p-2f, -0x1.4555ac0000000p-1f,
    -0x1.8c18de0000000p-1f, -0x1.c3f60e0000000p-1f, -0x1.e9dd720000000p-1f, -0x1.fd858c0000000p-1f,
    -0x1.fd94f00000000p-1f, -0x1.ea1eec0000000p-1f, -0x1.c331420000000p-1f, -0x1.8b65980000000p-1f,
    -0x1.46394e0000000p-1f, -0x1.e0b0260000000p-2f, -0x1.29dc520000000p-2f, -0x1.9f625e0000000p-4f,
    0x1.8a9e140000000p-4f, 0x1.27a1c80000000p-2f, 0x1.e4168e0000000p-2f, 0x1.458e6c0000000p-1f,
    0x1.8ad7380000000p-1f, 0x1.c472d60000000p-1f, 0x1.e98e5c0000000p-1f, 0x1.fd5c1a0000000p-1f,
};
constexpr float kLogNeg2InvC[16] = {
    -0x1.662f3a0000000p+1f, -0x1.570e260000000p+1f, -0x1.495b080000000p+1f, -0x1.3caa320000000p+1f,
    -0x1.30db8a0000000p+1f, -0x1.25c8c80000000p+1f, -0x1.1b96a20000000p+1f, -0x1.12461a0000000p+1f,
    -0x1.094eec0000000p+1f, -0x1.0000000000000p+1f, -0x1.e56b6e0000000p+0f, -0x1.ca63d20000000p+0f,
    -0x1.b20ed20000000p+0f, -0x1.9c15ae0000000p+0f, -0x1.8882640000000p+0f, -0x1.7677fe0000000p+0f,
};
constexpr float kLogTwiceLogInvC[16] = {
    0x1.57ee7e0000000p-1f, 0x1.2bbd400000000p-1f, 0x1.0201f20000000p-1f, 0x1.b38a760000000p-2f,
    0x1.65b7f20000000p-2f, 0x1.19f1e20000000p-2f, 0x1.a336100000000p-3f, 0x1.1a6ada0000000p-3f,
    0x1.2493e80000000p-4f, 0x0.0p+0f, -0x1.b4b8f80000000p-4f, -0x1.c5092a0000000p-3f,
    -0x1.5238700000000p-2f, -0x1.bc9cb20000000p-2f, -0x1.1024840000000p-1f, -0x1.4052ee0000000p-1f,
};
constexpr float kSinS1 = -0x1.5555540000000p-3f, kSinS2 = 0x1.10f5040000000p-7f;
constexpr float kCosC1 = -0x1.fffffa0000000p-2f, kCosC2 = 0x1.5527860000000p-5f;
constexpr float kLogB1 = 0x1.fffffe0000000p-3f, kLogB2 = 0x1.5555540000000p-4f, kLogB3 = 0x1.0031280000000p-5f, kLogB4 = 0x1.99ec300000000p-7f;
constexpr float kNeg2Ln2 = -1.38629436112f;  // float(-2 log 2) = -2 float(log 2)
constexpr float kTwoPi = 6.283185307179586f;
constexpr uint32_t kMinU1Bits = 0x33d6bf95u;  // the bits of 1e-7f, the floor of u1
constexpr int kSectorShift = 26;  // s2 >> 26: the sector of th = 2 pi u2 (to within rounding, which |y| allows)

// -2 log(u) for a normal positive float u <= 1, to ~1 ulp.
DDIM_INLINE float neg2_log(float u) {
  const uint32_t tmp = float_to_bits(u) - kLogOff;
  const int32_t k = static_cast<int32_t>(tmp) >> 23;  // u = 2^k z
  const int32_t i = static_cast<int32_t>((tmp >> 19) & 15u);
  const float z = bits_to_float((tmp & 0x007fffffu) + kLogOff);
  const float rho = std::fma(z, kLogNeg2InvC[i], 2.0f);  // -2 (z invc - 1), one rounding
  const float p = std::fma(rho, std::fma(rho, std::fma(rho, kLogB4, kLogB3), kLogB2), kLogB1);
  const float w = kLogTwiceLogInvC[i] + std::fma(rho * rho, p, rho);
  return std::fma(static_cast<float>(k), kNeg2Ln2, w);
}

// sin and cos of th in sector q = s2 >> kSectorShift (see the tables above).
DDIM_INLINE void sincos_sector(int32_t q, float th, float& s_out, float& c_out) {
  const float y = th - kSectorAngle[q];
  const float z = y * y;
  const float sy = std::fma(y * z, std::fma(z, kSinS2, kSinS1), y);  // sin y
  const float cm1 = z * std::fma(z, kCosC2, kCosC1);                  // cos y - 1
  const float sa = kSectorSin[q], ca = kSectorCos[q];
  s_out = sa + std::fma(sa, cm1, ca * sy);
  c_out = ca + std::fma(ca, cm1, -(sa * sy));
}

constexpr int64_t kMaxNoiseGroups = 512;  // Philox groups per normals() call (2,048 normals; a multiple of 32)

// P uniform pairs (a[p], b[p]) -> (r cos th, r sin th), r = sqrt(-2 log u1), th = 2 pi u2, u1 >= 1e-7:
// Triton's pair_uniform_to_normal.
DDIM_INLINE void box_muller(const uint32_t* a, const uint32_t* b, int64_t P, float* zc, float* zs) {
  for (int64_t p = 0; p < P; ++p) {
    const int32_t s2 = uniform_int(b[p]);
    // max(u1, 1e-7) on the bits (the same for non-negative floats): a float max here is a select
    // that stops gcc from vectorizing the table loads below it
    const float u1 = bits_to_float(std::max(float_to_bits(uniform(a[p])), kMinU1Bits));
    const float th = kTwoPi * (static_cast<float>(s2) * kUniformScale);
    const float r = std::sqrt(neg2_log(u1));
    float s, c;
    sincos_sector(s2 >> kSectorShift, th, s, c);
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

#if DDIM_HAVE_X86_NOISE
// The second path (AVX-512 CPUs): the same operations in the same order as normals_portable
// (FMAs where it calls std::fma, vpermps / vpermt2ps where it indexes a table), hence the same
// bits (tests/test_cpp_kernel.py), at 0.54 ns per normal instead of 2.0. Kept because the whole
// step at eta = 1 is 2.4x faster with it (median of paired rounds; 3.0x on minimums): 227 us
// against 545 us for 64x3x32x32 on 1 thread of a Sapphire Rapids core (bench/test_bench_step.py,
// eta1, speedup_avx512_noise; 1.67x with the earlier quadrant/fdlibm functions on Zen 4; the
// rule for a second path is >= 1.3x end to end).
#define DDIM_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// Philox for 32 groups in 4 independent chains of 8 groups, each group in a 64-bit lane (the
// value in the low half; vpmuludq ignores the high half, so it is never cleaned): per round 2
// multiplies, 2 shifts, 2 xor3 per chain. Measured per normal on Zen 4: 0.31 ns, against 0.36
// with 2 chains (the multiply latency shows) and 0.55 with 16 groups in 32-bit lanes (odd/even
// products and blends). Only counter word 0 differs between the groups of a call, so round 1
// has one varying product and round 2 one more (PhiloxConsts holds the rest): 55 operations
// per 8 groups instead of 60. Writes the words as 16-lane vectors: w[64 k + 16 j + lane] =
// word j of group 16 k + lane.
constexpr int kChains = 4;                     // Philox chains of 8 groups in flight (6: no faster)
constexpr int64_t kPhiloxBlock = 8 * kChains;  // groups per philox_block call

// The per-call constants of philox_block / philox_block8, for one (key, counter words 1 to 3):
// computed once in scalar code, broadcast by each vector path.
struct PhiloxScalars {
  uint32_t k0[10], k1[10];  // round keys
  uint32_t x2_r1;           // c2 after round 1 = hi(c0 A) ^ x2_r1
  uint32_t x0_r2;           // c0 after round 2 = hi(c2 B) ^ x0_r2 (c0 and c1 after round 1 are constant)
  uint32_t x2_r2;           // c2 after round 2 = c3 ^ x2_r2 (c0 after round 1 is constant)
  uint32_t x2_r3;           // c2 after round 3 = hi(c0 A) ^ x2_r3 (c3 after round 2 is constant)
};

DDIM_INLINE PhiloxScalars philox_scalars(uint32_t n, uint32_t w3, const NoiseKey& key) {
  PhiloxScalars ps;
  ps.k0[0] = key.k0;
  ps.k1[0] = key.k1;
  for (int r = 1; r < 10; ++r) {
    ps.k0[r] = ps.k0[r - 1] + kPhiloxKeyA;
    ps.k1[r] = ps.k1[r - 1] + kPhiloxKeyB;
  }
  const uint64_t pb1 = static_cast<uint64_t>(key.step) * kPhiloxRoundB;
  const uint32_t c0_r1 = static_cast<uint32_t>(pb1 >> 32) ^ n ^ ps.k0[0], c1_r1 = static_cast<uint32_t>(pb1);
  const uint64_t pa2 = static_cast<uint64_t>(c0_r1) * kPhiloxRoundA;
  ps.x2_r1 = w3 ^ ps.k1[0];
  ps.x0_r2 = c1_r1 ^ ps.k0[1];
  ps.x2_r2 = static_cast<uint32_t>(pa2 >> 32) ^ ps.k1[1];
  ps.x2_r3 = static_cast<uint32_t>(pa2) ^ ps.k1[2];
  return ps;
}

struct PhiloxConsts {  // PhiloxScalars in 64-bit lanes holding 32-bit words
  __m512i k0[10], k1[10];
  __m512i x2_r1, x0_r2, x2_r2, x2_r3;
};

DDIM_AVX512 static inline void philox_consts(uint32_t n, uint32_t w3, const NoiseKey& key, PhiloxConsts& pc) {
  const PhiloxScalars ps = philox_scalars(n, w3, key);
  for (int r = 0; r < 10; ++r) {
    pc.k0[r] = _mm512_set1_epi64(ps.k0[r]);
    pc.k1[r] = _mm512_set1_epi64(ps.k1[r]);
  }
  pc.x2_r1 = _mm512_set1_epi64(ps.x2_r1);
  pc.x0_r2 = _mm512_set1_epi64(ps.x0_r2);
  pc.x2_r2 = _mm512_set1_epi64(ps.x2_r2);
  pc.x2_r3 = _mm512_set1_epi64(ps.x2_r3);
}

DDIM_AVX512 static inline void philox_block(uint32_t g, const PhiloxConsts& pc, uint32_t* w) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i mA = _mm512_set1_epi64(kPhiloxRoundA), mB = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
#pragma GCC unroll 8
  for (int b = 0; b < kChains; ++b) {  // rounds 1 to 3 (c0 = g + lane is the only varying input)
    const __m512i pa1 = _mm512_mul_epu32(_mm512_add_epi64(_mm512_set1_epi64(g + 8u * b), lane), mA);
    const __m512i c2_r1 = _mm512_xor_si512(_mm512_srli_epi64(pa1, 32), pc.x2_r1);
    const __m512i pb2 = _mm512_mul_epu32(c2_r1, mB);
    const __m512i c0_r2 = _mm512_xor_si512(_mm512_srli_epi64(pb2, 32), pc.x0_r2);
    const __m512i c2_r2 = _mm512_xor_si512(pa1, pc.x2_r2);
    const __m512i pb3 = _mm512_mul_epu32(c2_r2, mB), pa3 = _mm512_mul_epu32(c0_r2, mA);
    c0[b] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb3, 32), pb2, pc.k0[2], 0x96);
    c1[b] = pb3;
    c2[b] = _mm512_xor_si512(_mm512_srli_epi64(pa3, 32), pc.x2_r3);
    c3[b] = pa3;
  }
#pragma GCC unroll 7
  for (int r = 3; r < 10; ++r) {
#pragma GCC unroll 8
    for (int b = 0; b < kChains; ++b) {
      const __m512i pb = _mm512_mul_epu32(c2[b], mB), pa = _mm512_mul_epu32(c0[b], mA);
      c0[b] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[b], pc.k0[r], 0x96);  // hi(pb) ^ c1 ^ k0
      c2[b] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[b], pc.k1[r], 0x96);  // hi(pa) ^ c3 ^ k1
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

// uniform_int, lane-wise.
DDIM_AVX512 static inline __m512i uniform_int16(__m512i r) { return _mm512_xor_si512(r, _mm512_srai_epi32(r, 31)); }

// neg2_log, lane-wise (the tables: one vpermps each).
DDIM_AVX512 static inline __m512 neg2_log16(__m512 u) {
  const __m512i tmp = _mm512_sub_epi32(_mm512_castps_si512(u), _mm512_set1_epi32(static_cast<int32_t>(kLogOff)));
  const __m512 kf = _mm512_cvtepi32_ps(_mm512_srai_epi32(tmp, 23));
  const __m512i i = _mm512_srli_epi32(tmp, 19);  // vpermps reads the low 4 bits
  const __m512 z = _mm512_castsi512_ps(
      _mm512_add_epi32(_mm512_and_si512(tmp, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(static_cast<int32_t>(kLogOff))));
  const __m512 rho = _mm512_fmadd_ps(z, _mm512_permutexvar_ps(i, _mm512_loadu_ps(kLogNeg2InvC)), _mm512_set1_ps(2.0f));
  const __m512 p = _mm512_fmadd_ps(
      rho, _mm512_fmadd_ps(rho, _mm512_fmadd_ps(rho, _mm512_set1_ps(kLogB4), _mm512_set1_ps(kLogB3)), _mm512_set1_ps(kLogB2)),
      _mm512_set1_ps(kLogB1));
  const __m512 w = _mm512_add_ps(_mm512_permutexvar_ps(i, _mm512_loadu_ps(kLogTwiceLogInvC)),
                                 _mm512_fmadd_ps(_mm512_mul_ps(rho, rho), p, rho));
  return _mm512_fmadd_ps(kf, _mm512_set1_ps(kNeg2Ln2), w);
}

// sincos_sector, lane-wise (the 32-entry tables: one vpermt2ps each).
DDIM_AVX512 static inline void sincos16(__m512i q, __m512 th, __m512& s_out, __m512& c_out) {
  const __m512 y = _mm512_sub_ps(th, _mm512_permutex2var_ps(_mm512_loadu_ps(kSectorAngle), q, _mm512_loadu_ps(kSectorAngle + 16)));
  const __m512 z = _mm512_mul_ps(y, y);
  const __m512 sy = _mm512_fmadd_ps(_mm512_mul_ps(y, z), _mm512_fmadd_ps(z, _mm512_set1_ps(kSinS2), _mm512_set1_ps(kSinS1)), y);
  const __m512 cm1 = _mm512_mul_ps(z, _mm512_fmadd_ps(z, _mm512_set1_ps(kCosC2), _mm512_set1_ps(kCosC1)));
  const __m512 sa = _mm512_permutex2var_ps(_mm512_loadu_ps(kSectorSin), q, _mm512_loadu_ps(kSectorSin + 16));
  const __m512 ca = _mm512_permutex2var_ps(_mm512_loadu_ps(kSectorCos), q, _mm512_loadu_ps(kSectorCos + 16));
  s_out = _mm512_add_ps(sa, _mm512_fmadd_ps(sa, cm1, _mm512_mul_ps(ca, sy)));
  c_out = _mm512_add_ps(ca, _mm512_fmsub_ps(ca, cm1, _mm512_mul_ps(sa, sy)));
}

// (r cos th, r sin th) for 16 uniform pairs (a, b): box_muller, lane-wise.
DDIM_AVX512 static inline void box_muller16(__m512i a, __m512i b, __m512& zc, __m512& zs) {
  const __m512i s2 = uniform_int16(b);
  const __m512 scale = _mm512_set1_ps(kUniformScale);
  const __m512 u1 = _mm512_max_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(uniform_int16(a)), scale), _mm512_set1_ps(1.0e-7f));
  const __m512 th = _mm512_mul_ps(_mm512_set1_ps(kTwoPi), _mm512_mul_ps(_mm512_cvtepi32_ps(s2), scale));
  const __m512 r = _mm512_sqrt_ps(neg2_log16(u1));
  __m512 s, c;
  sincos16(_mm512_srli_epi32(s2, kSectorShift), th, s, c);
  zc = _mm512_mul_ps(r, c);
  zs = _mm512_mul_ps(r, s);
}

// normals_portable, for G rounded up to a multiple of 16 (zz must hold 4 * that many floats).
// Two passes (all Philox words, then all Box-Muller) run faster than one fused loop (0.97 ns
// against 1.13 ns per normal on Zen 4, before the tables): each loop keeps its own dependency
// chains in flight.
DDIM_AVX512 __attribute__((noinline)) void normals_avx512(uint32_t g0, int64_t G, uint32_t n, uint32_t w3,
                                                          const NoiseKey& key, float* zz) {
  alignas(64) uint32_t words[4 * kMaxNoiseGroups];
  PhiloxConsts pc;
  philox_consts(n, w3, key, pc);
  for (int64_t i = 0; i < G; i += kPhiloxBlock) philox_block(g0 + static_cast<uint32_t>(i), pc, words + 4 * i);
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

// The third path (AVX2 + FMA CPUs without AVX-512: Zen 1-3, most client Intel parts): the same
// operations as normals_portable, hence the same bits, on 8 lanes. A table of 16 is two vpermps
// and a blend on bit 3 of the index, one of 32 four vpermps and three blends (gathers, which
// the portable path compiles to, are microcoded and slow on these parts). Kept because the whole
// step at eta = 1 is 2.2x faster with it than with the portable path: 392 us against 863 us for
// 64x3x32x32 on 1 thread of a Zen 3 core (bench/test_bench_step.py, eta1, speedup_vector_noise;
// median of paired rounds). 4 Philox chains: 2 took 0.73-0.81 ns a normal against 0.64-0.70.
#define DDIM_AVX2 __attribute__((target("avx2,fma")))

struct PhiloxConsts8 {  // PhiloxScalars for 4 groups in 64-bit lanes
  __m256i k0[10], k1[10];
  __m256i x2_r1, x0_r2, x2_r2, x2_r3;
};

DDIM_AVX2 static inline void philox_consts8(uint32_t n, uint32_t w3, const NoiseKey& key, PhiloxConsts8& pc) {
  const PhiloxScalars ps = philox_scalars(n, w3, key);
  for (int r = 0; r < 10; ++r) {
    pc.k0[r] = _mm256_set1_epi64x(ps.k0[r]);
    pc.k1[r] = _mm256_set1_epi64x(ps.k1[r]);
  }
  pc.x2_r1 = _mm256_set1_epi64x(ps.x2_r1);
  pc.x0_r2 = _mm256_set1_epi64x(ps.x0_r2);
  pc.x2_r2 = _mm256_set1_epi64x(ps.x2_r2);
  pc.x2_r3 = _mm256_set1_epi64x(ps.x2_r3);
}

// The low 32-bit halves of the 64-bit lanes of lo and hi, per 128-bit lane: (lo0, lo1, hi0, hi1 | lo2, lo3, hi2, hi3).
DDIM_AVX2 static inline __m256i low_halves(__m256i lo, __m256i hi) {
  return _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), 0x88));
}

// Philox for 16 groups g .. g + 15 in 4 chains of 4 (one group per 64-bit lane, as philox_block).
// Chain b holds groups {0, 1, 4, 5} + 8 (b / 2) + 2 (b % 2), so that one vshufps of chains 2c
// and 2c + 1 puts groups 8c .. 8c + 7 in order. Writes w[16 j + i] = word j of group g + i.
DDIM_AVX2 static inline void philox_block8(uint32_t g, const PhiloxConsts8& pc, uint32_t* w) {
  const __m256i mA = _mm256_set1_epi64x(kPhiloxRoundA), mB = _mm256_set1_epi64x(kPhiloxRoundB);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 4, 5);
  __m256i c0[4], c1[4], c2[4], c3[4];
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {  // rounds 1 to 3, as philox_block
    const __m256i ctr = _mm256_add_epi64(_mm256_set1_epi64x(g + 8u * (b >> 1) + 2u * (b & 1)), lane);
    const __m256i pa1 = _mm256_mul_epu32(ctr, mA);
    const __m256i c2_r1 = _mm256_xor_si256(_mm256_srli_epi64(pa1, 32), pc.x2_r1);
    const __m256i pb2 = _mm256_mul_epu32(c2_r1, mB);
    const __m256i c0_r2 = _mm256_xor_si256(_mm256_srli_epi64(pb2, 32), pc.x0_r2);
    const __m256i c2_r2 = _mm256_xor_si256(pa1, pc.x2_r2);
    const __m256i pb3 = _mm256_mul_epu32(c2_r2, mB), pa3 = _mm256_mul_epu32(c0_r2, mA);
    c0[b] = _mm256_xor_si256(_mm256_srli_epi64(pb3, 32), _mm256_xor_si256(pb2, pc.k0[2]));
    c1[b] = pb3;
    c2[b] = _mm256_xor_si256(_mm256_srli_epi64(pa3, 32), pc.x2_r3);
    c3[b] = pa3;
  }
#pragma GCC unroll 7
  for (int r = 3; r < 10; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) {
      const __m256i t1 = _mm256_xor_si256(c1[b], pc.k0[r]), t3 = _mm256_xor_si256(c3[b], pc.k1[r]);
      c1[b] = _mm256_mul_epu32(c2[b], mB);
      c3[b] = _mm256_mul_epu32(c0[b], mA);
      c0[b] = _mm256_xor_si256(_mm256_srli_epi64(c1[b], 32), t1);  // hi(pb) ^ c1 ^ k0
      c2[b] = _mm256_xor_si256(_mm256_srli_epi64(c3[b], 32), t3);  // hi(pa) ^ c3 ^ k1
    }
  }
#pragma GCC unroll 2
  for (int c = 0; c < 2; ++c) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + 0 + 8 * c), low_halves(c0[2 * c], c0[2 * c + 1]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + 16 + 8 * c), low_halves(c1[2 * c], c1[2 * c + 1]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + 32 + 8 * c), low_halves(c2[2 * c], c2[2 * c + 1]));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + 48 + 8 * c), low_halves(c3[2 * c], c3[2 * c + 1]));
  }
}

// table[i & 15] lane-wise.
DDIM_AVX2 static inline __m256 lookup16(const float* table, __m256i i) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), i);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), i);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}

// table[q] lane-wise for q in [0, 32); bit3 / bit4: q << 28 / q << 27 (blendv reads the sign).
DDIM_AVX2 static inline __m256 lookup32(const float* table, __m256i q, __m256 bit3, __m256 bit4) {
  const __m256 t0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), q);
  const __m256 t1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), q);
  const __m256 t2 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 16), q);
  const __m256 t3 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 24), q);
  return _mm256_blendv_ps(_mm256_blendv_ps(t0, t1, bit3), _mm256_blendv_ps(t2, t3, bit3), bit4);
}

DDIM_AVX2 static inline __m256i uniform_int8(__m256i r) { return _mm256_xor_si256(r, _mm256_srai_epi32(r, 31)); }

// neg2_log, lane-wise.
DDIM_AVX2 static inline __m256 neg2_log8(__m256 u) {
  const __m256i tmp = _mm256_sub_epi32(_mm256_castps_si256(u), _mm256_set1_epi32(static_cast<int32_t>(kLogOff)));
  const __m256 kf = _mm256_cvtepi32_ps(_mm256_srai_epi32(tmp, 23));
  const __m256i i = _mm256_srli_epi32(tmp, 19);  // lookup16 reads the low 4 bits
  const __m256 z = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_and_si256(tmp, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(static_cast<int32_t>(kLogOff))));
  const __m256 rho = _mm256_fmadd_ps(z, lookup16(kLogNeg2InvC, i), _mm256_set1_ps(2.0f));
  const __m256 p = _mm256_fmadd_ps(
      rho, _mm256_fmadd_ps(rho, _mm256_fmadd_ps(rho, _mm256_set1_ps(kLogB4), _mm256_set1_ps(kLogB3)), _mm256_set1_ps(kLogB2)),
      _mm256_set1_ps(kLogB1));
  const __m256 w = _mm256_add_ps(lookup16(kLogTwiceLogInvC, i), _mm256_fmadd_ps(_mm256_mul_ps(rho, rho), p, rho));
  return _mm256_fmadd_ps(kf, _mm256_set1_ps(kNeg2Ln2), w);
}

// sincos_sector, lane-wise.
DDIM_AVX2 static inline void sincos8(__m256i q, __m256 th, __m256& s_out, __m256& c_out) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)), bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(q, 27));
  const __m256 y = _mm256_sub_ps(th, lookup32(kSectorAngle, q, bit3, bit4));
  const __m256 z = _mm256_mul_ps(y, y);
  const __m256 sy = _mm256_fmadd_ps(_mm256_mul_ps(y, z), _mm256_fmadd_ps(z, _mm256_set1_ps(kSinS2), _mm256_set1_ps(kSinS1)), y);
  const __m256 cm1 = _mm256_mul_ps(z, _mm256_fmadd_ps(z, _mm256_set1_ps(kCosC2), _mm256_set1_ps(kCosC1)));
  const __m256 sa = lookup32(kSectorSin, q, bit3, bit4), ca = lookup32(kSectorCos, q, bit3, bit4);
  s_out = _mm256_add_ps(sa, _mm256_fmadd_ps(sa, cm1, _mm256_mul_ps(ca, sy)));
  c_out = _mm256_add_ps(ca, _mm256_fmsub_ps(ca, cm1, _mm256_mul_ps(sa, sy)));
}

// box_muller for 8 uniform pairs (a, b).
DDIM_AVX2 static inline void box_muller8(__m256i a, __m256i b, __m256& zc, __m256& zs) {
  const __m256i s2 = uniform_int8(b);
  const __m256 scale = _mm256_set1_ps(kUniformScale);
  const __m256 u1 = _mm256_max_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(uniform_int8(a)), scale), _mm256_set1_ps(1.0e-7f));
  const __m256 th = _mm256_mul_ps(_mm256_set1_ps(kTwoPi), _mm256_mul_ps(_mm256_cvtepi32_ps(s2), scale));
  const __m256 r = _mm256_sqrt_ps(neg2_log8(u1));
  __m256 s, c;
  sincos8(_mm256_srli_epi32(s2, kSectorShift), th, s, c);
  zc = _mm256_mul_ps(r, c);
  zs = _mm256_mul_ps(r, s);
}

// normals_portable, for G rounded up to a multiple of 16, as normals_avx512.
DDIM_AVX2 __attribute__((noinline)) void normals_avx2(uint32_t g0, int64_t G, uint32_t n, uint32_t w3,
                                                      const NoiseKey& key, float* zz) {
  alignas(64) uint32_t words[4 * kMaxNoiseGroups];
  PhiloxConsts8 pc;
  philox_consts8(n, w3, key, pc);
  for (int64_t i = 0; i < G; i += 16) philox_block8(g0 + static_cast<uint32_t>(i), pc, words + 4 * i);
  const uint32_t* w = words;
  for (int64_t i = 0; i < G; i += 16, w += 64) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h, zz += 32) {  // groups i + 8 h .. i + 8 h + 7
      const __m256i* wv = reinterpret_cast<const __m256i*>(w + 8 * h);
      __m256 A, B, C, D;  // outputs 0, 1, 2, 3 of the 8 groups
      box_muller8(_mm256_load_si256(wv), _mm256_load_si256(wv + 2), A, B);
      box_muller8(_mm256_load_si256(wv + 4), _mm256_load_si256(wv + 6), C, D);
      // 4 x 8 -> 8 x 4: zz[4 g + j] = (A, B, C, D)[j][g]
      const __m256 t0 = _mm256_unpacklo_ps(A, B), t1 = _mm256_unpackhi_ps(A, B);
      const __m256 t2 = _mm256_unpacklo_ps(C, D), t3 = _mm256_unpackhi_ps(C, D);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
      _mm256_storeu_ps(zz + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
      _mm256_storeu_ps(zz + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
      _mm256_storeu_ps(zz + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
      _mm256_storeu_ps(zz + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
    }
  }
}

// The generators: kNoisePortable everywhere, kNoiseAvx512 / kNoiseAvx2 where the CPU has them.
constexpr int kNoisePortable = 0, kNoiseAvx512 = 1, kNoiseAvx2 = 2;

static bool noise_impl_available(int impl) {
  __builtin_cpu_init();  // static initializers may run before libgcc's own
  switch (impl) {
    case kNoisePortable:
      return true;
    case kNoiseAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case kNoiseAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  return false;
}
#else
constexpr int kNoisePortable = 0, kNoiseAvx512 = 1, kNoiseAvx2 = 2;
static bool noise_impl_available(int impl) { return impl == kNoisePortable; }
#endif

// The fastest generator this CPU has.
static const int kBestNoiseImpl = noise_impl_available(kNoiseAvx512) ? kNoiseAvx512
                                  : noise_impl_available(kNoiseAvx2)  ? kNoiseAvx2
                                                                      : kNoisePortable;

// The generator in use (kNoise*; the fastest by default). Settable for benchmarks and tests
// (ddim_fast_C::noise_impl); every step reads it once.
std::atomic<int> g_noise_impl{kBestNoiseImpl};

// The normals of groups [g0, g0 + G) of global sample n, interleaved (zz[4 i + w] = output w of
// group g0 + i); zz holds 4 kMaxNoiseGroups floats (the vector paths write whole 16-groups).
DDIM_INLINE void normals(uint32_t g0, int64_t G, int64_t n, const NoiseKey& key, int impl, float* zz) {
  const uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(n) & 0xffffffffu);
  const uint32_t c3 = key.stream + (static_cast<uint32_t>(static_cast<uint64_t>(n) >> 32) << DDIM_STREAM_BITS);
#if DDIM_HAVE_X86_NOISE
  if (impl == kNoiseAvx512) return normals_avx512(g0, G, c1, c3, key, zz);
  if (impl == kNoiseAvx2) return normals_avx2(g0, G, c1, c3, key, zz);
#endif
  (void)impl;
  normals_portable(g0, G, c1, c3, key, zz);
}

// z[0, len) = the noise of flat elements [e0, e0 + len) of a (B, D) batch (element b D + j is
// element j of sample sample_offset + b). A segment never crosses a sample; a sample's first
// and last groups may be cut, so the normals go through a scratch buffer and are copied.
DDIM_INLINE void fill_noise(float* z, int64_t e0, int64_t len, int64_t D, const NoiseKey& key, int impl) {
  alignas(64) float zz[4 * kMaxNoiseGroups];
  const int64_t end = e0 + len;
  for (int64_t e = e0; e < end;) {
    const int64_t s = e / D;
    const int64_t j = e - s * D;
    const int64_t g0 = j >> 2;
    // at most kMaxNoiseGroups groups, and never past the sample's end
    const int64_t seg = std::min({end - e, D - j, 4 * kMaxNoiseGroups - (j & 3)});
    const int64_t G = ((j + seg + 3) >> 2) - g0;
    // Whole 16-groups (a tile inside a sample: the common case) go straight to z; the rest through
    // zz (saves a copy of every normal: ~5% of the step at eta = 1).
    const bool direct = (j & 3) == 0 && (seg & 63) == 0;
    normals(static_cast<uint32_t>(g0), G, key.sample_offset + s, key, impl, direct ? z : zz);
    if (!direct) std::memcpy(z, zz + (j & 3), static_cast<size_t>(seg) * sizeof(float));
    z += seg;
    e += seg;
  }
}
