// Two XLA FFI custom calls for fitting logistic probes on XLA's CPU backend (built and loaded by
// vlm_jax/probe/cpu_kernel.py, with vlm_jax/native/build.py):
//
// VlmJaxColumnMoments: the mean and standard deviation of every feature of one layer, in one pass.
// Inputs:  X [L, N, D] (float32), layer [] (int32).  Outputs: mean [D], std [D] (population std).
//
// VlmJaxLogisticFit: a whole softmax-regression probe fit on one layer, probe/lbfgs.py's L-BFGS run
// step for step on VlmJaxLogisticEval's evaluations (see LogisticFitImpl).
// Inputs:  X [L, N, D], layer [], labels [N], share [N] as below; mean, scale [D] the layer's
//          standardisation; lam [] the L2 strength; W0 [D, C], b0 [C] the starting point; tol [] the
//          gradient tolerance. Attributes max_iter, memory (curvature pairs), max_backtracks.
// Outputs: W [D, C], b [C] minimising sum_n share_n CE(W^T (x_n - mean) / scale + b) + lam/2 ||W||^2,
//          and counts [2] int32: iterations, loss evaluations.
//
// VlmJaxLogisticEval: one evaluation of a softmax-regression probe's data term and its gradient,
// in one pass over one layer's features.
// Inputs:  X [L, N, D] features (float32, row-major, as the caller holds them), layer [] (int32),
//          W [D, C] weights, bias [C], labels [N] (int32 class ids), share [N] (example weights
//          summing to 1).
// Outputs: loss []   = -sum_n share_n log softmax(z_n)[labels_n],  z_n = W^T x_n + bias,
//          gx [D, C] = sum_n x_n g_n^T,  gb [C] = sum_n g_n,  g_n = share_n (softmax(z_n) - e_labels_n),
//          where x_n is row n of X[layer].
//
// Why a kernel: with XLA's own products an evaluation reads the features twice (logits, then
// gradient) from a transposed copy made per layer, and the logits product runs at about half of
// the machine's matmul rate. Here the examples are taken kTile at a time: their logits, softmax
// and gradient contribution are computed while their rows of X sit in L2, so X is read once per
// evaluation and never copied. The logits multiply 4 consecutive features of an example, loaded
// once into both halves of a vector, with a vector of two classes' weights (see quad()); 12
// independent multiply-add chains per register tile keep both FMA units busy. With AVX-512 the
// same layout is read as 16-lane vectors of four classes (see quad_x4()): 1.6x faster per
// evaluation on an AVX-512 EPYC (3000 x 1024 features, 8 classes: 0.56 -> 0.34 ms). The gradient
// uses the quad layout with 8-lane vectors; with AVX-512 it is taken class-major instead, a whole
// line of an example's row at a time (gradient_classes). Blocks of kBlock examples are shared
// among the threads of XLA's intra-op pool; each thread sums into its own partial gradient, and
// the caller adds the partials up. benchmarks/RESULTS.md has the measurements that chose each of
// these.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "thread_blocks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using vlm_jax_native::run_blocks;
using vlm_jax_native::slots_for;

