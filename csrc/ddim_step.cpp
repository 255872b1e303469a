// The fused DDIM step (Song, Meng & Ermon, ICLR 2021, Eq. 12) for CPU tensors.
//
// One pass over the elements reads x_t and the model output, and writes x_prev (and
// optionally the x0-prediction):
//
//     x0     = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)          (eps / v / x0 models converted)
//     x0     = clamp(x0, -clip, clip)                         (only when clip > 0)
//     x_prev = sqrt(a_prev) x0 + c_dir eps + sigma z          (z only when stochastic)
//
// with z either a caller-given tensor or drawn in the kernel from Philox4x32-10 + Box-Muller
// under the noise contract of ddim_fast/reference.py (the numbers of triton's randn4x):
//
//     z at (seed, sample n = sample_offset + b, step k, element j of the sample)
//       = output j % 4 of Philox4x32-10(counter (j / 4, n, k, 1), key (seed_lo, seed_hi)),
//         u = float(r >= 0 ? r : ~r) * 4.6566127342e-10f,   (r as int32)
//         (z0, z1) = BoxMuller(u0, u1), (z2, z3) = BoxMuller(u2, u3).
//
// Registered as torch.ops.ddim_fast_C.step (schema below; same positional arguments as
// reference.fused_step). Importing the built module only runs the registration
// (the FlashAttention-3 flash_api.cpp pattern: an empty Python module init).
//
// The same file has the fused multistep step of ddim_fast/solvers.py (DPM-Solver++(2M)/(3M)),
// torch.ops.ddim_fast_C.multistep_step (same positional arguments as solvers.multistep_step):
//
//     x0     = (x_t - sqrt(1 - a_t) m) / sqrt(a_t) | sqrt(a_t) x_t - sqrt(1 - a_t) m | m,
//              clamped when clip > 0, stored in ring slot step % H (and x0_out)
//     x_next = c_x x_t + c_0 x0 + c_1 x0_{k-1} + c_2 x0_{k-2}   (ring terms read only where c != 0)
//
// in the reference's float32 operations and order, so its results are the reference's bits
// (multistep_cpu says why it does not fold the row as the DDIM step does).
//
// Precision and speed choices (measured on the 2-core AMD EPYC (Zen 4, AVX-512) dev box,
// 64x3x32x32 float32, 2 threads, a shared and busy machine: see bench/test_bench_step.py):
// - Arithmetic is float32 whatever the storage dtype (fp32/bf16/fp16 in and out).
// - No per-element division: the row is folded, in float64, into x_prev = A x + B m
//   (+ sigma z), and x0 = (a0 x + b0 m) r0, eps = (ae x + be m) re where the x0-prediction
//   or clipping needs them. One vdivps per 16 elements costs about as much as the whole
//   memory pass of torch.add here (~18 us), so the reference's "/ sqrt(a_t)" would miss the
//   "within 1.5x of torch.add" target. Results are within a few float32 ulps of the
//   reference; the tests bound the error by 2x the reference's own float32 error against a
//   float64 oracle (the x0 form keeps the reference's order so a small sqrt(a_t) does not
//   amplify a rounding first).
// - log/sin/cos for Box-Muller are written out here (fdlibm's logf; sin/cos by quadrant
//   reduction and cephes' polynomials with the leading terms carried exactly) instead of
//   libm/libmvec: plain IEEE operations, so the noise is the same bits on every ISA level,
//   thread count and build, and within 1e-6 of reference.gaussian (7.2e-7 worst over 2^22
//   draws; torch's own float32 log/sin/cos are off by an ulp in ~5% of cases).
// - Noise: hand-written AVX-512 (normals_avx512, 0.9 ns per normal per core) where the CPU
//   has it, else the portable loops vectorized by gcc (1.5 ns with AVX-512, which turns the
//   32x32->64-bit Philox products into vpmullq and shuffles). Both give the same bits
//   (tests/test_cpp_kernel.py checks it). torch.randn draws at ~3.4 ns per normal.
// - Built with -ffp-contract=off (FMAs only where written, so every path rounds alike) and
//   -fno-math-errno (inline vsqrtps). The step loops are compiled three times
//   (target_clones: x86-64-v4 = AVX-512, v3 = AVX2+FMA, baseline) and picked at load time,
//   so an ahead-of-time build is portable and still uses AVX-512 where present. (The
//   baseline clone calls libm's fmaf in the portable noise: correct, slow, only on pre-2013
//   x86 CPUs.)
// - Work is split into fixed 1024-element tiles (parallel_tiles, on at::parallel_for, so
//   torch.set_num_threads applies); every value depends only on its indices, so any split
//   gives the same bits.

// gcc 12 flags the _mm512_undefined_* idiom inside its own immintrin.h (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <Python.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define DDIM_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DDIM_HAVE_AVX512_NOISE 1
#else
#define DDIM_HAVE_AVX512_NOISE 0
#define DDIM_TARGET_CLONES
#endif
#define DDIM_INLINE inline __attribute__((always_inline))

