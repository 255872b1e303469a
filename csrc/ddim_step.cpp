// The one fused step of ddim_fast/layout.py for CPU tensors: torch.ops.ddim_fast_C.step.
//
// One pass over the elements evaluates row `step` of a solver's coefficient table:
//
//     x0, eps = the model output m converted with the row's sqrt(a_t), sqrt(1 - a_t)
//               (epsilon / v / x0 prediction); x0 clamped to [-clip, clip] when clip > 0
//     x_next  = c_x x + c_x0 x0 + c_eps eps + c_saved saved + sum_j c_hj H[(step - j) mod R] + sigma z
//     saved  <- d_x x + d_x0 x0 + d_eps eps + d_saved saved + sum_j d_hj H[(step - j) mod R]
//     H[step mod R] <- x0 or eps;  flags[step] |= (m non-finite, x_next non-finite)
//
// with z the explicit `noise` or the Philox stream of philox.h. A saved or history term whose
// coefficient is 0 is not read. Every read of an element happens before its writes, so `out`
// may be `x` and the ring has no spare slot. Column indices and encodings come only from the
// -DDDIM_* flags of layout.cxx_defines() (ddim_fast/_ext.py passes them).
//
// Also registered: gaussian(seed, shape, step, stream) (the noise alone: tests, x_T draws) and
// contract_version(). Importing the built module only runs the registrations (the
// FlashAttention-3 flash_api.cpp pattern: an empty Python module init).
//
// Numerics: float32 arithmetic whatever the model output's dtype, within 2x PyTorch's own
// float32 error of the float64 reference (tests/test_cpp_kernel.py). No per-element division:
// without clipping the row is folded, in float64, into x_next = A x + B m + ..., and x0 / eps
// are (a x + b m) r with r = 1 / sqrt(a_t) or 1 / sqrt(1 - a_t) (one vdivps per 16 elements
// costs about as much as the whole memory pass of torch.add at 64x3x32x32).
//
// Speed: three loops, each one pass over memory. The plain row (no ring, no saved state: DDIM)
// reads x and m and writes out (and x0_out): 1.0-1.1x one torch.add at 64x3x32x32. A row with
// a ring (the multistep solvers) adds the ring terms it reads and writes one slot: 2M 1.5x
// torch.add (5 tensors streamed against 3). A row with a saved state runs, per 1,024-element
// tile in L1, one loop for x0 / eps / the folded part and one short loop per present term.
// The finite flags are an integer max over exponent bits inside those loops. Tiles
// are spread over at::get_num_threads() threads (parallel_tiles); every value depends only on
// its element's indices, so any thread count gives the same bits. Built with -ffp-contract=off
// (FMAs only where written) and compiled per ISA level (target_clones: x86-64-v4 = AVX-512,
// v3 = AVX2 + FMA, baseline), picked at load time, so one binary is portable and fast.

// gcc 12 flags the _mm512_undefined_* idiom inside its own immintrin.h (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>

#if !defined(DDIM_CONTRACT_VERSION) || !defined(DDIM_NUM_COLUMNS) || !defined(DDIM_HISTORY_TERMS) ||       \
    !defined(DDIM_COL_SQRT_ALPHA) || !defined(DDIM_COL_SQRT_ONE_MINUS_ALPHA) || !defined(DDIM_COL_C_X) ||  \
    !defined(DDIM_COL_C_X0) || !defined(DDIM_COL_C_EPS) || !defined(DDIM_COL_C_SAVED) ||                   \
    !defined(DDIM_COL_SIGMA) || !defined(DDIM_COL_C_H1) || !defined(DDIM_COL_C_H2) ||                      \
    !defined(DDIM_COL_C_H3) || !defined(DDIM_COL_D_X) || !defined(DDIM_COL_D_X0) ||                        \
    !defined(DDIM_COL_D_EPS) || !defined(DDIM_COL_D_SAVED) || !defined(DDIM_COL_D_H1) ||                   \
    !defined(DDIM_COL_D_H2) || !defined(DDIM_COL_D_H3)
#error "csrc/ddim_step.cpp needs the column flags of ddim_fast.layout.cxx_defines() (-DDDIM_COL_*; see ddim_fast/_ext.py)"
#endif
#if !defined(DDIM_PRED_EPSILON) || !defined(DDIM_PRED_V) || !defined(DDIM_PRED_X0) ||                      \
    !defined(DDIM_HISTORY_X0) || !defined(DDIM_HISTORY_EPS) || !defined(DDIM_FLAG_MODEL) ||                \
    !defined(DDIM_FLAG_STATE) || !defined(DDIM_STREAM_X_T) || !defined(DDIM_STREAM_STEP) ||                \
    !defined(DDIM_STREAM_BITS)
#error "csrc/ddim_step.cpp needs the encoding flags of ddim_fast.layout.cxx_defines() (-DDDIM_PRED_*, ...)"
#endif
static_assert(DDIM_HISTORY_TERMS == 3, "the kernel reads the history columns c_h1..c_h3 / d_h1..d_h3");

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define DDIM_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define DDIM_HAVE_X86_NOISE 1
#else
#define DDIM_TARGET_CLONES
#define DDIM_HAVE_X86_NOISE 0
#endif
#define DDIM_INLINE inline __attribute__((always_inline))

