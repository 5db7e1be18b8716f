// An XLA FFI custom call for products of a few rows with a weight matrix held in column panels
// (built and loaded by vlm_jax/nn/panel_matmul.py, with vlm_jax/native/build.py):
//
// VlmJaxPanelMatmul: y = x W.
// Inputs:  x [M, K] (float32), panels [P, K, 16] (float32): W [K, N] cut into P = ceil(N / 16)
//          panels of 16 columns, panel p holding columns 16p .. 16p + 15 row after row (the columns
//          past N are zeros).
// Outputs: y [M, 16 P] (the caller drops the columns past N).
//
// Why a kernel: a decode step multiplies a few rows (the batch) with every weight matrix of the
// model, so its time is the time to read the weights. XLA CPU's products read a [K, N] matrix at
// ~29 GB/s for one row but at ~16 GB/s for four (its GEMM path packs the weights again on every
// call). Here each panel is one contiguous stream that every row's multiply-adds use while it is
// in registers: 16 columns x M rows of accumulators, and a software prefetch ahead of the stream.
// Blocks of kPanelsPerBlock panels are shared among the threads of XLA's intra-op pool.
// benchmarks/RESULTS.md has the measurements.

#include <cstdint>
#include <cstring>

#include "thread_blocks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int64_t kPanel = 16;          // columns per panel: two vectors
constexpr int64_t kPanelsPerBlock = 4;  // panels per unit of work shared among threads
constexpr int kMaxRows = 8;             // rows per pass over a panel: 16 vector accumulators
constexpr int64_t kPrefetchAhead = 512;  // floats (2 KB) ahead in the panel's stream

inline vec splat(float x) { return vec{} + x; }
inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxPanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
