// An XLA FFI custom call for the attention of one new token over a key/value cache (a decode step;
// built and loaded by vlm_jax/nn/decode_attention.py, with vlm_jax/native/build.py):
//
// VlmJaxDecodeAttention: out = softmax(scale q k^T + bias) v over the first `length` cache slots.
// Inputs:  q [R, G, E] (float32): R = B x K rows (sequence b's kv head j is row b K + j), each with
//          its G query heads; k, v [R, S, E] (float32): the cache in the layout of
//          text_decoder.init_cache; bias [B, S] (float32): 0 where a slot may be attended, the
//          float32 minimum elsewhere; length [] (int32): how many slots to read (1 <= length <= S).
// Outputs: out [R, G, E] (float32).
//
// Why a kernel: XLA reads every slot of the cache, filled or not, and runs the scores, the softmax
// and the weighted sum of the values as separate ops. Here each row reads its keys once and its
// values once, only up to `length` (the slots after it hold no token yet; their bias is the
// minimum, so they would add exact zeros), with the G x length scores in L1 in between. The
// softmax is computed as XLA's: scores in float32, minus their maximum, exponentiated, divided by
// their sum. Rows are shared among the threads of XLA's intra-op pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "thread_blocks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline float sum_lanes(vec v) {
  float total = 0;
  for (int i = 0; i < kLanes; ++i) total += v[i];
  return total;
}

// q . k for head width e (whole vectors, then the rest one at a time)
inline float dot(const float* q, const float* k, int64_t e) {
  vec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= e; i += kLanes) acc += load(q + i) * load(k + i);
  float total = sum_lanes(acc);
  for (; i < e; ++i) total += q[i] * k[i];
  return total;
}

// out[g] += p * row for head width e
inline void add_scaled(float* out, const float* row, float p, int64_t e) {
  int64_t i = 0;
  const vec pv = vec{} + p;
  for (; i + kLanes <= e; i += kLanes) store(out + i, load(out + i) + pv * load(row + i));
  for (; i < e; ++i) out[i] += p * row[i];
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> length,
                               float scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto q_dims = q.dimensions();
  const auto k_dims = k.dimensions();
  const auto b_dims = bias.dimensions();
  const auto v_dims = v.dimensions();
  if (q_dims.size() != 3 || k_dims.size() != 3 || v_dims.size() != 3 || k_dims[0] != q_dims[0] ||
      k_dims[2] != q_dims[2] || v_dims[0] != k_dims[0] || v_dims[1] != k_dims[1] || v_dims[2] != k_dims[2])
    return ffi::Error::InvalidArgument("decode_attention: expected q [R, G, E] and k, v [R, S, E]");
  const int64_t rows = q_dims[0], groups = q_dims[1], width = q_dims[2], slots = k_dims[1];
  if (b_dims.size() != 2 || b_dims[1] != slots || b_dims[0] <= 0 || rows % b_dims[0] != 0)
    return ffi::Error::InvalidArgument("decode_attention: expected bias [B, S] with R a multiple of B");
  const int64_t kv_heads = rows / b_dims[0];
  const int64_t n = *length.typed_data();
  if (n < 1 || n > slots) return ffi::Error::InvalidArgument("decode_attention: length outside [1, S]");
  const float* q_data = q.typed_data();
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  const float* bias_data = bias.typed_data();
  float* out_data = out->typed_data();

  vlm_jax_native::run_blocks(pool, rows, [&](int64_t, int64_t row) {
    std::vector<float> scores(groups * n);
    const float* keys = k_data + row * slots * width;
    const float* values = v_data + row * slots * width;
    const float* row_bias = bias_data + (row / kv_heads) * slots;
    // scores, one key at a time for all the row's query heads (each key read once)
    for (int64_t s = 0; s < n; ++s)
      for (int64_t g = 0; g < groups; ++g)
        scores[g * n + s] = dot(q_data + (row * groups + g) * width, keys + s * width, width) * scale + row_bias[s];
    for (int64_t g = 0; g < groups; ++g) {  // the probabilities, in place
      float* head = scores.data() + g * n;
      const float top = *std::max_element(head, head + n);
      float total = 0;
      for (int64_t s = 0; s < n; ++s) total += head[s] = std::exp(head[s] - top);
      for (int64_t s = 0; s < n; ++s) head[s] /= total;
    }
    float* row_out = out_data + row * groups * width;
    std::memset(row_out, 0, groups * width * sizeof(float));
    for (int64_t s = 0; s < n; ++s)  // each value read once, for all the row's query heads
      for (int64_t g = 0; g < groups; ++g) add_scaled(row_out + g * width, values + s * width, scores[g * n + s], width);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