namespace {

using vlm_jax_native::ivec;
using vlm_jax_native::kLanes;
using vlm_jax_native::splat;
using vlm_jax_native::vec;
using vlm_jax_native::vexp;

constexpr int64_t kBlock = 96;  // examples per unit of work shared among threads
// examples whose logits, softmax and gradient are computed together: their rows of X (96 KB at
// D = 1024) stay in L2 between the logits and the gradient; a multiple of kLogitExamples and
// kWideLogitExamples
constexpr int kTile = 24;
// examples per pass of the 8-lane gradient's register tiles (a divisor of kTile). A pass reads a
// feature quad of each of its examples in turn; rows of X a multiple of 4 KB long (D = 1024) map to
// the same L1 sets, and 24 of them, more than the cache's ways, missed L1 on every read (measured
// with this form on AVX-512: 144 GFLOP/s per core in one pass of 24, 174 in two of 12).
constexpr int kGradientExamples = 12;
static_assert(kTile % kGradientExamples == 0);
constexpr int kGradientQuads = 3;  // feature quads per register tile of the 8-lane gradient
constexpr int kLogitExamples = 3;  // examples per register tile of the logits
// with AVX-512's 16-lane vectors and 32 registers: 8 examples, 16 accumulator chains (whole
// 33-layer fits, alternating builds: 6 examples 233.9-234.8 ms, 8 examples 228.7-230.2, 12: 294)
constexpr int kWideLogitExamples = 8;
static_assert(kTile % kLogitExamples == 0 && kTile % kWideLogitExamples == 0);


typedef float vec4 __attribute__((vector_size(4 * sizeof(float))));

// The logits and the 8-lane gradient use one layout trick. A 128-bit load of 4 consecutive
// features of an example, duplicated into both halves of a vector ("quad"), is multiplied with a
// vector that holds two classes' values for those 4 features: lanes (h, i) = class 2p + h, feature
// 4q + i. One load then feeds one multiply-add per class pair (4 for 8 classes), where
// broadcasting single features needs a load for every multiply-add; with 8 classes per vector,
// loads and not arithmetic would bound both products.
inline vec quad(const float* x) {
#if defined(__AVX__)
  return (vec)_mm256_broadcast_ps(reinterpret_cast<const __m128*>(x));  // one load, no shuffle
#else
  vec4 q;
  std::memcpy(&q, x, sizeof(q));
  return __builtin_shufflevector(q, q, 0, 1, 2, 3, 0, 1, 2, 3);
#endif
}

// Keeps values in registers: without this, the compiler folds their loads into every multiply-add
// that uses them, and the loads, not the arithmetic, then bound the loops.
#if defined(__x86_64__)
inline void in_register(vec& a) { asm("" : "+x"(a)); }
#else
inline void in_register(vec&) {}
#endif

#if defined(__AVX512F__)
// With AVX-512 the logits run on 16-lane vectors. Two consecutive pair vectors of the layouts
// below (pairs 2r and 2r + 1) are, read as one 16-lane vector, a class quad: lanes (h, i) = class
// 4r + h, feature 4q + i. A feature quad broadcast into all four quarters of a vector then feeds
// one multiply-add per class quad, and the halves of a quad's accumulator are the accumulators
// of its two pairs. Same loads per multiply-add, half the multiply-adds.
using wide = vlm_jax_native::vec_of<16>;
inline wide quad_x4(const float* x) { return (wide)_mm512_broadcast_f32x4(_mm_loadu_ps(x)); }
inline wide load_quad(const vec* pairs) { return vlm_jax_native::load<16>(reinterpret_cast<const float*>(pairs)); }
inline vec low_half(wide v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
inline vec high_half(wide v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
inline void in_register(wide& a) { asm("" : "+v"(a)); }
#endif

struct Problem {
  const float* x;         // [N, D] one layer's features, row-major
  const vec* wq;          // [Q, K, 4]: weights of feature quad q, class pair p of class group kk
  const vec* wt;          // [D - 4Q, K]: weights of the rows after the last whole quad, classes as lanes
  const vec* bias;        // [K] padded bias (padding lanes -inf), classes as lanes
  const int32_t* labels;  // [N]
  const float* share;     // [N]
  int64_t d, n, c, k, q;  // features, examples, classes, class groups (ceil(c / 8)), whole feature quads
};

struct Partial {  // one thread's sums, and its scratch space
  std::vector<vec> gq;  // [Q, K, 4] gradient in the layout of wq (8-lane builds)
  std::vector<vec> gt;  // [D - 4Q, K]
  std::vector<float> gc;  // [8K, D] gradient, class-major (AVX-512 builds)
  std::vector<vec> gb;  // [K]
  double loss = 0.0;
  std::vector<vec> z;   // [kTile, K] a tile's logits, then d loss / d logits
  std::vector<vec> gp;  // [kTile, K, 4] the same in the pair layout (8-lane builds)
};

// the 8 classes of group kk from 4 pair accumulators: class 2p + h is the sum of half h of acc[p]
inline vec classes_from_pairs(const vec* acc) {
  vec a = __builtin_shufflevector(acc[0], acc[1], 0, 2, 8, 10, 4, 6, 12, 14) +
          __builtin_shufflevector(acc[0], acc[1], 1, 3, 9, 11, 5, 7, 13, 15);
  vec b = __builtin_shufflevector(acc[2], acc[3], 0, 2, 8, 10, 4, 6, 12, 14) +
          __builtin_shufflevector(acc[2], acc[3], 1, 3, 9, 11, 5, 7, 13, 15);
  // a holds two partial sums per class, [0, 0, 2, 2 | 1, 1, 3, 3]; b the same for classes 4-7
  vec c = __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
          __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
  // c = [class 0, 2, 4, 6 | 1, 3, 5, 7]
  return __builtin_shufflevector(c, c, 0, 4, 1, 5, 2, 6, 3, 7);
}

// one class pair's weights wp (held in a register) times up to 3 examples' feature quads
template <int count>
inline void pair_step(vec wp, vec u, vec v, vec s, vec& a, vec& b, vec& c) {
  in_register(wp);
  a += u * wp;
  if (count >= 2) b += v * wp;
  if (count >= 3) c += s * wp;
}

// z[t, kk] = bias[kk] + x[j + t] . w[:, group kk] for `count` (1 to 3) examples at a time: 4
// accumulators per example, up to 12 independent multiply-add chains. The accumulators are
// named variables, not an array, so that the compiler keeps them in registers.
template <int count>
inline void logits_examples(const Problem& p, int64_t j, vec* __restrict__ z) {
  static_assert(count >= 1 && count <= 3);
  const float* __restrict__ x0 = p.x + j * p.d;
  const float* __restrict__ x1 = x0 + (count >= 2 ? p.d : 0);
  const float* __restrict__ x2 = x0 + (count >= 3 ? 2 * p.d : 0);
  for (int64_t kk = 0; kk < p.k; ++kk) {
    vec a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{}, c0{}, c1{}, c2{}, c3{};
    const vec* __restrict__ w = p.wq + kk * 4;
    const int64_t stride = p.k * 4;
    for (int64_t q = 0; q < p.q; ++q, w += stride) {
      const vec u = quad(x0 + 4 * q);
      const vec v = count >= 2 ? quad(x1 + 4 * q) : vec{};
      const vec s = count >= 3 ? quad(x2 + 4 * q) : vec{};
      pair_step<count>(w[0], u, v, s, a0, b0, c0);
      pair_step<count>(w[1], u, v, s, a1, b1, c1);
      pair_step<count>(w[2], u, v, s, a2, b2, c2);
      pair_step<count>(w[3], u, v, s, a3, b3, c3);
    }
    const vec pairs[3][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}, {c0, c1, c2, c3}};
    for (int t = 0; t < count; ++t) {
      vec zt = p.bias[kk] + classes_from_pairs(pairs[t]);
      for (int64_t row = 4 * p.q; row < p.d; ++row) zt += x0[t * p.d + row] * p.wt[(row - 4 * p.q) * p.k + kk];
      z[t * p.k + kk] = zt;
    }
  }
}

#if defined(__AVX512F__)
// logits_examples on 16-lane vectors: `count` examples x 2 class quads of accumulators (16
// chains for 8 examples), the weights of a feature quad loaded once for all of them
template <int count>
inline void logits_examples_wide(const Problem& p, int64_t j, vec* __restrict__ z) {
  const float* __restrict__ x = p.x + j * p.d;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    wide acc[count][2] = {};
    const vec* __restrict__ w = p.wq + kk * 4;
    const int64_t stride = p.k * 4;
    for (int64_t q = 0; q < p.q; ++q, w += stride) {
      wide w0 = load_quad(w), w1 = load_quad(w + 2);
      in_register(w0);
      in_register(w1);
#pragma GCC unroll 8
      for (int t = 0; t < count; ++t) {
        const wide u = quad_x4(x + t * p.d + 4 * q);
        acc[t][0] += u * w0;
        acc[t][1] += u * w1;
      }
    }
    for (int t = 0; t < count; ++t) {
      const vec pairs[4] = {low_half(acc[t][0]), high_half(acc[t][0]), low_half(acc[t][1]), high_half(acc[t][1])};
      vec zt = p.bias[kk] + classes_from_pairs(pairs);
      for (int64_t row = 4 * p.q; row < p.d; ++row) zt += x[t * p.d + row] * p.wt[(row - 4 * p.q) * p.k + kk];
      z[t * p.k + kk] = zt;
    }
  }
}
#endif

inline void logits_tile(const Problem& p, int64_t j, int count, vec* z) {
  int t = 0;
#if defined(__AVX512F__)
  for (; t + kWideLogitExamples <= count; t += kWideLogitExamples)
    logits_examples_wide<kWideLogitExamples>(p, j + t, z + t * p.k);
  for (; t < count; ++t) logits_examples_wide<1>(p, j + t, z + t * p.k);
#else
  for (; t + kLogitExamples <= count; t += kLogitExamples) logits_examples<kLogitExamples>(p, j + t, z + t * p.k);
  for (; t < count; ++t) logits_examples<1>(p, j + t, z + t * p.k);
#endif
}

#if defined(__AVX512F__)
// With AVX-512 the gradient is taken class-major: gc[cls, f] += sum_t g[t, cls] x[j + t, f] for
// the 8 classes of a group and kWideGradientVectors 16-lane vectors of features, one example's
// d loss / d logits broadcast lane by lane. Each line of an example's row is read once, in full, so
// rows that share L1 sets (D = 1024: every row) cost no reuse; loads are 11 per 24 multiply-adds.
// One AVX-512 EPYC core, a tile's rows in L2: 215 GFLOP/s against 187 for the quad layout's
// register tiles on 16-lane vectors (in two passes of 12 examples); a whole 33-layer probe fit
// (probes.py's) 274.7 -> 243.3 ms.
constexpr int kWideGradientVectors = 3;

template <int vectors, int count>
__attribute__((noinline)) void gradient_classes(const float* __restrict__ x, int64_t d, const float* __restrict__ g,
                                                int64_t g_stride, float* __restrict__ gc) {
  wide acc[kLanes][vectors];
#pragma GCC unroll 8
  for (int cls = 0; cls < kLanes; ++cls)
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) acc[cls][v] = vlm_jax_native::load<16>(gc + cls * d + 16 * v);
#pragma GCC unroll 4
  for (int t = 0; t < count; ++t, x += d, g += g_stride) {
    wide xv[vectors];
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) xv[v] = vlm_jax_native::load<16>(x + 16 * v);
#pragma GCC unroll 8
    for (int cls = 0; cls < kLanes; ++cls) {
      const wide gt = splat<16>(g[cls]);
#pragma GCC unroll 4
      for (int v = 0; v < vectors; ++v) acc[cls][v] += gt * xv[v];
    }
  }
