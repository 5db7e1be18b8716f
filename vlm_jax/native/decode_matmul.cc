// XLA FFI custom calls for the products of a decode step: a few rows (the batch) times every
// weight matrix of the decoder and the unembedding (built and loaded by vlm_jax/nn/decode_matmul.py,
// with vlm_jax/native/build.py). Such a step costs the time to read the weights; XLA CPU's products
// read a [K, N] matrix at ~29 GB/s for one row but at ~16 GB/s for two to eight (its GEMM path
// packs the weights again on every call). Two layouts:
//
// VlmJaxStackedMatmul: y = x W[layer], reading W where it is, in a stack of layers.
// Inputs:  x [M, K] (float32), w [L, K, N] (float32, row-major); attribute layer (int64).
// Outputs: y [M, N].
// The threads take column ranges. With AVX2 each goes down the rows of W kRowBlock at a time
// (kRowBlock contiguous streams), adding kRowBlock rows' products to its range of y (in L1/L2) per
// pass: as fast as the panels below for one or two rows, ~15% slower for four and ~1.4x slower for
// eight (measured, standalone). With AVX-512, strips of columns go down all rows with their
// accumulators in registers: as fast as the panels for 1-8 rows. No copy of the weights is
// needed: the decode steps read the stacked parameters themselves.
//
// VlmJaxDecodeMatmulVectorLanes (plain C): the lanes of the vectors this build uses (8 or 16),
// which decides generate's weight form (generate.decode_kernel_form).
//
// VlmJaxPanelMatmul: y = x W, W packed in column panels.
// Inputs:  x [M, K] (float32), panels [P, K, 16] (float32): W [K, N] cut into P = ceil(N / 16)
//          panels of 16 columns, panel p holding columns 16p .. 16p + 15 row after row (the columns
//          past N are zeros).
// Outputs: y [M, 16 P] (the caller drops the columns past N).
// Each panel is one contiguous stream that every row's multiply-adds use while it is in
// registers: 16 columns x M rows of accumulators, and a software prefetch ahead of the stream.
// Blocks of kPanelsPerBlock panels are shared among the threads of XLA's intra-op pool.
//
// benchmarks/RESULTS.md has the measurements.

#include <cstdint>
#include <cstring>

#include "thread_blocks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using vlm_jax_native::kLanes;
using vlm_jax_native::load;
using vlm_jax_native::splat;
using vlm_jax_native::store;
using vlm_jax_native::vec;

constexpr int64_t kPanel = 16;          // columns per panel: two vectors
constexpr int64_t kPanelsPerBlock = 4;  // panels per unit of work shared among threads
constexpr int kMaxRows = 8;             // rows per pass over the weights (panels: 16 vector accumulators)
constexpr int64_t kPrefetchAhead = 512;  // floats (2 KB) ahead in the panel's stream


// y[m, 0:16] = sum_k x[m, k] panel[k, 0:16] for the M rows at x (row stride k_len) into y (row
// stride y_stride). One row has only two accumulator chains and streams fast enough without the
// prefetch, which then only costs (measured).
template <int M>
void panel_rows(const float* x, int64_t k_len, const float* panel, float* y, int64_t y_stride) {
  vec acc[M][2] = {};
  for (int64_t k = 0; k < k_len; ++k) {
    const float* w = panel + k * kPanel;
    if (M > 1) __builtin_prefetch(w + kPrefetchAhead);
    const vec w0 = load(w), w1 = load(w + kLanes);
    for (int m = 0; m < M; ++m) {
      const vec xm = splat(x[m * k_len + k]);
      acc[m][0] += xm * w0;
      acc[m][1] += xm * w1;
    }
  }
  for (int m = 0; m < M; ++m) {
    store(y + m * y_stride, acc[m][0]);
    store(y + m * y_stride + kLanes, acc[m][1]);
  }
}