namespace ddim_fast {
namespace {

constexpr int64_t kTile = 1024;               // elements per tile; 5 tile buffers = 20 KiB of L1
constexpr int64_t kMaxGroups = kTile / 4 + 2;  // Philox groups touched by one tile segment
constexpr int64_t kGrainPlain = 32;            // min tiles per thread, deterministic step (torch's 32768 elements)
constexpr int64_t kGrainNoise = 4;             // min tiles per thread when drawing noise (~1 ns per element)
constexpr int64_t kChunkPlain = 8;             // tiles handed out at a time (parallel_tiles)
constexpr int64_t kChunkNoise = 2;

// ----------------------------------------------------------------------------------------
// Noise: Philox4x32-10 (Salmon et al., SC'11; Random123 constants) and Box-Muller.
// ----------------------------------------------------------------------------------------

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // multiplies counter word 0
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;  // multiplies counter word 2
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // Weyl key increments
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int64_t kStreamStep = 1;               // reference.STREAM_STEP

struct NoiseKey {
  uint32_t k0, k1;       // seed & 0xffffffff, seed >> 32
  uint32_t step;          // counter word 2
  uint32_t stream;        // counter word 3: 0 for x_T, 1 for the per-step noise
  int64_t sample_offset;  // global index of sample 0 of this batch
};

// Counters (g0 + i, n, step, stream) for i in [0, G): r0 -> a[i], r1 -> b[i], r2 -> a[G + i], r3 -> b[G + i],
// so that Box-Muller pairs (r0, r1) and (r2, r3) are two contiguous runs of 2G pairs.
DDIM_INLINE void philox_groups(uint32_t g0, int64_t G, uint32_t n, const NoiseKey& key, uint32_t* a, uint32_t* b) {
  for (int64_t i = 0; i < G; ++i) {
    uint32_t c0 = g0 + static_cast<uint32_t>(i), c1 = n, c2 = key.step, c3 = key.stream;
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

// Natural log for normal positive floats (fdlibm/musl logf, < 1 ulp; its sums fused with FMA):
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
  return std::fma(dk, ln2_hi, (std::fma(s, hfsq + R, dk * ln2_lo) - hfsq) + f);  // dk ln2_hi is exact
}

constexpr float kTwoPi = 6.283185307179586f;

// sin and cos of th in [0, 2 pi], float32 with FMA, to within ~0.6 ulp (correctly rounded in
// ~97% of cases; torch's and numpy's float32 sin/cos are off by an ulp in 5-20% of cases,
// which is what bounds how close two implementations of the contract can be: ~7e-7).
// Quadrant q = round(th 2/pi); y = th - q pi/2 is carried as y1 + c: y1 = th - q P1 with
// P1 = float(pi/2) is exact under FMA (th and q P1 share a 2^-24 grid and |y1| < 1), and
// c = -q (pi/2 - P1) is the small rest. Then
//   sin(y) = y1 + [y1 z S(z) + c (1 - z/2)],   z = y1^2
//   cos(y) = (1 - z/2) + [z^2 C(z) - c y1],     1 - z/2 carried exactly (FMA and Fast2Sum)
// with cephes' sinf/cosf minimax polynomials S, C on [-pi/4, pi/4].
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

// 2G uniform pairs (a[p], b[p]) -> (r cos th, r sin th) with r = sqrt(-2 log u1), th = 2 pi u2:
// the float32 operation sequence of Triton's pair_uniform_to_normal.
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

// Portable: the normals of groups [g0, g0 + G) of sample n, interleaved (zz[4 i + w] = output w
// of group g0 + i). gcc vectorizes each loop; the AVX-512 version below gives the same bits.
DDIM_INLINE void normals_portable(uint32_t g0, int64_t G, uint32_t n, const NoiseKey& key, float* zz) {
  alignas(64) uint32_t a[2 * kMaxGroups], b[2 * kMaxGroups];
  alignas(64) float zc[2 * kMaxGroups], zs[2 * kMaxGroups];
  philox_groups(g0, G, n, key, a, b);
  box_muller(a, b, 2 * G, zc, zs);
  for (int64_t i = 0; i < G; ++i) {
    zz[4 * i + 0] = zc[i];
    zz[4 * i + 1] = zs[i];
    zz[4 * i + 2] = zc[G + i];
    zz[4 * i + 3] = zs[G + i];
  }
}

#if DDIM_HAVE_AVX512_NOISE
// AVX-512 normals: the same operations in the same order as normals_portable (FMAs where it
// calls std::fma), hence the same bits, at 0.9 ns per normal instead of 1.5.
#define DDIM_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))

// Philox for 32 groups in 4 independent chains of 8 groups, each group in a 64-bit lane (the
// value in the low half; vpmuludq ignores the high half, so it is never cleaned): per round 2
// multiplies, 2 shifts, 2 xor3 per chain. Measured per normal: 0.31 ns, against 0.36 with 2
// chains (the multiply latency shows) and 0.55 with 16 groups in 32-bit lanes (odd/even
// products and blends). Writes the words as 16-lane vectors: w[64 k + 16 j + lane] = word j of
// group 16 k + lane.
constexpr int kChains = 4;                     // Philox chains of 8 groups in flight (6: no faster)
constexpr int64_t kPhiloxBlock = 8 * kChains;  // groups per philox_block call

DDIM_AVX512 static inline void philox_block(uint32_t g, uint32_t n, const NoiseKey& key, const __m512i* k0,
                                        const __m512i* k1, uint32_t* w) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i mA = _mm512_set1_epi64(kPhiloxRoundA), mB = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
  for (int b = 0; b < kChains; ++b) {
    c0[b] = _mm512_add_epi64(_mm512_set1_epi64(g + 8u * b), lane);
    c1[b] = _mm512_set1_epi64(n);
    c2[b] = _mm512_set1_epi64(key.step);
    c3[b] = _mm512_set1_epi64(key.stream);
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
DDIM_AVX512 __attribute__((noinline)) void normals_avx512(uint32_t g0, int64_t G, uint32_t n, const NoiseKey& key,
                                                          float* zz) {
  alignas(64) uint32_t words[4 * (kMaxGroups + kPhiloxBlock)];
  __m512i k0[10], k1[10];  // round keys
  uint32_t w0 = key.k0, w1 = key.k1;
  for (int r = 0; r < 10; ++r, w0 += kPhiloxKeyA, w1 += kPhiloxKeyB) {
    k0[r] = _mm512_set1_epi64(w0);
    k1[r] = _mm512_set1_epi64(w1);
  }
  for (int64_t i = 0; i < G; i += kPhiloxBlock) philox_block(g0 + static_cast<uint32_t>(i), n, key, k0, k1, words + 4 * i);
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

constexpr int64_t kNoisePad = 4 * 16;  // how far past its segment normals_avx512 may write (<= 63)

// z for the flat elements [e0, e0 + len) of a (B, D) batch, into z[0, len). Each sample's
// elements are counted from 0, so a segment never crosses a sample. With `padded`, z has
// kNoisePad writable floats past len, and group-aligned segments are written in place.
DDIM_INLINE void philox_noise(float* z, int64_t e0, int64_t len, int64_t D, const NoiseKey& key, bool portable,
                              bool padded) {
  alignas(64) float zz[4 * (kMaxGroups + 31)];
  const int64_t end = e0 + len;
  for (int64_t e = e0; e < end;) {
    const int64_t s = e / D;  // sample within the batch
    const int64_t j = e - s * D;
    const int64_t seg = std::min(end - e, D - j);
    const int64_t g0 = j >> 2, G = ((j + seg + 3) >> 2) - g0;
    const uint32_t n = static_cast<uint32_t>(key.sample_offset + s);
    const bool direct = padded && (j & 3) == 0;  // later segments overwrite the spill
    float* dst = direct ? z : zz;
#if DDIM_HAVE_AVX512_NOISE
    if (kUseAvx512 && !portable)
      normals_avx512(static_cast<uint32_t>(g0), G, n, key, dst);
    else
#endif
      normals_portable(static_cast<uint32_t>(g0), G, n, key, dst);
    if (!direct) std::memcpy(z, zz + (j & 3), static_cast<size_t>(seg) * sizeof(float));
    z += seg;
    e += seg;
  }
}

// ----------------------------------------------------------------------------------------
// The step.
// ----------------------------------------------------------------------------------------

enum class Dtype : int { kF32, kBF16, kF16 };

struct Coefs {
  float A, B;        // x_prev = A x + B m                             (no clipping)
  float a0, b0, r0;  // x0 = (a0 x + b0 m) r0: the reference's order, so that a small
  float ae, be, re;  // eps = (ae x + be m) re   sqrt(a_t) does not amplify rounding first
  float sqrt_alpha_prev, c_dir, sigma, clip;
};

struct StepArgs {
  const void* x;
  const void* m;
  const void* noise;  // null: Philox
  void* out;
  void* x0;  // null: not wanted
  Dtype xt, mt, nt, ot, x0t;
  int64_t numel, D;
  bool clip, stochastic;
  Coefs c;
  NoiseKey key;
};

// Tile of a dtype as float32: fp32 storage is used in place, bf16/fp16 are widened into buf.
DDIM_INLINE const float* load_tile(const void* base, Dtype t, int64_t e0, int64_t n, float* buf) {
  switch (t) {
    case Dtype::kF32:
      return static_cast<const float*>(base) + e0;
    case Dtype::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + e0;
      for (int64_t i = 0; i < n; ++i) buf[i] = bits_to_float(static_cast<uint32_t>(s[i]) << 16);
      return buf;
    }
    case Dtype::kF16: {
      const c10::Half* s = static_cast<const c10::Half*>(base) + e0;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(s[i]);
      return buf;
    }
  }
  return buf;
}

// Where the kernel writes a tile: in place for fp32 storage, else buf (narrowed by store_tile).
DDIM_INLINE float* out_tile(void* base, Dtype t, int64_t e0, float* buf) {
  return t == Dtype::kF32 ? static_cast<float*>(base) + e0 : buf;
}

DDIM_INLINE void store_tile(void* base, Dtype t, int64_t e0, int64_t n, const float* buf) {
  if (t == Dtype::kBF16) {
    c10::BFloat16* d = static_cast<c10::BFloat16*>(base) + e0;
    for (int64_t i = 0; i < n; ++i) d[i] = c10::BFloat16(buf[i]);  // round to nearest even, as copy_
  } else if (t == Dtype::kF16) {
    c10::Half* d = static_cast<c10::Half*>(base) + e0;
    for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(buf[i]);
  }
}

// One tile of Eq. 12. out (and x0o) may be the very same memory as x or m (in-place update:
// each element is read before it is written, at the same index), hence ivdep, not restrict.
template <bool kClip, bool kNoise, bool kX0>
DDIM_INLINE void step_tile(const float* x, const float* m, const float* z, float* out, float* x0o, int64_t n,
                           const Coefs& c) {
  if constexpr (!kClip) {
    const float A = c.A, B = c.B, sigma = c.sigma, a0 = c.a0, b0 = c.b0, r0 = c.r0;
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      const float xi = x[i], mi = m[i];
      float v = A * xi + B * mi;
      if constexpr (kNoise) v = v + sigma * z[i];
      if constexpr (kX0) x0o[i] = (a0 * xi + b0 * mi) * r0;
      out[i] = v;
    }
  } else {
    const float a0 = c.a0, b0 = c.b0, r0 = c.r0, ae = c.ae, be = c.be, re = c.re;
    const float sap = c.sqrt_alpha_prev, cdir = c.c_dir, sigma = c.sigma, lo = -c.clip, hi = c.clip;
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      const float xi = x[i], mi = m[i];
      float x0 = (a0 * xi + b0 * mi) * r0;
      const float eps = (ae * xi + be * mi) * re;
      x0 = x0 < lo ? lo : x0;  // NaN stays NaN, as torch.clamp
      x0 = x0 > hi ? hi : x0;
      float v = sap * x0 + cdir * eps;
      if constexpr (kNoise) v = v + sigma * z[i];
      if constexpr (kX0) x0o[i] = x0;
      out[i] = v;
    }
  }
}

template <bool kClip, bool kNoise>
DDIM_INLINE void step_tile_x0(bool want_x0, const float* x, const float* m, const float* z, float* out, float* x0o,
                              int64_t n, const Coefs& c) {
  if (want_x0)
    step_tile<kClip, kNoise, true>(x, m, z, out, x0o, n, c);
  else
    step_tile<kClip, kNoise, false>(x, m, z, out, x0o, n, c);
}

// Elements [begin, end): the hot path, compiled once per ISA level (target_clones).
DDIM_TARGET_CLONES void step_range(const StepArgs& a, int64_t begin, int64_t end) {
  alignas(64) float bx[kTile], bm[kTile], bz[kTile + kNoisePad], bo[kTile], bx0[kTile];
  for (int64_t e0 = begin; e0 < end; e0 += kTile) {
    const int64_t n = std::min(kTile, end - e0);
    const float* x = load_tile(a.x, a.xt, e0, n, bx);
    const float* m = load_tile(a.m, a.mt, e0, n, bm);
    const float* z = nullptr;
    if (a.stochastic) {
      if (a.noise != nullptr) {
        z = load_tile(a.noise, a.nt, e0, n, bz);
      } else {
        philox_noise(bz, e0, n, a.D, a.key, false, true);
        z = bz;
      }
    }
    float* out = out_tile(a.out, a.ot, e0, bo);
    float* x0o = a.x0 != nullptr ? out_tile(a.x0, a.x0t, e0, bx0) : nullptr;
    const bool want_x0 = x0o != nullptr;
    if (a.clip) {
      if (a.stochastic)
        step_tile_x0<true, true>(want_x0, x, m, z, out, x0o, n, a.c);
      else
        step_tile_x0<true, false>(want_x0, x, m, z, out, x0o, n, a.c);
    } else {
      if (a.stochastic)
        step_tile_x0<false, true>(want_x0, x, m, z, out, x0o, n, a.c);
      else
        step_tile_x0<false, false>(want_x0, x, m, z, out, x0o, n, a.c);
    }
    if (a.ot != Dtype::kF32) store_tile(a.out, a.ot, e0, n, bo);
    if (want_x0 && a.x0t != Dtype::kF32) store_tile(a.x0, a.x0t, e0, n, bx0);
  }
}

// Standard normals of the noise contract for a (B, D) float32 buffer (tests and x_T draws).
DDIM_TARGET_CLONES void noise_range(float* z, int64_t begin, int64_t end, int64_t D, const NoiseKey& key,
                                    bool portable) {
  for (int64_t e0 = begin; e0 < end; e0 += kTile)
    philox_noise(z + e0, e0, std::min(kTile, end - e0), D, key, portable, false);
}

// ----------------------------------------------------------------------------------------
// The fused multistep step (DPM-Solver++(2M)/(3M), ddim_fast/solvers.py; issue 8).
// ----------------------------------------------------------------------------------------

struct MultistepArgs {
  const void* x;
  const void* m;
  Dtype xt, mt;
  float* out;         // x_next, float32, dense (may be x itself)
  float* hw;          // ring slot step % H: x0_k
  float* x0;          // copy of x0_k; null: not wanted
  const float* h1;    // ring slot of x0_{k-1}; null: not read (H < 2, or c_1 = 0)
  const float* h2;    // ring slot of x0_{k-2}; null: not read (H < 3, or c_2 = 0)
  bool zero1, zero2;  // the ring term exists but its coefficient is 0: the reference adds +0
  int prediction;     // 0 epsilon, 1 v, 2 x0
  bool clip;
  float sa, s1m, c_x, c_0, c_1, c_2, lo, hi;
};

// Pass 1 of a tile: x0 (the reference's operations, in its order) into the ring slot, and
// x_next = c_x x + c_0 x0 into out. out and hw may be the very memory of x or m (each
// element is read before it is written, at the same index), hence ivdep, not restrict.
template <int kPred, bool kClip>
DDIM_INLINE void multistep_tile(const float* x, const float* m, float* out, float* hw, int64_t n,
                                const MultistepArgs& a) {
  const float sa = a.sa, s1m = a.s1m, cx = a.c_x, c0 = a.c_0, lo = a.lo, hi = a.hi;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i], mi = m[i];
    float x0;
    if constexpr (kPred == 0)
      x0 = (xi - s1m * mi) / sa;  // a true division: the reference's bits (see the note in multistep_cpu)
    else if constexpr (kPred == 1)
      x0 = sa * xi - s1m * mi;
    else
      x0 = mi;
    if constexpr (kClip) {
      x0 = x0 < lo ? lo : x0;  // NaN stays NaN, as torch.clamp
      x0 = x0 > hi ? hi : x0;
    }
    const float v = cx * xi + c0 * x0;
    hw[i] = x0;
    out[i] = v;
  }
}