#pragma GCC unroll 8
  for (int cls = 0; cls < kLanes; ++cls)
#pragma GCC unroll 4
    for (int v = 0; v < vectors; ++v) vlm_jax_native::store(gc + cls * d + 16 * v, acc[cls][v]);
}

// gc[8 kk + cls, :] += sum_t g[t, kk][cls] x[j + t, :] for every class group kk; `count` examples
template <int count>
inline void gradient_rows(const Problem& p, int64_t j, int64_t kk, const vec* g, float* gc) {
  const float* x = p.x + j * p.d;
  const float* gk = reinterpret_cast<const float*>(g + kk);
  const int64_t g_stride = p.k * kLanes;
  float* out = gc + kk * kLanes * p.d;
  int64_t f = 0;
  for (; f + 16 * kWideGradientVectors <= p.d; f += 16 * kWideGradientVectors)
    gradient_classes<kWideGradientVectors, count>(x + f, p.d, gk, g_stride, out + f);
  for (; f + 16 <= p.d; f += 16) gradient_classes<1, count>(x + f, p.d, gk, g_stride, out + f);
  for (; f < p.d; ++f)  // features after the last whole vector
    for (int t = 0; t < count; ++t)
      for (int cls = 0; cls < kLanes; ++cls) out[cls * p.d + f] += gk[t * g_stride + cls] * x[t * p.d + f];
}

inline void gradient_tile(const Problem& p, int64_t j, int count, const vec* g, vec*, Partial& out) {
  for (int64_t kk = 0; kk < p.k; ++kk) {
    if (count == kTile) {
      gradient_rows<kTile>(p, j, kk, g, out.gc.data());
    } else {
      for (int t = 0; t < count; ++t) gradient_rows<1>(p, j + t, kk, g + t * p.k, out.gc.data());
    }
  }
}
#else
// gq[q, kk, :] += sum_t quad(x[j + t, 4q:4q+4]) * gp[t, kk, :] for `quads` feature quads at a
// time, over `count` examples; gp holds each example's d loss / d logits in the pair layout
template <int quads, int count>
__attribute__((noinline)) void gradient_quads(const float* __restrict__ x, int64_t x_stride,
                                              const vec* __restrict__ g, int64_t g_stride, vec* __restrict__ out,
                                              int64_t out_stride) {
  vec acc[quads][4];
#pragma GCC unroll 8
  for (int qi = 0; qi < quads; ++qi)
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) acc[qi][b] = out[qi * out_stride + b];
#pragma GCC unroll 8
  for (int t = 0; t < count; ++t, x += x_stride, g += g_stride) {
    vec xq[quads];
#pragma GCC unroll 8
    for (int qi = 0; qi < quads; ++qi) xq[qi] = quad(x + 4 * qi);
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) {
      vec gv = g[b];
      in_register(gv);
#pragma GCC unroll 8
      for (int qi = 0; qi < quads; ++qi) acc[qi][b] += xq[qi] * gv;
    }
  }
