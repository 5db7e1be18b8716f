// One evaluation of a softmax-regression probe's data term and its gradient, in one pass over
// one layer's features, for XLA's CPU backend (an XLA FFI custom call; built and loaded by
// vlm_jax/probe/cpu_kernel.py).
//
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
// and gradient contribution are computed while their kTile rows of X sit in L1/L2, so X is read
// once per evaluation and never copied. The classes are the SIMD lanes (8 float32 per vector),
// so both products are broadcast-and-multiply-add loops with no packing. Blocks of kBlock
// examples are shared among the threads of XLA's intra-op pool; each thread sums into its own
// partial gradient, and the caller adds the partials up.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr int64_t kBlock = 64;  // examples per unit of work shared among threads
constexpr int kTile = 8;        // examples (logits) or feature rows (gradient) per register tile

inline vec splat(float x) { return vec{} + x; }

// exp on 8 lanes: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], degree-6 polynomial
// (relative error ~1e-7); inputs below -87 give 0.
inline vec vexp(vec x) {
  const vec lo = splat(-87.0f);
  vec xc = x < lo ? lo : x;
  const vec shifter = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  vec n = (xc * 1.44269504088896341f + shifter) - shifter;
  vec r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  vec result = p * scale;
  return x < lo ? splat(0.0f) : result;
}

struct Problem {
  const float* x;         // [N, D] one layer's features, row-major
  const vec* w;           // [D, K] padded weights
  const vec* bias;        // [K] padded bias (padding lanes -inf)
  const int32_t* labels;  // [N]
  const float* share;     // [N]
  int64_t d, n, c, k;     // features, examples, classes, class vectors (ceil(c / 8))
};

struct Shared {
  Problem problem;
  int64_t blocks;
  std::atomic<int64_t> next_block{0}, done_blocks{0}, next_slot{0};
  std::vector<std::vector<vec>> gx;  // per slot [D * K]
  std::vector<std::vector<vec>> gb;  // per slot [K]
  std::vector<double> loss;          // per slot
};

// z[t, kk] = bias[kk] + sum_row x[j + t, row] * w[row, kk] for `count` (<= kTile) examples
template <int count>
inline void logits_tile(const Problem& p, int64_t j, vec* __restrict__ z) {
  for (int64_t kk = 0; kk < p.k; ++kk) {
    vec acc[count];
    for (int t = 0; t < count; ++t) acc[t] = p.bias[kk];
    const float* __restrict__ x = p.x + j * p.d;
    const vec* __restrict__ w = p.w;
    for (int64_t row = 0; row < p.d; ++row) {
      const vec wr = w[row * p.k + kk];
      for (int t = 0; t < count; ++t) acc[t] += x[t * p.d + row] * wr;
    }
    for (int t = 0; t < count; ++t) z[t * p.k + kk] = acc[t];
  }
}

// gx[row, kk] += sum_t x[j + t, row] * g[t, kk] for `count` (<= kTile) examples. kRows rows at a
// time, each with its own accumulator, so that kRows independent multiply-add chains interleave.
template <int count>
inline void gradient_tile(const Problem& p, int64_t j, const vec* __restrict__ g, vec* __restrict__ gx) {
  constexpr int kRows = 8;
  const float* __restrict__ x = p.x + j * p.d;
  for (int64_t kk = 0; kk < p.k; ++kk) {
    int64_t row = 0;
    for (; row + kRows <= p.d; row += kRows) {
      vec acc[kRows];
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) acc[i] = gx[(row + i) * p.k + kk];
#pragma GCC unroll 16
      for (int t = 0; t < count; ++t) {
        const vec gt = g[t * p.k + kk];
        const float* __restrict__ xt = x + t * p.d + row;
#pragma GCC unroll 16
        for (int i = 0; i < kRows; ++i) acc[i] += xt[i] * gt;
      }
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) gx[(row + i) * p.k + kk] = acc[i];
    }
    for (; row < p.d; ++row) {
      vec acc = gx[row * p.k + kk];
      for (int t = 0; t < count; ++t) acc += x[t * p.d + row] * g[t * p.k + kk];
      gx[row * p.k + kk] = acc;
    }
  }
}

inline float horizontal_max(vec v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, v[l]);
  return m;
}

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
    const float top = horizontal_max(top_v);
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