// Later passes over the tile (in L1): + c h[i], or + 0 where the reference adds a masked-off
// term (it turns -0 into +0; nothing is read).
DDIM_INLINE void multistep_add_term(float* out, const float* h, float c, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] + c * h[i];
}

DDIM_INLINE void multistep_add_zero(float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] + 0.0f;
}

template <int kPred>
DDIM_INLINE void multistep_tile_clip(const float* x, const float* m, float* out, float* hw, int64_t n,
                                     const MultistepArgs& a) {
  if (a.clip)
    multistep_tile<kPred, true>(x, m, out, hw, n, a);
  else
    multistep_tile<kPred, false>(x, m, out, hw, n, a);
}

// Elements [begin, end), compiled once per ISA level (target_clones) as step_range.
DDIM_TARGET_CLONES void multistep_range(const MultistepArgs& a, int64_t begin, int64_t end) {
  alignas(64) float bx[kTile], bm[kTile];
  for (int64_t e0 = begin; e0 < end; e0 += kTile) {
    const int64_t n = std::min(kTile, end - e0);
    const float* x = load_tile(a.x, a.xt, e0, n, bx);
    const float* m = load_tile(a.m, a.mt, e0, n, bm);
    float* out = a.out + e0;
    float* hw = a.hw + e0;
    switch (a.prediction) {
      case 0:
        multistep_tile_clip<0>(x, m, out, hw, n, a);
        break;
      case 1:
        multistep_tile_clip<1>(x, m, out, hw, n, a);
        break;
      default:
        multistep_tile_clip<2>(x, m, out, hw, n, a);
        break;
    }
    // x_next = ((c_x x + c_0 x0_k) + c_1 x0_{k-1}) + c_2 x0_{k-2}, the reference's order.
    if (a.h1 != nullptr)
      multistep_add_term(out, a.h1 + e0, a.c_1, n);
    else if (a.zero1)
      multistep_add_zero(out, n);
    if (a.h2 != nullptr)
      multistep_add_term(out, a.h2 + e0, a.c_2, n);
    else if (a.zero2)
      multistep_add_zero(out, n);
    if (a.x0 != nullptr) std::memcpy(a.x0 + e0, hw, static_cast<size_t>(n) * sizeof(float));
  }
}