#pragma GCC unroll 8
  for (int qi = 0; qi < quads; ++qi)
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) out[qi * out_stride + b] = acc[qi][b];
}

// gq[q, kk, :] += sum_t quad(x[j + t, 4q:4q+4]) * gp[t, kk, :] for every whole feature quad q
template <int count>
inline void gradient_features(const Problem& p, int64_t j, int64_t kk, const vec* gp, vec* gq) {
  const int64_t stride = p.k * 4;
  int64_t q = 0;
  for (; q + kGradientQuads <= p.q; q += kGradientQuads)
    gradient_quads<kGradientQuads, count>(p.x + j * p.d + 4 * q, p.d, gp + kk * 4, stride, gq + (q * p.k + kk) * 4,
                                          stride);
  for (; q < p.q; ++q)
    gradient_quads<1, count>(p.x + j * p.d + 4 * q, p.d, gp + kk * 4, stride, gq + (q * p.k + kk) * 4, stride);
}

inline void gradient_tile(const Problem& p, int64_t j, int count, const vec* g, vec* gp, Partial& out) {
  for (int t = 0; t < count; ++t)  // to the pair layout: class 2 pair + h repeated over half h
    for (int64_t kk = 0; kk < p.k; ++kk) {
      const vec v = g[t * p.k + kk];
      vec* dst = gp + (t * p.k + kk) * 4;
      dst[0] = __builtin_shufflevector(v, v, 0, 0, 0, 0, 1, 1, 1, 1);
      dst[1] = __builtin_shufflevector(v, v, 2, 2, 2, 2, 3, 3, 3, 3);
      dst[2] = __builtin_shufflevector(v, v, 4, 4, 4, 4, 5, 5, 5, 5);
      dst[3] = __builtin_shufflevector(v, v, 6, 6, 6, 6, 7, 7, 7, 7);
    }
  for (int64_t kk = 0; kk < p.k; ++kk) {
    if (count == kTile) {
      for (int part = 0; part < kTile; part += kGradientExamples)
        gradient_features<kGradientExamples>(p, j + part, kk, gp + part * p.k * 4, out.gq.data());
    } else {
      for (int t = 0; t < count; ++t) gradient_features<1>(p, j + t, kk, gp + t * p.k * 4, out.gq.data());
    }
    for (int64_t row = 4 * p.q; row < p.d; ++row) {
      vec acc = out.gt[(row - 4 * p.q) * p.k + kk];
      for (int t = 0; t < count; ++t) acc += p.x[(j + t) * p.d + row] * g[t * p.k + kk];
      out.gt[(row - 4 * p.q) * p.k + kk] = acc;
    }
  }
}

#endif


inline float horizontal_sum(vec v) {
  // pairwise, so that the compiler can use vector shuffles
  vec half = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  vec quarter = half + __builtin_shufflevector(half, half, 2, 3, 0, 1, 6, 7, 4, 5);
  return quarter[0] + quarter[1];
}

// softmax of `count` examples' logits and d loss / d logits, in place (z becomes g); returns
// the examples' share of the loss and adds their g to gb
inline double softmax_tile(const Problem& p, int64_t j, int count, vec* z, vec* gb) {
  double loss = 0.0;
  for (int t = 0; t < count; ++t) {
    vec* zt = z + t * p.k;
    vec top_v = zt[0];
    for (int64_t kk = 1; kk < p.k; ++kk) top_v = zt[kk] > top_v ? zt[kk] : top_v;
    const float top = vlm_jax_native::max_lanes(top_v);
    const int32_t label = p.labels[j + t];
    const float z_label = zt[label / kLanes][label % kLanes] - top;
    vec total_v = vec{};
    for (int64_t kk = 0; kk < p.k; ++kk) {
      zt[kk] = vexp(zt[kk] - top);
      total_v += zt[kk];
    }
    const float total = horizontal_sum(total_v);
    const float share = p.share[j + t];
    loss -= share * (z_label - std::log(total));
    const float factor = share / total;
    for (int64_t kk = 0; kk < p.k; ++kk) zt[kk] *= factor;
    zt[label / kLanes][label % kLanes] -= share;
    for (int64_t kk = 0; kk < p.k; ++kk) gb[kk] += zt[kk];
  }
  return loss;
}

void run_block(const Problem& p, int64_t block, Partial& out) {
  vec* z = out.z.data();
  vec* gp = out.gp.data();
  const int64_t end = std::min<int64_t>((block + 1) * kBlock, p.n);
  for (int64_t j = block * kBlock; j < end; j += kTile) {  // a tile's rows of x stay in L2 across the three steps
    const int count = static_cast<int>(std::min<int64_t>(kTile, end - j));
    logits_tile(p, j, count, z);
    out.loss += softmax_tile(p, j, count, z, out.gb.data());
    gradient_tile(p, j, count, z, gp, out);
  }
}