namespace ddim_fast {
namespace {

#include "philox.h"

constexpr int64_t kTile = 1024;        // elements per tile: the general path's 5 tile buffers = 20 KiB of L1
constexpr int64_t kGrainPlain = 32;    // min tiles per thread without noise (torch's 32,768 elements)
constexpr int64_t kGrainNoise = 4;     // min tiles per thread when drawing noise (~0.6 ns per element)
constexpr int64_t kChunkPlain = 8;     // tiles a thread takes at a time (parallel_tiles)
constexpr int64_t kChunkNoise = 2;
constexpr uint32_t kExpMask = 0x7f800000u;  // float32 exponent bits: all ones = inf or NaN

constexpr int kColCH[DDIM_HISTORY_TERMS] = {DDIM_COL_C_H1, DDIM_COL_C_H2, DDIM_COL_C_H3};
constexpr int kColDH[DDIM_HISTORY_TERMS] = {DDIM_COL_D_H1, DDIM_COL_D_H2, DDIM_COL_D_H3};
constexpr const char* kOp = "ddim_fast_C::step";

DDIM_INLINE uint32_t exponent_bits(float f) { return float_to_bits(f) & kExpMask; }

// ----------------------------------------------------------------------------------------
// The row, folded on the host in float64.
// ----------------------------------------------------------------------------------------

// x0 = (a0 x + b0 m) r0 and eps = (ae x + be m) re for the prediction type (r = 1 / sqrt(...)
// keeps the reference's order, so a small sqrt(a_t) amplifies no earlier rounding).
struct Convert {
  double a0, b0, r0, ae, be, re;
};

Convert make_convert(int64_t prediction, double sa, double s1m) {
  switch (prediction) {
    case DDIM_PRED_EPSILON:  // eps = m, x0 = (x - s1m eps) / sa
      return {1.0, -s1m, 1.0 / sa, 0.0, 1.0, 1.0};
    case DDIM_PRED_V:  // x0 = sa x - s1m v, eps = sa v + s1m x
      return {sa, -s1m, 1.0, s1m, sa, 1.0};
    case DDIM_PRED_X0:  // x0 = m, eps = (x - sa x0) / s1m
      return {0.0, 1.0, 1.0, 1.0, -sa, 1.0 / s1m};
  }
  TORCH_CHECK(false, kOp, ": prediction must be ", DDIM_PRED_EPSILON, " (epsilon), ", DDIM_PRED_V, " (v) or ",
              DDIM_PRED_X0, " (x0), got ", prediction);
  return {};
}

// One linear combination of the row: c_x x + c_x0 x0 + c_eps eps + c_saved saved + sum c_hj H_j,
// with (fx, fm) its x and m coefficients once x0 and eps are substituted (used without clip).
struct Combination {
  float c_x, c_x0, c_eps, c_saved, c_h[DDIM_HISTORY_TERMS];
  float fx, fm;
};

Combination make_combination(const float* row, int cx, int cx0, int ceps, int csaved, const int* ch,
                             const Convert& cv) {
  Combination c;
  c.c_x = row[cx];
  c.c_x0 = row[cx0];
  c.c_eps = row[ceps];
  c.c_saved = row[csaved];
  for (int j = 0; j < DDIM_HISTORY_TERMS; ++j) c.c_h[j] = row[ch[j]];
  const double x0 = row[cx0], eps = row[ceps];
  c.fx = static_cast<float>(row[cx] + x0 * cv.a0 * cv.r0 + eps * cv.ae * cv.re);
  c.fm = static_cast<float>(x0 * cv.b0 * cv.r0 + eps * cv.be * cv.re);
  return c;
}

enum class MDtype : int { kF32, kF16, kBF16, kF64 };

struct StepArgs {
  const float* x;
  const void* m;
  MDtype mt;
  const float* noise;  // explicit z; null: Philox (when sigma != 0)
  float* out;
  float* x0_out;                          // null: not wanted
  float* ring;                            // null: no history
  int64_t R;                              // ring slots
  const float* h[DDIM_HISTORY_TERMS];     // slot (step - j) mod R, null where not read (c_hj = d_hj = 0 or j > R)
  float* h_write;                         // slot step mod R
  bool history_eps;                       // the ring keeps eps (else x0)
  float* saved;                           // null: no saved state
  bool clip;
  float lo, hi;
  float sigma;  // 0: no noise term
  float a0, b0, r0, ae, be, re;  // Convert, as float32
  Combination xn, sv;  // x_next and the saved-state update
  int64_t D;           // elements per sample
  NoiseKey key;
  int noise_impl;  // the generator (philox.h kNoise*)
  std::atomic<int>* bad_model;
  std::atomic<int>* bad_state;
};

// A tile of the model output as float32: in place for fp32, widened into buf otherwise (a
// float64 value beyond the float32 range becomes inf here and sets FLAG_MODEL).
DDIM_INLINE const float* load_m(const StepArgs& a, int64_t e0, int64_t n, float* buf) {
  switch (a.mt) {
    case MDtype::kF32:
      return static_cast<const float*>(a.m) + e0;
    case MDtype::kF16: {
      const c10::Half* s = static_cast<const c10::Half*>(a.m) + e0;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(s[i]);
      return buf;
    }
    case MDtype::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(a.m) + e0;
      for (int64_t i = 0; i < n; ++i) buf[i] = bits_to_float(static_cast<uint32_t>(s[i]) << 16);
      return buf;
    }
    case MDtype::kF64: {
      const double* s = static_cast<const double*>(a.m) + e0;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(s[i]);
      return buf;
    }
  }
  return buf;
}

DDIM_INLINE float clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;  // NaN stays NaN, as torch.clamp
  return v > hi ? hi : v;
}