// ----------------------------------------------------------------------------------------
// Host side: argument checks, the coefficient fold, the parallel split.
// ----------------------------------------------------------------------------------------

// Runs fn(tile_begin, tile_end) over [0, tiles) on at::get_num_threads() threads (at most one
// per `grain` tiles). Each thread owns a contiguous share, as in at::parallel_for, and takes it
// `chunk` tiles at a time from an atomic counter; a thread done with its share goes on with the
// others' counters. Owning a share keeps each thread on the same data call after call (its
// L2); taking over the rest matters on these 2 shared cores, where a thread that loses its
// core to another process would otherwise hold the whole step up for a scheduler tick (~8 ms
// measured). Which thread computes which element never changes a value.
struct alignas(64) TileCounter {
  std::atomic<int64_t> next;
};

template <class F>
void parallel_tiles(int64_t tiles, int64_t grain, int64_t chunk, const F& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tiles / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(0, tiles);
    return;
  }
  const int64_t chunks = (tiles + chunk - 1) / chunk;
  std::unique_ptr<TileCounter[]> share(new TileCounter[threads]);
  for (int64_t t = 0; t < threads; ++t) share[t].next.store(chunks * t / threads, std::memory_order_relaxed);
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t) {
    for (int64_t k = 0; k < threads; ++k) {
      const int64_t t = (first + k) % threads;  // its own share first, then the others'
      const int64_t end = chunks * (t + 1) / threads;
      for (int64_t c = share[t].next.fetch_add(1, std::memory_order_relaxed); c < end;
           c = share[t].next.fetch_add(1, std::memory_order_relaxed))
        fn(c * chunk, std::min(tiles, (c + 1) * chunk));
    }
  });
}