// Visits every entry (row, class) of a [D, C] matrix held in the kernel's layouts (the weights
// going in, the gradient coming out): rows of whole feature quads in the pair layout [Q, K, 4]
// (lane (h, i) of pair p: class 8 kk + 2p + h, row 4q + i), the rows after them [D - 4Q, K] with
// classes as lanes. fn(row, cls, entry). The loops follow the layouts, so no lane index needs a
// division.
template <typename Fn>
void for_each_entry(vec* pairs, vec* tail, int64_t d, int64_t c, int64_t k, int64_t quads, Fn fn) {
  for (int64_t q = 0; q < quads; ++q)
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t lane = 0; lane < kLanes && kk * kLanes + lane < c; ++lane)
        for (int64_t i = 0; i < 4; ++i)
          fn(4 * q + i, kk * kLanes + lane, pairs[(q * k + kk) * 4 + lane / 2][(lane % 2) * 4 + i]);
  for (int64_t row = 4 * quads; row < d; ++row)
    for (int64_t cls = 0; cls < c; ++cls) fn(row, cls, tail[(row - 4 * quads) * k + cls / kLanes][cls % kLanes]);
}

// One layer's data term, evaluated for one weight matrix after another (a fit's loss evaluations):
// the weights' layouts and the threads' partial sums are allocated once.
class DataTerm {
 public:
  DataTerm(ffi::ThreadPool& pool, const float* x_layer, int64_t n, int64_t d, int64_t c, const int32_t* labels,
           const float* share)
      : pool_(pool), d_(d), c_(c), k_((c + kLanes - 1) / kLanes), quads_(d / 4), blocks_((n + kBlock - 1) / kBlock),
        wq_(quads_ * k_ * 4), wt_((d - 4 * quads_) * k_), bias_(k_),
        problem_{x_layer, wq_.data(), wt_.data(), bias_.data(), labels, share, d, n, c, k_, quads_},
        partials_(slots_for(pool, blocks_)) {
    for (Partial& part : partials_) {
#if defined(__AVX512F__)
      part.gc.resize(k_ * kLanes * d_);
#else
      part.gq.resize(wq_.size());
      part.gt.resize(wt_.size());
      part.gp.assign(kTile * k_ * 4, vec{});
#endif
      part.gb.resize(k_);
      part.z.assign(kTile * k_, vec{});
    }
  }

  // loss = -sum_n share_n log softmax(z_n)[label_n] for z_n = W^T x_n + bias; writes gx [D, C] and
  // gb [C] (row-major). w [D, C] and bias [C] row-major.
  double evaluate(const float* w, const float* bias, float* gx, float* gb) {
    // weights and bias in the kernel's layouts, padded to whole class groups; padded classes get a
    // bias of -inf so that their softmax probability is exactly 0
    for_each_entry(wq_.data(), wt_.data(), d_, c_, k_, quads_,
                   [&](int64_t row, int64_t cls, float& entry) { entry = w[row * c_ + cls]; });
    std::fill(bias_.begin(), bias_.end(), splat(-INFINITY));
    for (int64_t cls = 0; cls < c_; ++cls) bias_[cls / kLanes][cls % kLanes] = bias[cls];
    for (Partial& part : partials_) {
      std::fill(part.gc.begin(), part.gc.end(), 0.0f);
      std::fill(part.gq.begin(), part.gq.end(), vec{});
      std::fill(part.gt.begin(), part.gt.end(), vec{});
      std::fill(part.gb.begin(), part.gb.end(), vec{});
      part.loss = 0.0;
    }
    run_blocks(pool_, blocks_, [&](int64_t slot, int64_t block) { run_block(problem_, block, partials_[slot]); });

    // add up the threads' partial sums, back to [D, C] and [C]
    Partial& total = partials_[0];
    for (size_t slot = 1; slot < partials_.size(); ++slot) {
      const Partial& part = partials_[slot];
      for (size_t i = 0; i < total.gc.size(); ++i) total.gc[i] += part.gc[i];
      for (size_t i = 0; i < total.gq.size(); ++i) total.gq[i] += part.gq[i];
      for (size_t i = 0; i < total.gt.size(); ++i) total.gt[i] += part.gt[i];
      for (size_t i = 0; i < total.gb.size(); ++i) total.gb[i] += part.gb[i];
      total.loss += part.loss;
    }
#if defined(__AVX512F__)
    for (int64_t row = 0; row < d_; ++row)
      for (int64_t cls = 0; cls < c_; ++cls) gx[row * c_ + cls] = total.gc[cls * d_ + row];
#else
    for_each_entry(total.gq.data(), total.gt.data(), d_, c_, k_, quads_,
                   [&](int64_t row, int64_t cls, float& entry) { gx[row * c_ + cls] = entry; });
#endif
    for (int64_t cls = 0; cls < c_; ++cls) gb[cls] = total.gb[cls / kLanes][cls % kLanes];
    return total.loss;
  }

 private:
  ffi::ThreadPool& pool_;
  int64_t d_, c_, k_, quads_, blocks_;
  std::vector<vec> wq_, wt_, bias_;
  Problem problem_;
  std::vector<Partial> partials_;
};

// The checks both custom calls make of X [L, N, D], the layer, and labels, share [N]; an empty
// string when they pass.
std::string check_data(const char* op, ffi::Span<const int64_t> x_dims, int64_t layer, int64_t c,
                       ffi::Buffer<ffi::S32>& labels, ffi::Buffer<ffi::F32>& share) {
  if (x_dims.size() != 3) return std::string(op) + ": expected X [L, N, D]";
  const int64_t n = x_dims[1];
  if (layer < 0 || layer >= x_dims[0]) return std::string(op) + ": layer index out of range";
  if (labels.element_count() != static_cast<size_t>(n) || share.element_count() != static_cast<size_t>(n))
    return std::string(op) + ": labels and share must be [N], N the examples of X";
  const int32_t* label_data = labels.typed_data();
  for (int64_t i = 0; i < n; ++i)
    if (label_data[i] < 0 || label_data[i] >= c)
      return std::string(op) + ": a label is outside [0, C); labels must be class ids";
  return "";
}