// ----------------------------------------------------------------------------------------
// The plain row (no ring, no saved state: every DDIM row): one loop, reads x, m (, z).
// Written with 8-lane vectors (GCC vector extensions, compiled per target_clones level): at
// 64x3x32x32 the compiler's own 16-lane AVX-512 loop took 1.2x torch.add on Zen 4, these
// 1.1x (-mprefer-vector-width=512 is kept for the noise, where 16 lanes are 1.4x faster).
// out and x0o may be the memory of x: each vector is loaded before the same one is stored.
// em / es: the max exponent bits of m / x_next over the tile (all ones: a non-finite value).
// Without clipping and with fm != 0 a non-finite m makes x_next non-finite, so the loop only
// checks x_next (kCheckM = false) and m is scanned, in L1, in the rare tile where x_next is
// not finite: the two checks in the loop cost 2-3 us (7%) at 64x3x32x32.
// ----------------------------------------------------------------------------------------
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

DDIM_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

DDIM_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

DDIM_INLINE v8u exponent_bits8(v8f v) { return (v8u)v & kExpMask; }  // a vector cast keeps the bits

DDIM_INLINE v8u max8(v8u a, v8u b) { return a > b ? a : b; }

DDIM_INLINE v8f clamp8(v8f v, float lo, float hi) {
  const v8f lov = v8f{} + lo, hiv = v8f{} + hi;  // (a scalar operand of ?: is not broadcast as float)
  v = v < lov ? lov : v;  // NaN stays NaN, as torch.clamp
  return v > hiv ? hiv : v;
}

struct PlainCoefs {
  float fx, fm, cx, cx0, ceps, sigma, a0, b0, r0, ae, be, re, lo, hi;
};

// 8 elements of the plain row. always_inline, not a lambda: a lambda may stay an out-of-line
// function compiled for the baseline ISA, and an 8-float vector argument then crosses an ABI
// boundary from the AVX clones (the tail came back as zeros).
template <bool kClip, bool kNoise, bool kX0, bool kCheckM>
DDIM_INLINE void plain8(const PlainCoefs& c, v8f xi, v8f mi, const float* zi, float* oi, float* x0i, v8u& mm,
                        v8u& ms) {
  v8f v;
  if constexpr (kClip) {
    const v8f x0 = clamp8((c.a0 * xi + c.b0 * mi) * c.r0, c.lo, c.hi);
    const v8f eps = (c.ae * xi + c.be * mi) * c.re;
    v = c.cx * xi + c.cx0 * x0 + c.ceps * eps;
    if constexpr (kX0) store8(x0i, x0);
  } else {
    v = c.fx * xi + c.fm * mi;
    if constexpr (kX0) store8(x0i, (c.a0 * xi + c.b0 * mi) * c.r0);
  }
  if constexpr (kNoise) v = v + c.sigma * load8(zi);
  if constexpr (kCheckM) mm = max8(mm, exponent_bits8(mi));
  ms = max8(ms, exponent_bits8(v));
  store8(oi, v);
}

template <bool kClip, bool kNoise, bool kX0, bool kCheckM>
DDIM_INLINE void plain_tile(const StepArgs& a, const float* x, const float* m, const float* z, float* out,
                            float* x0o, int64_t n, uint32_t& em, uint32_t& es) {
  const PlainCoefs c{a.xn.fx, a.xn.fm, a.xn.c_x, a.xn.c_x0, a.xn.c_eps, a.sigma, a.a0, a.b0, a.r0, a.ae, a.be, a.re,
                     a.lo, a.hi};
  v8u mm = {}, ms = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    plain8<kClip, kNoise, kX0, kCheckM>(c, load8(x + i), load8(m + i), kNoise ? z + i : z, out + i,
                                        kX0 ? x0o + i : x0o, mm, ms);
  if (i < n) {  // the tail, through a zero-padded copy (a sample's last tile)
    alignas(32) float tx[kLanes] = {}, tm[kLanes] = {}, tz[kLanes] = {}, to[kLanes], t0[kLanes];
    const size_t bytes = static_cast<size_t>(n - i) * sizeof(float);
    std::memcpy(tx, x + i, bytes);
    std::memcpy(tm, m + i, bytes);
    if constexpr (kNoise) std::memcpy(tz, z + i, bytes);
    plain8<kClip, kNoise, kX0, kCheckM>(c, load8(tx), load8(tm), tz, to, t0, mm, ms);
    std::memcpy(out + i, to, bytes);
    if constexpr (kX0) std::memcpy(x0o + i, t0, bytes);
  }
  for (int l = 0; l < kLanes; ++l) {
    em = std::max(em, mm[l]);
    es = std::max(es, ms[l]);
  }
}