constexpr const char* kStepOp = "ddim_fast_C::step";
constexpr const char* kMultistepOp = "ddim_fast_C::multistep_step";

Dtype float_dtype(const at::Tensor& t, const char* name, const char* op = kStepOp) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kF32;
    case at::kBFloat16:
      return Dtype::kBF16;
    case at::kHalf:
      return Dtype::kF16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return Dtype::kF32;
}

void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op = kStepOp) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
}

NoiseKey make_key(const at::Tensor& seed, int64_t step, int64_t stream) {
  TORCH_CHECK(seed.device().is_cpu(), "ddim_fast_C::step: seed must be a CPU tensor, got ", seed.device());
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2,
              "ddim_fast_C::step: seed must be an int64 tensor (seed, sample_offset) of 2 elements, got ",
              seed.scalar_type(), " with ", seed.numel(), " elements");
  const at::Tensor s = seed.contiguous();
  const int64_t value = s.const_data_ptr<int64_t>()[0];
  const int64_t offset = s.const_data_ptr<int64_t>()[1];
  TORCH_CHECK(value >= 0, "ddim_fast_C::step: seed must be in [0, 2**63), got ", value);
  TORCH_CHECK(offset >= 0, "ddim_fast_C::step: seed[1] (sample_offset) must be >= 0, got ", offset);
  NoiseKey key;
  key.k0 = static_cast<uint32_t>(static_cast<uint64_t>(value) & 0xffffffffu);
  key.k1 = static_cast<uint32_t>(static_cast<uint64_t>(value) >> 32);
  key.step = static_cast<uint32_t>(step);
  key.stream = static_cast<uint32_t>(stream);
  key.sample_offset = offset;
  return key;
}