ffi::Error LogisticEvalImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                            ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> labels,
                            ffi::Buffer<ffi::F32> share, ffi::ResultBuffer<ffi::F32> loss,
                            ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gb) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 3 || w_dims.size() != 2 || w_dims[0] != x_dims[2] ||
      bias.element_count() != static_cast<size_t>(w_dims[1]))
    return ffi::Error::InvalidArgument("logistic_eval: expected X [L, N, D], W [D, C] and bias [C]");
  const int64_t n = x_dims[1], d = x_dims[2], c = w_dims[1], l = *layer.typed_data();
  const std::string problem = check_data("logistic_eval", x_dims, l, c, labels, share);
  if (!problem.empty()) return ffi::Error::InvalidArgument(problem);
  DataTerm term(pool, x.typed_data() + l * n * d, n, d, c, labels.typed_data(), share.typed_data());
  *loss->typed_data() = static_cast<float>(term.evaluate(w.typed_data(), bias.typed_data(), gx->typed_data(),
                                                         gb->typed_data()));
  return ffi::Error::Success();
}

// The moments in float64 from sums of (x - shift), shift = the layer's first row: a shift inside
// the data's range keeps sum of squares minus squared sum from cancelling when mean >> std.
// Blocks of kBlock rows are summed in float32 (short sums), then added up in float64.
ffi::Error ColumnMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                             ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> stddev) {
  const auto dims = x.dimensions();
  if (dims.size() != 3) return ffi::Error::InvalidArgument("column_moments: expected X [L, N, D]");
  const int64_t n = dims[1], d = dims[2], l = *layer.typed_data();
  if (l < 0 || l >= dims[0]) return ffi::Error::InvalidArgument("column_moments: layer index out of range");
  if (n == 0) return ffi::Error::InvalidArgument("column_moments: no examples");
  const float* rows = x.typed_data() + l * n * d;
  const float* shift = rows;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  struct Sums {
    std::vector<double> s1, s2;
    std::vector<float> b1, b2;
  };
  std::vector<Sums> partials(slots_for(pool, blocks));
  for (Sums& part : partials) {
    part.s1.assign(d, 0.0);
    part.s2.assign(d, 0.0);
    part.b1.assign(d, 0.0f);
    part.b2.assign(d, 0.0f);
  }
  run_blocks(pool, blocks, [&](int64_t slot, int64_t block) {
    Sums& part = partials[slot];
    float* __restrict__ b1 = part.b1.data();
    float* __restrict__ b2 = part.b2.data();
    std::fill(part.b1.begin(), part.b1.end(), 0.0f);
    std::fill(part.b2.begin(), part.b2.end(), 0.0f);
    const int64_t end = std::min<int64_t>((block + 1) * kBlock, n);
    for (int64_t row = block * kBlock; row < end; ++row) {
      const float* __restrict__ xr = rows + row * d;
      for (int64_t col = 0; col < d; ++col) {
        const float centred = xr[col] - shift[col];
        b1[col] += centred;
        b2[col] += centred * centred;
      }
    }
    for (int64_t col = 0; col < d; ++col) {
      part.s1[col] += b1[col];
      part.s2[col] += b2[col];
    }
  });
  for (int64_t col = 0; col < d; ++col) {
    double s1 = 0.0, s2 = 0.0;
    for (const Sums& part : partials) {
      s1 += part.s1[col];
      s2 += part.s2[col];
    }
    const double m1 = s1 / n;
    mean->typed_data()[col] = static_cast<float>(shift[col] + m1);
    stddev->typed_data()[col] = static_cast<float>(std::sqrt(std::max(0.0, s2 / n - m1 * m1)));
  }
  return ffi::Error::Success();
}

float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t p) {
  constexpr int W = vlm_jax_native::kWideLanes;
  vlm_jax_native::vec_of<W> acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * W <= p; i += 2 * W) {
    acc0 += vlm_jax_native::load<W>(a + i) * vlm_jax_native::load<W>(b + i);
    acc1 += vlm_jax_native::load<W>(a + i + W) * vlm_jax_native::load<W>(b + i + W);
  }
  float total = vlm_jax_native::sum_lanes(acc0 + acc1);
  for (; i < p; ++i) total += a[i] * b[i];
  return total;
}

// v += coef * add, then the dot product of `with` and the new v, in one pass over v: the two-loop
// recursion's steps each update its vector and take the next dot with it.
float add_then_dot(float* __restrict__ v, const float* __restrict__ add, float coef, const float* __restrict__ with,
                   int64_t p) {
  using wide = vlm_jax_native::vec_of<vlm_jax_native::kWideLanes>;
  constexpr int W = vlm_jax_native::kWideLanes;
  const wide c = splat<W>(coef);
  wide acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * W <= p; i += 2 * W) {
    const wide v0 = vlm_jax_native::load<W>(v + i) + c * vlm_jax_native::load<W>(add + i);
    const wide v1 = vlm_jax_native::load<W>(v + i + W) + c * vlm_jax_native::load<W>(add + i + W);
    vlm_jax_native::store(v + i, v0);
    vlm_jax_native::store(v + i + W, v1);
    acc0 += v0 * vlm_jax_native::load<W>(with + i);
    acc1 += v1 * vlm_jax_native::load<W>(with + i + W);
  }
  float total = vlm_jax_native::sum_lanes(acc0 + acc1);
  for (; i < p; ++i) {
    v[i] += coef * add[i];
    total += v[i] * with[i];
  }
  return total;
}

// v += coef * add
void add_scaled(float* __restrict__ v, const float* __restrict__ add, float coef, int64_t p) {
  for (int64_t i = 0; i < p; ++i) v[i] += coef * add[i];
}