DDIM_INLINE uint32_t max_exponent(const float* v, int64_t n) {
  uint32_t e = 0;
  for (int64_t i = 0; i < n; ++i) e = std::max(e, exponent_bits(v[i]));
  return e;
}

template <bool kClip, bool kNoise>
DDIM_INLINE void plain_tile_x0(const StepArgs& a, bool check_m, const float* x, const float* m, const float* z,
                               float* out, float* x0o, int64_t n, uint32_t& em, uint32_t& es) {
  uint32_t tm = 0, ts = 0;
  if (x0o != nullptr) {
    if (kClip || check_m)
      plain_tile<kClip, kNoise, true, true>(a, x, m, z, out, x0o, n, tm, ts);
    else
      plain_tile<kClip, kNoise, true, false>(a, x, m, z, out, x0o, n, tm, ts);
  } else {
    if (kClip || check_m)
      plain_tile<kClip, kNoise, false, true>(a, x, m, z, out, x0o, n, tm, ts);
    else
      plain_tile<kClip, kNoise, false, false>(a, x, m, z, out, x0o, n, tm, ts);
  }
  if (!kClip && !check_m && ts == kExpMask) tm = max_exponent(m, n);
  em = std::max(em, tm);
  es = std::max(es, ts);
}

// ----------------------------------------------------------------------------------------
// A row with a ring and no saved state (the multistep solvers): one loop, with the history
// terms and the noise as a compact list of (pointer, coefficient) for the non-zero ones only
// (an unused ring slot is never read). The ring slot written (step mod R) may be one of those
// read (j = R): each vector is loaded before the same one is stored. 2M at 64x3x32x32: 72 us
// in the per-term loops of general_tile, ~2.5x torch.add (5 streams against 3).
// ----------------------------------------------------------------------------------------
template <bool kClip, int kTerms>
DDIM_INLINE void ring_tile(const StepArgs& a, const float* x, const float* m, const float* const* t, const float* tc,
                           float* out, float* hw, float* x0o, int64_t n, uint32_t& em, uint32_t& es) {
  const PlainCoefs c{a.xn.fx, a.xn.fm, a.xn.c_x, a.xn.c_x0, a.xn.c_eps, a.sigma, a.a0, a.b0, a.r0, a.ae, a.be, a.re,
                     a.lo, a.hi};
  const bool hist_eps = a.history_eps;
  v8u mm = {}, ms = {};
  auto vec = [&](int64_t i, const float* xp, const float* mp, const float* const* tp, float* op, float* hp, float* x0p)
      __attribute__((always_inline)) {
    const v8f xi = load8(xp), mi = load8(mp);
    v8f x0 = (c.a0 * xi + c.b0 * mi) * c.r0;
    const v8f eps = (c.ae * xi + c.be * mi) * c.re;
    v8f v;
    if constexpr (kClip) {
      x0 = clamp8(x0, c.lo, c.hi);
      v = c.cx * xi + c.cx0 * x0 + c.ceps * eps;
    } else {
      v = c.fx * xi + c.fm * mi;
    }
    for (int k = 0; k < kTerms; ++k) v = v + tc[k] * load8(tp[k] + i);
    mm = max8(mm, exponent_bits8(mi));
    ms = max8(ms, exponent_bits8(v));
    store8(hp, hist_eps ? eps : x0);
    if (x0p != nullptr) store8(x0p, x0);
    store8(op, v);
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    vec(i, x + i, m + i, t, out + i, hw + i, x0o != nullptr ? x0o + i : nullptr);
  if (i < n) {  // the tail, through zero-padded copies
    alignas(32) float tx[kLanes] = {}, tm[kLanes] = {}, tt[kTerms > 0 ? kTerms : 1][kLanes] = {}, to[kLanes],
        th[kLanes], t0[kLanes];
    const float* tp[kTerms > 0 ? kTerms : 1];
    const size_t bytes = static_cast<size_t>(n - i) * sizeof(float);
    std::memcpy(tx, x + i, bytes);
    std::memcpy(tm, m + i, bytes);
    for (int k = 0; k < kTerms; ++k) {
      std::memcpy(tt[k], t[k] + i, bytes);
      tp[k] = tt[k];
    }
    vec(0, tx, tm, tp, to, th, x0o != nullptr ? t0 : nullptr);
    std::memcpy(out + i, to, bytes);
    std::memcpy(hw + i, th, bytes);
    if (x0o != nullptr) std::memcpy(x0o + i, t0, bytes);
  }
  for (int l = 0; l < kLanes; ++l) {
    em = std::max(em, mm[l]);
    es = std::max(es, ms[l]);
  }
}

template <bool kClip>
DDIM_INLINE void ring_tile_terms(const StepArgs& a, int64_t e0, int64_t n, const float* x, const float* m,
                                 const float* z, uint32_t& em, uint32_t& es) {
  const float* t[DDIM_HISTORY_TERMS + 1];
  float tc[DDIM_HISTORY_TERMS + 1];
  int k = 0;
  for (int j = 0; j < DDIM_HISTORY_TERMS; ++j)
    if (a.h[j] != nullptr && a.xn.c_h[j] != 0.0f) t[k] = a.h[j] + e0, tc[k++] = a.xn.c_h[j];
  if (a.sigma != 0.0f) t[k] = z, tc[k++] = a.sigma;
  float* out = a.out + e0;
  float* hw = a.h_write + e0;
  float* x0o = a.x0_out != nullptr ? a.x0_out + e0 : nullptr;
  switch (k) {
    case 0: ring_tile<kClip, 0>(a, x, m, t, tc, out, hw, x0o, n, em, es); break;
    case 1: ring_tile<kClip, 1>(a, x, m, t, tc, out, hw, x0o, n, em, es); break;
    case 2: ring_tile<kClip, 2>(a, x, m, t, tc, out, hw, x0o, n, em, es); break;
    case 3: ring_tile<kClip, 3>(a, x, m, t, tc, out, hw, x0o, n, em, es); break;
    default: ring_tile<kClip, 4>(a, x, m, t, tc, out, hw, x0o, n, em, es); break;
  }
}

// ----------------------------------------------------------------------------------------
// The general row (a saved state), per tile in L1: x0 / eps / the x and m part, then one loop per term.
// ----------------------------------------------------------------------------------------

// acc = (the x, x0, eps part of c) over the tile.
DDIM_INLINE void xm_part(const StepArgs& a, const Combination& c, const float* x, const float* m, const float* x0,
                         const float* eps, float* __restrict acc, int64_t n) {
  if (a.clip) {
    const float cx = c.c_x, cx0 = c.c_x0, ceps = c.c_eps;
    for (int64_t i = 0; i < n; ++i) acc[i] = cx * x[i] + cx0 * x0[i] + ceps * eps[i];
  } else {
    const float fx = c.fx, fm = c.fm;
    for (int64_t i = 0; i < n; ++i) acc[i] = fx * x[i] + fm * m[i];
  }
}

DDIM_INLINE void add_term(float* __restrict acc, const float* __restrict t, float c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + c * t[i];
}

DDIM_INLINE void general_tile(const StepArgs& a, int64_t e0, int64_t n, const float* x, const float* m, const float* z,
                              float* bx0, float* beps, float* bacc, uint32_t& em, uint32_t& es) {
  {  // x0 and eps (the ring, x0_out, clipping and the saved update need them)
    const float a0 = a.a0, b0 = a.b0, r0 = a.r0, ae = a.ae, be = a.be, re = a.re, lo = a.lo, hi = a.hi;
    uint32_t mm = em;
    if (a.clip) {
      for (int64_t i = 0; i < n; ++i) {
        const float xi = x[i], mi = m[i];
        bx0[i] = clamp((a0 * xi + b0 * mi) * r0, lo, hi);
        beps[i] = (ae * xi + be * mi) * re;
        mm = std::max(mm, exponent_bits(mi));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        const float xi = x[i], mi = m[i];
        bx0[i] = (a0 * xi + b0 * mi) * r0;
        beps[i] = (ae * xi + be * mi) * re;
        mm = std::max(mm, exponent_bits(mi));
      }
    }
    em = mm;
  }
  // x_next into bacc (out may be x: it is written last)
  xm_part(a, a.xn, x, m, bx0, beps, bacc, n);
  if (a.saved != nullptr && a.xn.c_saved != 0.0f) add_term(bacc, a.saved + e0, a.xn.c_saved, n);
  for (int j = 0; j < DDIM_HISTORY_TERMS; ++j)
    if (a.h[j] != nullptr && a.xn.c_h[j] != 0.0f) add_term(bacc, a.h[j] + e0, a.xn.c_h[j], n);
  if (a.sigma != 0.0f) add_term(bacc, z, a.sigma, n);
  // the saved state, from its old value and the ring before this tile's slot is written
  if (a.saved != nullptr) {
    alignas(64) float bs[kTile];
    xm_part(a, a.sv, x, m, bx0, beps, bs, n);
    float* s = a.saved + e0;
    if (a.sv.c_saved != 0.0f) add_term(bs, s, a.sv.c_saved, n);
    for (int j = 0; j < DDIM_HISTORY_TERMS; ++j)
      if (a.h[j] != nullptr && a.sv.c_h[j] != 0.0f) add_term(bs, a.h[j] + e0, a.sv.c_h[j], n);
    std::memcpy(s, bs, static_cast<size_t>(n) * sizeof(float));
  }
  if (a.h_write != nullptr) std::memcpy(a.h_write + e0, a.history_eps ? beps : bx0, static_cast<size_t>(n) * sizeof(float));
  if (a.x0_out != nullptr) std::memcpy(a.x0_out + e0, bx0, static_cast<size_t>(n) * sizeof(float));
  float* out = a.out + e0;
  uint32_t ms = es;
  for (int64_t i = 0; i < n; ++i) {
    ms = std::max(ms, exponent_bits(bacc[i]));
    out[i] = bacc[i];
  }
  es = ms;
}

// Elements [begin, end): the hot path, compiled once per ISA level (target_clones).
DDIM_TARGET_CLONES void step_range(const StepArgs& a, int64_t begin, int64_t end) {
  alignas(64) float bm[kTile], bz[kTile], bx0[kTile], beps[kTile], bacc[kTile];
  const bool noise = a.sigma != 0.0f;
  const bool check_m = !(a.xn.fm != 0.0f && std::isfinite(a.xn.fm));  // see plain_tile
  uint32_t em = 0, es = 0;
  for (int64_t e0 = begin; e0 < end; e0 += kTile) {
    const int64_t n = std::min(kTile, end - e0);
    const float* x = a.x + e0;
    const float* m = load_m(a, e0, n, bm);
    const float* z = nullptr;
    if (noise) {
      if (a.noise != nullptr) {
        z = a.noise + e0;
      } else {
        fill_noise(bz, e0, n, a.D, a.key, a.noise_impl);
        z = bz;
      }
    }
    if (a.saved != nullptr) {
      general_tile(a, e0, n, x, m, z, bx0, beps, bacc, em, es);
      continue;
    }
    if (a.ring != nullptr) {
      if (a.clip)
        ring_tile_terms<true>(a, e0, n, x, m, z, em, es);
      else
        ring_tile_terms<false>(a, e0, n, x, m, z, em, es);
      continue;
    }
    float* out = a.out + e0;
    float* x0o = a.x0_out != nullptr ? a.x0_out + e0 : nullptr;
    if (a.clip) {
      if (noise)
        plain_tile_x0<true, true>(a, true, x, m, z, out, x0o, n, em, es);
      else
        plain_tile_x0<true, false>(a, true, x, m, z, out, x0o, n, em, es);
    } else {
      if (noise)
        plain_tile_x0<false, true>(a, check_m, x, m, z, out, x0o, n, em, es);
      else
        plain_tile_x0<false, false>(a, check_m, x, m, z, out, x0o, n, em, es);
    }
  }
  // Only ever set to 1 (the Python side reads the flags once per trajectory).
  if (em == kExpMask) a.bad_model->store(1, std::memory_order_relaxed);
  if (es == kExpMask) a.bad_state->store(1, std::memory_order_relaxed);
}

DDIM_TARGET_CLONES void noise_range(float* z, int64_t begin, int64_t end, int64_t D, const NoiseKey& key, int impl) {
  for (int64_t e0 = begin; e0 < end; e0 += kTile) fill_noise(z + e0, e0, std::min(kTile, end - e0), D, key, impl);
}

// ----------------------------------------------------------------------------------------
// Host side: memory-protecting checks (ddim_fast.ops.check_step_args is the validation),
// the row fold, the parallel split.
// ----------------------------------------------------------------------------------------

// Runs fn(tile_begin, tile_end) over [0, tiles) on at::get_num_threads() threads (at most one
// per `grain` tiles). Each thread owns a contiguous share and takes it `chunk` tiles at a time
// from an atomic counter; a thread done with its share goes on with the others'. Owning a
// share keeps each thread on the same data call after call (its L2); taking over the rest
// matters on 2 shared cores, where a thread that loses its core to another process would
// otherwise hold the whole step up for a scheduler tick (~8 ms measured).
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

void check_f32_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.sizes() == x.sizes() && t.is_contiguous(),
              kOp, ": ", name, " must be a contiguous float32 CPU tensor of shape ", x.sizes(), ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

NoiseKey make_key(const at::Tensor& seed, int64_t step, int64_t stream, int64_t batch, const char* op) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 2, op,
              ": seed must be an int64 CPU tensor (seed, sample_offset) of 2 elements, got ", seed.scalar_type(), " ",
              seed.sizes(), " on ", seed.device());
  const at::Tensor s = seed.contiguous();
  const int64_t value = s.const_data_ptr<int64_t>()[0], offset = s.const_data_ptr<int64_t>()[1];
  TORCH_CHECK(value >= 0, op, ": seed[0] must be in [0, 2**63), got ", value);
  TORCH_CHECK(offset >= 0 && offset + std::max<int64_t>(batch, 1) <= (int64_t{1} << 48), op,
              ": seed[1] (the sample offset) + batch must be in [0, 2**48], got ", offset, " + ", batch);
  TORCH_CHECK(step >= 0 && step <= 0xffffffffLL, op, ": step must be in [0, 2**32), got ", step);
  TORCH_CHECK(stream >= 0 && stream < (int64_t{1} << DDIM_STREAM_BITS), op, ": stream must be in [0, 2**",
              DDIM_STREAM_BITS, "), got ", stream);
  NoiseKey key;
  key.k0 = static_cast<uint32_t>(static_cast<uint64_t>(value) & 0xffffffffu);
  key.k1 = static_cast<uint32_t>(static_cast<uint64_t>(value) >> 32);
  key.step = static_cast<uint32_t>(step);
  key.stream = static_cast<uint32_t>(stream);
  key.sample_offset = offset;
  return key;
}