void run_block(const Problem& p, int64_t block, vec* z, vec* gx, vec* gb, double* loss) {
  const int64_t end = std::min<int64_t>((block + 1) * kBlock, p.n);
  int64_t j = block * kBlock;
  for (; j + kTile <= end; j += kTile) {  // a tile's kTile rows of x stay in L1 across the three steps
    logits_tile<kTile>(p, j, z);
    *loss += softmax_tile(p, j, kTile, z, gb);
    gradient_tile<kTile>(p, j, z, gx);
  }
  for (; j < end; ++j) {
    logits_tile<1>(p, j, z);
    *loss += softmax_tile(p, j, 1, z, gb);
    gradient_tile<1>(p, j, z, gx);
  }
}

void work(Shared& s) {
  const int64_t slot = s.next_slot.fetch_add(1);
  if (slot >= static_cast<int64_t>(s.gx.size())) return;
  std::vector<vec> z(kTile * s.problem.k);
  for (;;) {
    const int64_t block = s.next_block.fetch_add(1);
    if (block >= s.blocks) return;
    run_block(s.problem, block, z.data(), s.gx[slot].data(), s.gb[slot].data(), &s.loss[slot]);
    s.done_blocks.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error LogisticEvalImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer,
                            ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> labels,
                            ffi::Buffer<ffi::F32> share, ffi::ResultBuffer<ffi::F32> loss,
                            ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> gb) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 3 || w_dims.size() != 2 || w_dims[0] != x_dims[2])
    return ffi::Error::InvalidArgument("logistic_eval: expected X [L, N, D] and W [D, C]");
  const int64_t d = x_dims[2], n = x_dims[1], c = w_dims[1];
  const int64_t l = *layer.typed_data();
  if (l < 0 || l >= x_dims[0]) return ffi::Error::InvalidArgument("logistic_eval: layer index out of range");
  const int64_t k = (c + kLanes - 1) / kLanes;
  if (labels.element_count() != static_cast<size_t>(n) || share.element_count() != static_cast<size_t>(n) ||
      bias.element_count() != static_cast<size_t>(c))
    return ffi::Error::InvalidArgument("logistic_eval: labels, share [N] and bias [C] do not match X and W");

  // weights and bias padded to whole class vectors; padded classes get a bias of -inf so that
  // their softmax probability is exactly 0
  std::vector<vec> w_padded(d * k, vec{});
  std::vector<vec> bias_padded(k, splat(-INFINITY));
  const float* w_data = w.typed_data();
  for (int64_t row = 0; row < d; ++row)
    for (int64_t cls = 0; cls < c; ++cls) w_padded[row * k + cls / kLanes][cls % kLanes] = w_data[row * c + cls];
  for (int64_t cls = 0; cls < c; ++cls) bias_padded[cls / kLanes][cls % kLanes] = bias.typed_data()[cls];

  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{x.typed_data() + l * n * d, w_padded.data(), bias_padded.data(), labels.typed_data(),
                            share.typed_data(), d, n, c, k};
  shared->blocks = (n + kBlock - 1) / kBlock;
  const int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), shared->blocks) - 1);
  shared->gx.assign(helpers + 1, std::vector<vec>(d * k, vec{}));
  shared->gb.assign(helpers + 1, std::vector<vec>(k, vec{}));
  shared->loss.assign(helpers + 1, 0.0);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([shared] { work(*shared); });
  work(*shared);
  // a helper that starts late finds no block left; one that took a block is waited for
  while (shared->done_blocks.load(std::memory_order_acquire) < shared->blocks) std::this_thread::yield();

  double total_loss = 0.0;
  for (double part : shared->loss) total_loss += part;
  *loss->typed_data() = static_cast<float>(total_loss);
  float* gx_out = gx->typed_data();
  float* gb_out = gb->typed_data();
  for (int64_t row = 0; row < d; ++row)
    for (int64_t cls = 0; cls < c; ++cls) {
      float sum = 0.0f;
      for (const auto& part : shared->gx) sum += part[row * k + cls / kLanes][cls % kLanes];
      gx_out[row * c + cls] = sum;
    }
  for (int64_t cls = 0; cls < c; ++cls) {
    float sum = 0.0f;
    for (const auto& part : shared->gb) sum += part[cls / kLanes][cls % kLanes];
    gb_out[cls] = sum;
  }
  return ffi::Error::Success();
}

}  // namespace

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