#if defined(__AVX512F__)
// With AVX-512 (32 registers of 16 lanes) the threads' column ranges are cut into strips of
// kStripVectors vectors, and each strip goes down all K rows with its M x kStripVectors
// accumulators in registers, a software prefetch kPrefetchRows rows ahead. The row blocks below
// load and store every accumulator once per 8 rows, and reload the broadcasts, which bounded them
// there (the CPU preset's weights: 4 rows 3.81-3.93 -> 3.25-3.42 ms, as fast as the panels; one
// row level; 8 rows 4.7-6.4 -> 3.17 ms).
constexpr int kW = vlm_jax_native::kWideLanes;
constexpr int64_t kPrefetchRows = 16;

// y[m, 0:V*N] = sum_k x[m, k] w[k, 0:V*N] for the M rows at x (row stride k_len), w with row
// stride n_cols, y with row stride y_stride
template <int M, int N, int V>
void strip_rows(const float* x, int64_t k_len, const float* w, int64_t n_cols, float* y, int64_t y_stride) {
  using lanes = vlm_jax_native::vec_of<N>;
  lanes acc[M][V] = {};
  for (int64_t k = 0; k < k_len; ++k) {
    const float* row = w + k * n_cols;
    if (k + kPrefetchRows < k_len)  // every line (16 floats) of the strip's row kPrefetchRows ahead
      for (int j = 0; j < V * N; j += 16) __builtin_prefetch(row + kPrefetchRows * n_cols + j);
    lanes r[V];
    for (int j = 0; j < V; ++j) r[j] = load<N>(row + j * N);
    for (int m = 0; m < M; ++m) {
      const lanes b = splat<N>(x[m * k_len + k]);
      for (int j = 0; j < V; ++j) acc[m][j] += b * r[j];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < V; ++j) store(y + m * y_stride + j * N, acc[m][j]);
}

// y[m, 0:width] = sum_k x[m, k] w[k, 0:width] for the M rows at x (row stride k_len), w with row
// stride n_cols, y with row stride y_stride; width a multiple of kLanes.
template <int M>
void stacked_rows(const float* x, int64_t k_len, const float* w, int64_t n_cols, int64_t width, float* y,
                  int64_t y_stride) {
  constexpr int kStripVectors = 4;  // a strip of 4 lines per row (2 vectors: 8 rows 1.3x slower)
  constexpr int64_t strip = kStripVectors * kW;
  int64_t n = 0;
  for (; n + strip <= width; n += strip) strip_rows<M, kW, kStripVectors>(x, k_len, w + n, n_cols, y + n, y_stride);
  for (; n + kW <= width; n += kW) strip_rows<M, kW, 1>(x, k_len, w + n, n_cols, y + n, y_stride);
  for (; n < width; n += kLanes) strip_rows<M, kLanes, 1>(x, k_len, w + n, n_cols, y + n, y_stride);
}
#else
// y[m, 0:width] = sum_k x[m, k] w[k, 0:width] for the M rows at x (row stride k_len), w with row
// stride n_cols, y with row stride y_stride; width a multiple of kLanes.
template <int M>
void stacked_rows(const float* x, int64_t k_len, const float* w, int64_t n_cols, int64_t width, float* y,
                  int64_t y_stride) {
  constexpr int kRowBlock = 8;
  for (int m = 0; m < M; ++m) std::memset(y + m * y_stride, 0, width * sizeof(float));
  int64_t k = 0;
  for (; k + kRowBlock <= k_len; k += kRowBlock) {
    float xs[M][kRowBlock];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < kRowBlock; ++j) xs[m][j] = x[m * k_len + k + j];
    for (int64_t n = 0; n < width; n += kLanes) {
      vec rows[kRowBlock];
      for (int j = 0; j < kRowBlock; ++j) rows[j] = load(w + (k + j) * n_cols + n);
      for (int m = 0; m < M; ++m) {
        vec acc = load(y + m * y_stride + n);
        for (int j = 0; j < kRowBlock; ++j) acc += splat(xs[m][j]) * rows[j];
        store(y + m * y_stride + n, acc);
      }
    }
  }
  for (; k < k_len; ++k)
    for (int64_t n = 0; n < width; n += kLanes) {
      const vec row = load(w + k * n_cols + n);
      for (int m = 0; m < M; ++m) store(y + m * y_stride + n, load(y + m * y_stride + n) + splat(x[m * k_len + k]) * row);
    }
}
#endif

using StackedFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);
constexpr StackedFn kStackedFns[kMaxRows] = {stacked_rows<1>, stacked_rows<2>, stacked_rows<3>, stacked_rows<4>,
                                             stacked_rows<5>, stacked_rows<6>, stacked_rows<7>, stacked_rows<8>};

ffi::Error StackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, int64_t layer,
                             ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || w_dims[1] != x_dims[1])
    return ffi::Error::InvalidArgument("stacked_matmul: expected x [M, K] and w [L, K, N]");
  if (layer < 0 || layer >= w_dims[0]) return ffi::Error::InvalidArgument("stacked_matmul: layer out of range");
  const int64_t rows = x_dims[0], k_len = x_dims[1], n_cols = w_dims[2];
  if (y_dims.size() != 2 || y_dims[0] != rows || y_dims[1] != n_cols)
    return ffi::Error::InvalidArgument("stacked_matmul: expected y [M, N]");
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data() + layer * k_len * n_cols;
  float* y_data = y->typed_data();
  // one column range per thread, whole vectors; the columns past the last whole vector are
  // added here, one at a time
  const int64_t vectors = n_cols / kLanes;
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), vectors));
  const int64_t per_range = (vectors + ranges - 1) / ranges * kLanes;
  vlm_jax_native::run_blocks(pool, ranges, [&](int64_t, int64_t range) {
    const int64_t start = range * per_range, width = std::min(vectors * kLanes, start + per_range) - start;
    if (width <= 0) return;
    for (int64_t row = 0; row < rows; row += kMaxRows) {
      const int64_t count = std::min<int64_t>(kMaxRows, rows - row);
      kStackedFns[count - 1](x_data + row * k_len, k_len, w_data + start, n_cols, width,
                             y_data + row * n_cols + start, n_cols);
    }
  });
  for (int64_t col = vectors * kLanes; col < n_cols; ++col)
    for (int64_t m = 0; m < rows; ++m) {
      float sum = 0;
      for (int64_t k = 0; k < k_len; ++k) sum += x_data[m * k_len + k] * w_data[k * n_cols + col];
      y_data[m * n_cols + col] = sum;
    }
  return ffi::Error::Success();
}

using RowsFn = void (*)(const float*, int64_t, const float*, float*, int64_t);
constexpr RowsFn kRowsFns[kMaxRows] = {panel_rows<1>, panel_rows<2>, panel_rows<3>, panel_rows<4>,
                                       panel_rows<5>, panel_rows<6>, panel_rows<7>, panel_rows<8>};

ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> panels,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto p_dims = panels.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || p_dims.size() != 3 || p_dims[2] != kPanel || p_dims[1] != x_dims[1])
    return ffi::Error::InvalidArgument("panel_matmul: expected x [M, K] and panels [P, K, 16]");
  const int64_t rows = x_dims[0], k_len = x_dims[1], n_panels = p_dims[0], width = n_panels * kPanel;
  if (y_dims.size() != 2 || y_dims[0] != rows || y_dims[1] != width)
    return ffi::Error::InvalidArgument("panel_matmul: expected y [M, 16 P]");
  const float* x_data = x.typed_data();
  const float* p_data = panels.typed_data();
  float* y_data = y->typed_data();
  const int64_t blocks = (n_panels + kPanelsPerBlock - 1) / kPanelsPerBlock;
  vlm_jax_native::run_blocks(pool, blocks, [&](int64_t, int64_t block) {
    const int64_t end = std::min(n_panels, (block + 1) * kPanelsPerBlock);
    for (int64_t p = block * kPanelsPerBlock; p < end; ++p)
      // more than kMaxRows rows: passes of up to kMaxRows rows, the panel read again from cache
      for (int64_t row = 0; row < rows; row += kMaxRows) {
        const int64_t count = std::min<int64_t>(kMaxRows, rows - row);
        kRowsFns[count - 1](x_data + row * k_len, k_len, p_data + p * k_len * kPanel, y_data + row * width + p * kPanel,
                            width);
      }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" int VlmJaxDecodeMatmulVectorLanes() { return vlm_jax_native::kWideLanes; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxStackedMatmul, StackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxPanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
