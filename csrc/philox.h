// The noise of the contract (ddim_fast/reference.py, ddim_fast/layout.py): Philox4x32-10
// (Salmon et al., SC'11; Random123's constants) and Box-Muller, as triton's randn4x.
//
//     z at (seed, global sample n, step k, element j of the sample, stream s)
//       = output j % 4 of Philox4x32-10(counter (j / 4, n mod 2^32, k, s + (n >> 32) << STREAM_BITS),
//                                       key (seed_lo, seed_hi)),
//         u = float(r >= 0 ? r : ~r) * 4.6566127342e-10f   (r as int32),
//         (z0, z1) = BoxMuller(u0, u1), (z2, z3) = BoxMuller(u2, u3).
//
// One path, plain C++ that gcc vectorizes (the 32x32->64-bit Philox products become vpmuludq):
// ~1.5 ns per normal per core with AVX-512, against ~3.4 ns for torch.randn. log, sin and cos
// are written out (fdlibm's logf; sin/cos by quadrant reduction and cephes' polynomials)
// because libm's scalar calls do not vectorize: with them the generator is ~5x slower. They
// are within ~1 float32 ulp, so the noise is within ~1e-6 of reference.gaussian.
//
// Included by ddim_step.cpp only (inside its anonymous namespace); needs DDIM_INLINE.

#pragma once

#include <algorithm>
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

constexpr int64_t kMaxNoiseGroups = 512;  // Philox groups per normals() call (2,048 normals)

// The normals of groups [g0, g0 + G) of global sample n (G <= kMaxNoiseGroups), interleaved:
// zz[4 i + w] = output w of group g0 + i.
DDIM_INLINE void normals(uint32_t g0, int64_t G, int64_t n, const NoiseKey& key, float* zz) {
  alignas(64) uint32_t a[2 * kMaxNoiseGroups], b[2 * kMaxNoiseGroups];
  alignas(64) float zc[2 * kMaxNoiseGroups], zs[2 * kMaxNoiseGroups];
  const uint32_t c1 = static_cast<uint32_t>(static_cast<uint64_t>(n) & 0xffffffffu);
  const uint32_t c3 = key.stream + (static_cast<uint32_t>(static_cast<uint64_t>(n) >> 32) << DDIM_STREAM_BITS);
  philox_groups(g0, G, c1, c3, key, a, b);
  box_muller(a, b, 2 * G, zc, zs);
  for (int64_t i = 0; i < G; ++i) {
    zz[4 * i + 0] = zc[i];
    zz[4 * i + 1] = zs[i];
    zz[4 * i + 2] = zc[G + i];
    zz[4 * i + 3] = zs[G + i];
  }
}

// z[0, len) = the noise of flat elements [e0, e0 + len) of a (B, D) batch (element b D + j is
// element j of sample sample_offset + b). A segment never crosses a sample; a sample's first
// and last groups may be cut, so the normals go through a scratch buffer and are copied.
DDIM_INLINE void fill_noise(float* z, int64_t e0, int64_t len, int64_t D, const NoiseKey& key) {
  alignas(64) float zz[4 * kMaxNoiseGroups];
  const int64_t end = e0 + len;
  for (int64_t e = e0; e < end;) {
    const int64_t s = e / D;
    const int64_t j = e - s * D;
    const int64_t g0 = j >> 2;
    // at most kMaxNoiseGroups groups, and never past the sample's end
    const int64_t seg = std::min({end - e, D - j, 4 * kMaxNoiseGroups - (j & 3)});
    const int64_t G = ((j + seg + 3) >> 2) - g0;
    normals(static_cast<uint32_t>(g0), G, key.sample_offset + s, key, zz);
    std::memcpy(z, zz + (j & 3), static_cast<size_t>(seg) * sizeof(float));
    z += seg;
    e += seg;
  }
}