// L-BFGS's search direction d = -H g [P] by the two-loop recursion, as probe/lbfgs.py forms it.
// S, Y [M, P]: the stored steps and gradient changes, slot (stored - 1 - i) mod M the i-th newest;
// rho [M] = 1 / (s . y), 0 for an empty slot. H's initial scale is s.y / y.y of the newest pair (1
// when none is stored).
void two_loop(const float* sd, const float* yd, const float* rhod, const float* g, int64_t stored, int64_t memory,
              int64_t p, float* r) {
  std::memcpy(r, g, p * sizeof(float));
  // the stored slots, newest first (empty ones, rho = 0, would add nothing)
  std::vector<int64_t> order;
  for (int64_t i = 0; i < memory; ++i) {
    const int64_t slot = (((stored - 1 - i) % memory) + memory) % memory;
    if (rhod[slot] != 0.0f) order.push_back(slot);
  }
  float gamma = 1.0f;
  if (stored > 0) {
    const int64_t newest = (((stored - 1) % memory) + memory) % memory;
    const float* yn = yd + newest * p;
    const float yy = dot(yn, yn, p), sy = dot(sd + newest * p, yn, p);
    if (yy > 0.0f) gamma = sy / std::max(yy, 1e-30f);
  }
  // first loop, newest to oldest: alpha_i = rho_i s_i.q, then q -= alpha_i y_i; each pass applies
  // the previous slot's update and forms the next dot
  const int64_t pairs = static_cast<int64_t>(order.size());
  std::vector<float> alpha(pairs);
  for (int64_t i = 0; i < pairs; ++i) {
    const float* s_i = sd + order[i] * p;
    alpha[i] =
        rhod[order[i]] * (i == 0 ? dot(s_i, r, p) : add_then_dot(r, yd + order[i - 1] * p, -alpha[i - 1], s_i, p));
  }
  if (pairs > 0) add_scaled(r, yd + order[pairs - 1] * p, -alpha[pairs - 1], p);
  for (int64_t i = 0; i < p; ++i) r[i] *= gamma;
  // second loop, oldest to newest: beta_i = rho_i y_i.r, then r += (alpha_i - beta_i) s_i
  float coef = 0.0f;
  for (int64_t i = pairs - 1; i >= 0; --i) {
    const float* y_i = yd + order[i] * p;
    const float beta =
        rhod[order[i]] * (i == pairs - 1 ? dot(y_i, r, p) : add_then_dot(r, sd + order[i + 1] * p, coef, y_i, p));
    coef = alpha[i] - beta;
  }
  if (pairs > 0) add_scaled(r, sd + order[0] * p, coef, p);
  for (int64_t i = 0; i < p; ++i) r[i] = -r[i];
}

// The probe's objective on standardised features, as a function of theta = [W (D x C, row-major),
// b (C)]: sum_n share_n CE(W^T xs_n + b) + lam / 2 ||W||^2 with xs = (x - mean) / scale, evaluated on
// the raw features x with the standardisation folded into the weights: W' = W / scale,
// bias = b - (mean / scale) W, and d/dW = gx / scale - (mean / scale) gb^T + lam W (probe/linear.py's
// _fit_logistic_one).
class Objective {
 public:
  Objective(DataTerm& term, const float* mean, const float* scale, float lam, int64_t d, int64_t c)
      : term_(term), scale_(scale), lam_(lam), d_(d), c_(c), shift_(d), w_raw_(d * c), bias_raw_(c),
        penalty_(c), gx_(d * c), gb_(c) {
    for (int64_t row = 0; row < d; ++row) shift_[row] = mean[row] / scale[row];
  }

  // the value, and the gradient [D * C + C] into grad
  float operator()(const float* theta, float* grad) {
    const float* w = theta;
    const float* b = theta + d_ * c_;
    for (int64_t cls = 0; cls < c_; ++cls) {
      bias_raw_[cls] = b[cls];
      penalty_[cls] = 0.0f;
    }
    // the inner loops run over the classes, so that each class's sums are a chain of their own
    for (int64_t row = 0; row < d_; ++row)
      for (int64_t cls = 0; cls < c_; ++cls) {
        const float entry = w[row * c_ + cls];
        w_raw_[row * c_ + cls] = entry / scale_[row];
        bias_raw_[cls] -= shift_[row] * entry;
        penalty_[cls] += entry * entry;
      }
    const float penalty = std::accumulate(penalty_.begin(), penalty_.end(), 0.0f);
    const double loss = term_.evaluate(w_raw_.data(), bias_raw_.data(), gx_.data(), gb_.data());
    for (int64_t row = 0; row < d_; ++row)
      for (int64_t cls = 0; cls < c_; ++cls)
        grad[row * c_ + cls] = gx_[row * c_ + cls] / scale_[row] - shift_[row] * gb_[cls] + lam_ * w[row * c_ + cls];
    for (int64_t cls = 0; cls < c_; ++cls) grad[d_ * c_ + cls] = gb_[cls];
    return static_cast<float>(loss) + 0.5f * lam_ * penalty;
  }

 private:
  DataTerm& term_;
  const float* scale_;  // [D], the caller's
  float lam_;
  int64_t d_, c_;
  std::vector<float> shift_, w_raw_, bias_raw_, penalty_, gx_, gb_;
};

// the largest |entry| of v; NaN if v holds one (then the fit stops, as jnp.max would say). In
// vectors: a scalar loop with its NaN test took ~8 us at P = 8200.
float largest_magnitude(const std::vector<float>& v) {
  constexpr int W = vlm_jax_native::kWideLanes;
  using wide_vec = vlm_jax_native::vec_of<W>;
  wide_vec top{}, nan{};
  const int64_t p = static_cast<int64_t>(v.size());
  int64_t i = 0;
  for (; i + W <= p; i += W) {
    const wide_vec entry = vlm_jax_native::load<W>(v.data() + i);
    const wide_vec magnitude = entry < 0.0f ? -entry : entry;
    top = magnitude > top ? magnitude : top;
    nan = entry != entry ? vlm_jax_native::splat<W>(1.0f) : nan;
  }
  float largest = 0.0f;
  bool any_nan = false;
  for (int lane = 0; lane < W; ++lane) {
    largest = std::max(largest, top[lane]);
    any_nan |= nan[lane] != 0.0f;
  }
  for (; i < p; ++i) {
    any_nan |= std::isnan(v[i]);
    largest = std::max(largest, std::fabs(v[i]));
  }
  return any_nan ? NAN : largest;
}