void step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table, int64_t step,
              const at::Tensor& seed, int64_t prediction, double clip, int64_t history_kind,
              const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& saved,
              const std::optional<at::Tensor>& noise, const at::Tensor& out, const std::optional<at::Tensor>& x0_out,
              const std::optional<at::Tensor>& flags) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.is_contiguous(), kOp,
              ": x must be a contiguous float32 CPU tensor with a batch dimension, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  const auto mt = model_out.scalar_type();
  TORCH_CHECK(model_out.device().is_cpu() && model_out.sizes() == x.sizes() && model_out.is_contiguous() &&
                  (mt == at::kFloat || mt == at::kHalf || mt == at::kBFloat16 || mt == at::kDouble),
              kOp, ": model_out must be a contiguous float32/float16/bfloat16/float64 CPU tensor of shape ", x.sizes(),
              ", got ", mt, " ", model_out.sizes(), " on ", model_out.device());
  check_f32_like(out, x, "out");
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat && table.dim() == 2 &&
                  table.size(1) == DDIM_NUM_COLUMNS && table.is_contiguous(),
              kOp, ": table must be a contiguous float32 CPU tensor of shape (S, ", DDIM_NUM_COLUMNS, "), got ",
              table.scalar_type(), " ", table.sizes(), " on ", table.device());
  const int64_t S = table.size(0);
  TORCH_CHECK(step >= 0 && step < S, kOp, ": step must be a row of the table in [0, ", S, "), got ", step);
  if (x0_out) check_f32_like(*x0_out, x, "x0_out");
  if (saved) check_f32_like(*saved, x, "saved");
  if (flags)
    TORCH_CHECK(flags->device().is_cpu() && flags->scalar_type() == at::kInt && flags->dim() == 2 &&
                    flags->size(0) == S && flags->size(1) == 2 && flags->is_contiguous(),
                kOp, ": flags must be a contiguous int32 CPU tensor of shape (", S, ", 2), got ",
                flags->scalar_type(), " ", flags->sizes(), " on ", flags->device());

  const float* row = table.const_data_ptr<float>() + step * DDIM_NUM_COLUMNS;
  const double sa = row[DDIM_COL_SQRT_ALPHA], s1m = row[DDIM_COL_SQRT_ONE_MINUS_ALPHA];
  StepArgs a{};
  const Convert cv = make_convert(prediction, sa, s1m);
  a.a0 = static_cast<float>(cv.a0);
  a.b0 = static_cast<float>(cv.b0);
  a.r0 = static_cast<float>(cv.r0);
  a.ae = static_cast<float>(cv.ae);
  a.be = static_cast<float>(cv.be);
  a.re = static_cast<float>(cv.re);
  a.xn = make_combination(row, DDIM_COL_C_X, DDIM_COL_C_X0, DDIM_COL_C_EPS, DDIM_COL_C_SAVED, kColCH, cv);
  a.sv = make_combination(row, DDIM_COL_D_X, DDIM_COL_D_X0, DDIM_COL_D_EPS, DDIM_COL_D_SAVED, kColDH, cv);
  a.clip = clip > 0.0;
  a.lo = -static_cast<float>(clip);
  a.hi = static_cast<float>(clip);
  a.sigma = row[DDIM_COL_SIGMA];

  const int64_t numel = x.numel();
  a.x = x.const_data_ptr<float>();
  a.m = model_out.const_data_ptr();
  a.mt = mt == at::kFloat ? MDtype::kF32 : mt == at::kHalf ? MDtype::kF16 : mt == at::kBFloat16 ? MDtype::kBF16 : MDtype::kF64;
  a.out = out.mutable_data_ptr<float>();
  a.x0_out = x0_out ? x0_out->mutable_data_ptr<float>() : nullptr;
  a.saved = saved ? saved->mutable_data_ptr<float>() : nullptr;
  a.D = numel > 0 ? numel / x.size(0) : 1;
  if (history) {
    const at::Tensor& h = *history;
    TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.dim() == x.dim() + 1 && h.size(0) >= 1 &&
                    h.sizes().slice(1) == x.sizes() && h.is_contiguous(),
                kOp, ": history must be a contiguous float32 CPU ring of shape (R, ", x.sizes(), "), got ",
                h.scalar_type(), " ", h.sizes(), " on ", h.device());
    TORCH_CHECK(history_kind == DDIM_HISTORY_X0 || history_kind == DDIM_HISTORY_EPS, kOp, ": history_kind must be ",
                DDIM_HISTORY_X0, " (x0) or ", DDIM_HISTORY_EPS, " (eps), got ", history_kind);
    a.R = h.size(0);
    a.ring = h.mutable_data_ptr<float>();
    a.history_eps = history_kind == DDIM_HISTORY_EPS;
    a.h_write = a.ring + (step % a.R) * numel;
    for (int64_t j = 1; j <= std::min<int64_t>(DDIM_HISTORY_TERMS, a.R); ++j)
      if (a.xn.c_h[j - 1] != 0.0f || (a.saved != nullptr && a.sv.c_h[j - 1] != 0.0f))
        a.h[j - 1] = a.ring + ((step - j) % a.R + a.R) % a.R * numel;
  }
  if (a.sigma != 0.0f) {
    if (noise) {
      check_f32_like(*noise, x, "noise");
      a.noise = noise->const_data_ptr<float>();
    } else {
      a.key = make_key(seed, step, DDIM_STREAM_STEP, x.size(0), kOp);
      a.noise_impl = g_noise_impl.load(std::memory_order_relaxed);
    }
  }
  if (numel == 0) return;

  std::atomic<int> bad_model{0}, bad_state{0};
  a.bad_model = &bad_model;
  a.bad_state = &bad_state;
  const int64_t tiles = (numel + kTile - 1) / kTile;
  const bool philox = a.sigma != 0.0f && a.noise == nullptr;
  parallel_tiles(tiles, philox ? kGrainNoise : kGrainPlain, philox ? kChunkNoise : kChunkPlain,
                 [&](int64_t t0, int64_t t1) { step_range(a, t0 * kTile, std::min(t1 * kTile, numel)); });
  if (flags) {
    int32_t* f = flags->mutable_data_ptr<int32_t>() + step * 2;
    if (bad_model.load()) f[DDIM_FLAG_MODEL] = 1;
    if (bad_state.load()) f[DDIM_FLAG_STATE] = 1;
  }
}

