// XLA FFI custom call for the logit lens on CPU (built and loaded by vlm_jax/interp/lens_kernel.py,
// with vlm_jax/native/build.py): what the lens needs of each row of logits besides its top-k
// candidates, in one pass over the row.
//
// VlmJaxLogitStats
// Inputs:  logits [N, V] (float32, row-major).  Attribute: block (int64), a multiple of 16 that
//          divides V.
// Outputs: block_max [N, V / block], the maximum of each block of `block` consecutive logits;
//          lse [N], log sum_v exp(logits[n, v]).
//
// Why a kernel: XLA CPU computes the log-sum-exp in two passes over the row (its maximum, then the
// sum of exponentials) and the block maxima in a third, each over a [576, 32064] chunk of logits
// (74 MB, more than the cache holds); its exponential runs at ~2.8 G values/s per core. Here each
// block's maximum is taken while its values are in registers, the running sum is kept relative to
// the running maximum (rescaled when a block raises it), and the exponentials use vector_math.h's
// vexp. benchmarks/RESULTS.md has the measurements.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "thread_blocks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kW = vlm_jax_native::kWideLanes;
using wide = vlm_jax_native::vec_of<kW>;
constexpr int64_t kRowsPerUnit = 4;  // rows per unit of work shared among threads

// block maxima and log-sum-exp of one row of v_len logits
void row_stats(const float* __restrict__ row, int64_t v_len, int64_t block, float* __restrict__ block_max,
               float* __restrict__ lse) {
  using vlm_jax_native::load;
  using vlm_jax_native::splat;
  float running = -std::numeric_limits<float>::infinity();  // the maximum so far
  wide sums = {};                                                // sum of exp(x - running), by lane
  for (int64_t start = 0, b = 0; start < v_len; start += block, ++b) {
    wide m = load<kW>(row + start);
    for (int64_t j = kW; j < block; j += kW) {
      const wide x = load<kW>(row + start + j);
      m = m > x ? m : x;
    }
    const float top = vlm_jax_native::max_lanes(m);
    block_max[b] = top;
    if (top > running) {  // rescale the sums to the new maximum (exp(-inf) = 0 on the first block)
      sums *= std::exp(running - top);
      running = top;
    }
    if (!std::isfinite(running)) continue;  // -inf so far, or +inf: nothing to add
    const wide shift = splat<kW>(running);
    // a NaN logit makes its exponential, the sum and the log-sum-exp NaN, as in XLA
    for (int64_t j = 0; j < block; j += kW) sums += vlm_jax_native::vexp(load<kW>(row + start + j) - shift);
  }
  // every logit -inf: -inf; a +inf logit: +inf (as jax.nn.logsumexp)
  *lse = std::isfinite(running) ? running + std::log(vlm_jax_native::sum_lanes(sums)) : running;
}

ffi::Error LogitStatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, int64_t block,
                          ffi::ResultBuffer<ffi::F32> block_max, ffi::ResultBuffer<ffi::F32> lse) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("logit_stats: expected logits [N, V]");
  const int64_t rows = dims[0], v_len = dims[1];
  if (block <= 0 || block % kW || v_len % block)
    return ffi::Error::InvalidArgument("logit_stats: block must be a multiple of the vector width dividing V");
  const auto bm_dims = block_max->dimensions();
  if (bm_dims.size() != 2 || bm_dims[0] != rows || bm_dims[1] != v_len / block || lse->dimensions().size() != 1 ||
      lse->dimensions()[0] != rows)
    return ffi::Error::InvalidArgument("logit_stats: expected block_max [N, V / block] and lse [N]");
  const float* x = logits.typed_data();
  float* bm = block_max->typed_data();
  float* out = lse->typed_data();
  const int64_t n_blocks = v_len / block;
  const int64_t units = (rows + kRowsPerUnit - 1) / kRowsPerUnit;
  vlm_jax_native::run_blocks(pool, units, [&](int64_t, int64_t unit) {
    const int64_t end = std::min(rows, (unit + 1) * kRowsPerUnit);
    for (int64_t r = unit * kRowsPerUnit; r < end; ++r) row_stats(x + r * v_len, v_len, block, bm + r * n_blocks, out + r);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int VlmJaxLogitStatsVectorLanes() { return kW; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxLogitStats, LogitStatsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