// Fold the table row (float32, read in float64) into the per-element coefficients of Eq. 12.
Coefs make_coefs(const at::Tensor& coef, int64_t step, int64_t prediction, double clip) {
  TORCH_CHECK(coef.device().is_cpu(), "ddim_fast_C::step: coef must be a CPU tensor, got ", coef.device());
  TORCH_CHECK(coef.scalar_type() == at::kFloat, "ddim_fast_C::step: coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == 5, "ddim_fast_C::step: coef must have shape (S, 5), got ",
              coef.sizes());
  TORCH_CHECK(step >= 0 && step < coef.size(0), "ddim_fast_C::step: step ", step, " out of range for coef with ",
              coef.size(0), " rows");
  const float* row = coef.const_data_ptr<float>() + step * coef.stride(0);
  const int64_t cs = coef.stride(1);
  const double sa = row[0], s1m = row[cs], sap = row[2 * cs], cdir = row[3 * cs];
  double a0, b0, r0, ae, be, re;  // x0 = (a0 x + b0 m) r0, eps = (ae x + be m) re
  switch (prediction) {
    case 0:  // epsilon: x0 = (x - s1m eps) / sa
      a0 = 1.0, b0 = -s1m, r0 = 1.0 / sa, ae = 0.0, be = 1.0, re = 1.0;
      break;
    case 1:  // v: x0 = sa x - s1m v, eps = sa v + s1m x
      a0 = sa, b0 = -s1m, r0 = 1.0, ae = s1m, be = sa, re = 1.0;
      break;
    case 2:  // x0: eps = (x - sa x0) / s1m
      a0 = 0.0, b0 = 1.0, r0 = 1.0, ae = 1.0, be = -sa, re = 1.0 / s1m;
      break;
    default:
      TORCH_CHECK(false, "ddim_fast_C::step: prediction must be 0 (epsilon), 1 (v) or 2 (x0), got ", prediction);
  }
  Coefs c;
  c.A = static_cast<float>(sap * a0 * r0 + cdir * ae * re);
  c.B = static_cast<float>(sap * b0 * r0 + cdir * be * re);
  c.a0 = static_cast<float>(a0);
  c.b0 = static_cast<float>(b0);
  c.r0 = static_cast<float>(r0);
  c.ae = static_cast<float>(ae);
  c.be = static_cast<float>(be);
  c.re = static_cast<float>(re);
  c.sqrt_alpha_prev = row[2 * cs];
  c.c_dir = row[3 * cs];
  c.sigma = row[4 * cs];
  c.clip = static_cast<float>(clip);
  return c;
}

void step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef, int64_t step,
              const at::Tensor& seed, int64_t prediction, double clip, bool stochastic,
              const std::optional<at::Tensor>& noise, const at::Tensor& out, const std::optional<at::Tensor>& x0_out) {
  TORCH_CHECK(x.device().is_cpu(), "ddim_fast_C::step: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, "ddim_fast_C::step: x must have a batch dimension, got a 0-d tensor");
  check_like_x(model_out, x, "model_out");
  check_like_x(out, x, "out");
  StepArgs a;
  a.xt = float_dtype(x, "x");
  a.mt = float_dtype(model_out, "model_out");
  a.ot = float_dtype(out, "out");
  a.c = make_coefs(coef, step, prediction, clip);
  a.clip = clip > 0.0;
  a.stochastic = stochastic;
  const bool has_x0 = x0_out.has_value();
  if (has_x0) {
    check_like_x(*x0_out, x, "x0_out");
    a.x0t = float_dtype(*x0_out, "x0_out");
  } else {
    a.x0t = Dtype::kF32;
  }
  const bool given_noise = stochastic && noise.has_value();
  if (given_noise) {
    check_like_x(*noise, x, "noise");
    a.nt = float_dtype(*noise, "noise");
  } else {
    a.nt = Dtype::kF32;
  }
  if (stochastic && !given_noise) a.key = make_key(seed, step, kStreamStep);

  // In-place use (out is x) is fine; a partial overlap would read already-written elements.
  at::assert_no_partial_overlap(out, x);
  at::assert_no_partial_overlap(out, model_out);
  if (has_x0) {
    at::assert_no_overlap(out, *x0_out);
    at::assert_no_partial_overlap(*x0_out, x);
    at::assert_no_partial_overlap(*x0_out, model_out);
  }
  if (given_noise) {
    at::assert_no_partial_overlap(out, *noise);
    if (has_x0) at::assert_no_partial_overlap(*x0_out, *noise);
  }

  const int64_t numel = x.numel();
  if (numel == 0) return;
  const at::Tensor xc = x.contiguous(), mc = model_out.contiguous();
  at::Tensor nc;
  if (given_noise) nc = noise->contiguous();
  // Non-contiguous outputs are computed into a dense buffer and copied back.
  const at::Tensor oc = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  at::Tensor x0c;
  if (has_x0) x0c = x0_out->is_contiguous() ? *x0_out : at::empty_like(*x0_out, at::MemoryFormat::Contiguous);

  a.x = xc.const_data_ptr();
  a.m = mc.const_data_ptr();
  a.noise = given_noise ? nc.const_data_ptr() : nullptr;
  a.out = oc.mutable_data_ptr();
  a.x0 = has_x0 ? x0c.mutable_data_ptr() : nullptr;
  a.numel = numel;
  a.D = numel / x.size(0);

  const int64_t tiles = (numel + kTile - 1) / kTile;
  const bool philox = stochastic && !given_noise;
  parallel_tiles(tiles, philox ? kGrainNoise : kGrainPlain, philox ? kChunkNoise : kChunkPlain,
                 [&](int64_t t0, int64_t t1) { step_range(a, t0 * kTile, std::min(t1 * kTile, numel)); });

  if (!oc.is_same(out)) out.copy_(oc);
  if (has_x0 && !x0c.is_same(*x0_out)) x0_out->copy_(x0c);
}

void step_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, int64_t, double,
               bool, const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&) {}