void step_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, int64_t, double,
               int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
               const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
               const std::optional<at::Tensor>&) {}

// The noise alone for `shape` = (B, ...): reference.gaussian(seed[0], shape, step=step,
// stream=stream, sample_offset=seed[1]) (tests; x_T draws use DDIM_STREAM_X_T).
at::Tensor gaussian_cpu(const at::Tensor& seed, at::IntArrayRef shape, int64_t step, int64_t stream) {
  constexpr const char* op = "ddim_fast_C::gaussian";
  TORCH_CHECK(!shape.empty(), op, ": shape must have a batch dimension");
  const NoiseKey key = make_key(seed, step, stream, shape[0], op);
  at::Tensor z = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
  const int64_t numel = z.numel();
  if (numel == 0) return z;
  const int64_t D = numel / shape[0];
  float* zp = z.mutable_data_ptr<float>();
  const int impl = g_noise_impl.load(std::memory_order_relaxed);
  const int64_t tiles = (numel + kTile - 1) / kTile;
  parallel_tiles(tiles, kGrainNoise, kChunkNoise, [&](int64_t t0, int64_t t1) {
    noise_range(zp, t0 * kTile, std::min(t1 * kTile, numel), D, key, impl);
  });
  return z;
}

at::Tensor gaussian_meta(const at::Tensor&, at::IntArrayRef shape, int64_t, int64_t) {
  return at::empty(shape, at::TensorOptions().dtype(at::kFloat).device(at::kMeta));
}