// probe/lbfgs.py's minimize, step for step, on the objective above: the same direction, the same
// first step, the same Armijo backtracking and curvature test, the same stopping rule. In XLA each
// iteration's bookkeeping was ~35 small ops (57 us per iteration at P = 8200, beside a 0.3 ms
// evaluation); here it is a few passes over P floats.
ffi::Error LogisticFitImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                           ffi::Buffer<ffi::S32> labels, ffi::Buffer<ffi::F32> share, ffi::Buffer<ffi::F32> mean,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> lam, ffi::Buffer<ffi::F32> w0,
                           ffi::Buffer<ffi::F32> b0, ffi::Buffer<ffi::F32> tol, int64_t max_iter, int64_t memory,
                           int64_t max_backtracks, ffi::ResultBuffer<ffi::F32> w_out, ffi::ResultBuffer<ffi::F32> b_out,
                           ffi::ResultBuffer<ffi::S32> counts) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w0.dimensions();
  if (x_dims.size() != 3 || w_dims.size() != 2 || w_dims[0] != x_dims[2] ||
      b0.element_count() != static_cast<size_t>(w_dims[1]) || mean.element_count() != static_cast<size_t>(x_dims[2]) ||
      scale.element_count() != static_cast<size_t>(x_dims[2]))
    return ffi::Error::InvalidArgument("logistic_fit: expected X [L, N, D], W0 [D, C], b0 [C], mean and scale [D]");
  if (memory < 1 || max_iter < 0 || max_backtracks < 0)
    return ffi::Error::InvalidArgument("logistic_fit: memory must be >= 1, max_iter and max_backtracks >= 0");
  const int64_t n = x_dims[1], d = x_dims[2], c = w_dims[1], l = *layer.typed_data();
  const std::string problem = check_data("logistic_fit", x_dims, l, c, labels, share);
  if (!problem.empty()) return ffi::Error::InvalidArgument(problem);

  DataTerm term(pool, x.typed_data() + l * n * d, n, d, c, labels.typed_data(), share.typed_data());
  Objective objective(term, mean.typed_data(), scale.typed_data(), *lam.typed_data(), d, c);
  const int64_t p = d * c + c;
  const float tolerance = *tol.typed_data();
  std::vector<float> theta(p), grad(p), direction(p), trial(p), trial_grad(p), step(p), change(p);
  std::memcpy(theta.data(), w0.typed_data(), d * c * sizeof(float));
  std::memcpy(theta.data() + d * c, b0.typed_data(), c * sizeof(float));
  std::vector<float> steps(memory * p, 0.0f), changes(memory * p, 0.0f), rho(memory, 0.0f);
  float value = objective(theta.data(), grad.data());
  int64_t iterations = 0, evaluations = 1, stored = 0;
  for (;;) {
    const float top = largest_magnitude(grad);
    if (iterations >= max_iter || !(top > tolerance)) break;
    two_loop(steps.data(), changes.data(), rho.data(), grad.data(), stored, memory, p, direction.data());
    float slope = dot(direction.data(), grad.data(), p);
    if (!(slope < 0.0f)) {  // not a descent direction: steepest descent
      for (int64_t i = 0; i < p; ++i) direction[i] = -grad[i];
      slope = -dot(grad.data(), grad.data(), p);
    }
    // the first step of a run has no curvature information: keep it small
    float t = stored == 0 ? std::min(1.0f, 1.0f / std::max(top, 1e-12f)) : 1.0f;
    auto evaluate_at = [&](float step) {
      for (int64_t i = 0; i < p; ++i) trial[i] = theta[i] + step * direction[i];
      return objective(trial.data(), trial_grad.data());
    };
    float trial_value = evaluate_at(t);
    int64_t backtracks = 0;
    while (trial_value > value + 1e-4f * t * slope && backtracks < max_backtracks) {
      t *= 0.5f;
      trial_value = evaluate_at(t);
      ++backtracks;
    }
    // the curvature pair s = t d, y = g_new - g, kept when s . y > 1e-10
    for (int64_t i = 0; i < p; ++i) {
      step[i] = t * direction[i];
      change[i] = trial_grad[i] - grad[i];
    }
    const float sy = dot(step.data(), change.data(), p);
    if (sy > 1e-10f) {
      const int64_t slot = stored % memory;
      std::copy(step.begin(), step.end(), steps.begin() + slot * p);
      std::copy(change.begin(), change.end(), changes.begin() + slot * p);
      rho[slot] = 1.0f / sy;
      ++stored;
    }
    for (int64_t i = 0; i < p; ++i) theta[i] += step[i];
    value = trial_value;
    grad.swap(trial_grad);
    ++iterations;
    evaluations += 1 + backtracks;
  }
  std::memcpy(w_out->typed_data(), theta.data(), d * c * sizeof(float));
  std::memcpy(b_out->typed_data(), theta.data() + d * c, c * sizeof(float));
  counts->typed_data()[0] = static_cast<int32_t>(iterations);
  counts->typed_data()[1] = static_cast<int32_t>(evaluations);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxLogisticFit, LogisticFitImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // X
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // labels
                                  .Arg<ffi::Buffer<ffi::F32>>()  // share
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lam
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b0
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tol
                                  .Attr<int64_t>("max_iter")
                                  .Attr<int64_t>("memory")
                                  .Attr<int64_t>("max_backtracks")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxLogisticEval, LogisticEvalImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxColumnMoments, ColumnMomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