// One fused multistep step: the contract of solvers.multistep_step (x_next into out, x0_k into
// ring slot step % H and, when given, x0_out; x0_{k-1}, x0_{k-2} read from the slots before it
// only where their coefficient is non-zero). The table row is read here, at each call, from
// coef's memory (as step_cpu does), never cached.
//
// Unlike step_cpu this does not fold the row: the elements go through the reference's float32
// operations in its order, the division by sqrt(a_t) included, so that backend="cpp" gives the
// reference's (and the interpreted Triton kernel's) bits and a sampler's trajectory does not
// depend on the backend. (-ffp-contract=off: no FMA contraction.)
void multistep_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& coef, int64_t step,
                   int64_t prediction, double clip, const at::Tensor& history, const at::Tensor& out,
                   const std::optional<at::Tensor>& x0_out) {
  const char* op = kMultistepOp;
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  check_like_x(model_out, x, "model_out", op);
  check_like_x(out, x, "out", op);
  MultistepArgs a{};
  a.xt = float_dtype(x, "x", op);
  a.mt = float_dtype(model_out, "model_out", op);
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32, got ", out.scalar_type());
  const bool has_x0 = x0_out.has_value();
  if (has_x0) {
    check_like_x(*x0_out, x, "x0_out", op);
    TORCH_CHECK(x0_out->scalar_type() == at::kFloat, op, ": x0_out must be float32, got ", x0_out->scalar_type());
  }
  TORCH_CHECK(history.device().is_cpu(), op, ": history must be a CPU tensor, got ", history.device());
  TORCH_CHECK(history.scalar_type() == at::kFloat, op, ": history must be float32, got ", history.scalar_type());
  TORCH_CHECK(history.dim() == x.dim() + 1 && history.size(0) >= 1 && history.size(0) <= 3 &&
                  history.sizes().slice(1) == x.sizes(),
              op, ": history must have shape (H, *x.shape) with H in 1..3, x.shape = ", x.sizes(), ", got ",
              history.sizes());
  TORCH_CHECK(history.is_contiguous(), op, ": history must be contiguous (the sampler's ring buffer), got strides ",
              history.strides());
  TORCH_CHECK(coef.device().is_cpu(), op, ": coef must be a CPU tensor, got ", coef.device());
  TORCH_CHECK(coef.scalar_type() == at::kFloat, op, ": coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == 6, op,
              ": coef must have shape (S, 6) (solvers.MULTISTEP_COLUMNS), got ", coef.sizes());
  TORCH_CHECK(step >= 0 && step < coef.size(0), op, ": step ", step, " out of range for coef with ", coef.size(0),
              " rows");
  TORCH_CHECK(prediction >= 0 && prediction <= 2, op, ": prediction must be 0 (epsilon), 1 (v) or 2 (x0), got ",
              prediction);

  const int64_t H = history.size(0);
  const int64_t w = step % H, p1 = (step + H - 1) % H, p2 = (step + 2 * H - 2) % H;  // solvers.history_slots

  // In-place use (out is x) is fine; a partial overlap would read already-written elements.
  // The ring is written (slot w) and read (the others): no output may share its memory.
  at::assert_no_partial_overlap(out, x);
  at::assert_no_partial_overlap(out, model_out);
  at::assert_no_overlap(out, history);
  const at::Tensor slot_w = history.select(0, w);
  at::assert_no_partial_overlap(slot_w, x);
  at::assert_no_partial_overlap(slot_w, model_out);
  if (has_x0) {
    at::assert_no_overlap(out, *x0_out);
    at::assert_no_overlap(*x0_out, history);
    at::assert_no_partial_overlap(*x0_out, x);
    at::assert_no_partial_overlap(*x0_out, model_out);
  }

  const float* row = coef.const_data_ptr<float>() + step * coef.stride(0);
  const int64_t cs = coef.stride(1);
  a.sa = row[0];
  a.s1m = row[cs];
  a.c_x = row[2 * cs];
  a.c_0 = row[3 * cs];
  a.c_1 = row[4 * cs];
  a.c_2 = row[5 * cs];
  a.prediction = static_cast<int>(prediction);
  a.clip = clip > 0.0;
  a.lo = -static_cast<float>(clip);
  a.hi = static_cast<float>(clip);

  const int64_t numel = x.numel();
  if (numel == 0) return;
  const at::Tensor xc = x.contiguous(), mc = model_out.contiguous();
  // Non-contiguous outputs are computed into a dense buffer and copied back.
  const at::Tensor oc = out.is_contiguous() ? out : at::empty_like(out, at::MemoryFormat::Contiguous);
  at::Tensor x0c;
  if (has_x0) x0c = x0_out->is_contiguous() ? *x0_out : at::empty_like(*x0_out, at::MemoryFormat::Contiguous);
  float* ring = history.mutable_data_ptr<float>();
  a.x = xc.const_data_ptr();
  a.m = mc.const_data_ptr();
  a.out = oc.mutable_data_ptr<float>();
  a.x0 = has_x0 ? x0c.mutable_data_ptr<float>() : nullptr;
  a.hw = ring + w * numel;
  if (H >= 2) {
    if (a.c_1 != 0.0f)  // (a NaN coefficient reads, as the reference's where(c_1 != 0, ...))
      a.h1 = ring + p1 * numel;
    else
      a.zero1 = true;
  }
  if (H >= 3) {
    if (a.c_2 != 0.0f)
      a.h2 = ring + p2 * numel;
    else
      a.zero2 = true;
  }

  const int64_t tiles = (numel + kTile - 1) / kTile;
  parallel_tiles(tiles, kGrainPlain, kChunkPlain,
                 [&](int64_t t0, int64_t t1) { multistep_range(a, t0 * kTile, std::min(t1 * kTile, numel)); });

  if (!oc.is_same(out)) out.copy_(oc);
  if (has_x0 && !x0c.is_same(*x0_out)) x0_out->copy_(x0c);
}