int64_t contract_version() { return DDIM_CONTRACT_VERSION; }

// The noise generator in use: 0 = portable, 1 = AVX-512, 2 = AVX2. choice 0 / 1 / 2 selects one
// where the CPU has it (else the portable one), -2 the fastest the CPU has, -1 only reads. For
// benchmarks and tests: all give the same bits.
int64_t noise_impl(int64_t choice) {
  TORCH_CHECK(choice >= -2 && choice <= 2,
              "ddim_fast_C::noise_impl: choice must be -2 (the fastest), -1 (read), 0 (portable), 1 (AVX-512) or 2 "
              "(AVX2), got ", choice);
  if (choice == -2) g_noise_impl.store(kBestNoiseImpl);
  if (choice >= 0) g_noise_impl.store(noise_impl_available(static_cast<int>(choice)) ? static_cast<int>(choice) : kNoisePortable);
  return g_noise_impl.load();
}

}  // namespace

TORCH_LIBRARY(ddim_fast_C, m) {
  m.def(
      "step(Tensor x, Tensor model_out, Tensor table, int step, Tensor seed, int prediction, float clip, "
      "int history_kind, Tensor(a!)? history, Tensor(b!)? saved, Tensor? noise, Tensor(c!) out, "
      "Tensor(d!)? x0_out, Tensor(e!)? flags) -> ()");
  m.def("gaussian(Tensor seed, int[] shape, int step=0, int stream=1) -> Tensor");
  m.def("contract_version() -> int", &contract_version);  // no tensors: one catch-all kernel each
  m.def("noise_impl(int choice=-1) -> int", &noise_impl);
}

TORCH_LIBRARY_IMPL(ddim_fast_C, CPU, m) {
  m.impl("step", &step_cpu);
  m.impl("gaussian", &gaussian_cpu);
}

TORCH_LIBRARY_IMPL(ddim_fast_C, Meta, m) {
  m.impl("step", &step_meta);
  m.impl("gaussian", &gaussian_meta);
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