void multistep_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double,
                    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {}

// Noise of the contract for `shape` = (B, ...): reference.gaussian(seed[0], shape, step=step,
// stream=stream, sample_offset=seed[1]) on its own (tests; x_T draws use stream 0).
// portable=True forces the plain C++ generator (tests check it gives the AVX-512 bits).
at::Tensor gaussian_cpu(const at::Tensor& seed, at::IntArrayRef shape, int64_t step, int64_t stream, bool portable) {
  TORCH_CHECK(!shape.empty(), "ddim_fast_C::gaussian: shape must have a batch dimension");
  const NoiseKey key = make_key(seed, step, stream);
  at::Tensor z = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  const int64_t numel = z.numel();
  if (numel == 0) return z;
  const int64_t D = numel / shape[0];
  float* zp = z.mutable_data_ptr<float>();
  const int64_t tiles = (numel + kTile - 1) / kTile;
  parallel_tiles(tiles, kGrainNoise, kChunkNoise, [&](int64_t t0, int64_t t1) {
    noise_range(zp, t0 * kTile, std::min(t1 * kTile, numel), D, key, portable);
  });
  return z;
}

at::Tensor gaussian_meta(const at::Tensor&, at::IntArrayRef shape, int64_t, int64_t, bool) {
  return at::empty(shape, at::TensorOptions().dtype(at::kFloat).device(at::kMeta));
}

}  // namespace

TORCH_LIBRARY(ddim_fast_C, m) {
  m.def(
      "step(Tensor x, Tensor model_out, Tensor coef, int step, Tensor seed, int prediction, float clip, "
      "bool stochastic, Tensor? noise, Tensor(a!) out, Tensor(b!)? x0_out) -> ()");
  m.def("gaussian(Tensor seed, int[] shape, int step=0, int stream=1, bool portable=False) -> Tensor");
  m.def(
      "multistep_step(Tensor x, Tensor model_out, Tensor coef, int step, int prediction, float clip, "
      "Tensor(a!) history, Tensor(b!) out, Tensor(c!)? x0_out) -> ()");
}

TORCH_LIBRARY_IMPL(ddim_fast_C, CPU, m) {
  m.impl("step", &step_cpu);
  m.impl("gaussian", &gaussian_cpu);
  m.impl("multistep_step", &multistep_cpu);
}

TORCH_LIBRARY_IMPL(ddim_fast_C, Meta, m) {
  m.impl("step", &step_meta);
  m.impl("gaussian", &gaussian_meta);
  m.impl("multistep_step", &multistep_meta);
}

}  // namespace ddim_fast

// Importing the built module (ddim_fast._C) runs the static registrations above; the module
// itself is empty. TORCH_EXTENSION_NAME is set by torch.utils.cpp_extension.
#ifdef TORCH_EXTENSION_NAME
#define DDIM_CONCAT_(a, b) a##b
#define DDIM_CONCAT(a, b) DDIM_CONCAT_(a, b)
#define DDIM_STR_(a) #a
#define DDIM_STR(a) DDIM_STR_(a)
extern "C" PyMODINIT_FUNC DDIM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, DDIM_STR(TORCH_EXTENSION_NAME),
                                          "ddim_fast_C ops (registered on import)", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
