// XLA FFI custom call: the forward of the blocked attention (vlm_jax/nn/attention.py,
// _blocked_attention_forward) on CPU, fused: scores, mask, softmax, log-sum-exp and weighted sum of
// a few query rows at a time, in L1 (built and loaded by vlm_jax/nn/cpu_attention.py, with
// vlm_jax/native/build.py).
//
// XLA CPU runs the blocked attention as separate products and fusions: a [G*128, E] x [E, s] score
// product per query block, its softmax, and a second product, with the scores written out and read
// back between them; its per-block products reach about 27 GFLOP/s per thread. Here a tile of
// kTileRows query rows computes its scores against every key it sees with a kTileRows x 16 register
// tile, then the softmax on those rows (still in L1), then the weighted sum with a kTileRows x 16
// tile; nothing but the output and the log-sum-exp is written to memory.
//
// VlmJaxBlockedAttention, on the projections' own layout (no transposes around the call):
// Inputs:  q [..., T, K, G, E], k [..., T, K, E], v [..., T, K, E] (float32; the leading axes, N
//          sequences in all, the same for the three; G query heads share kv head K), bias
//          [..., 1, T, T] (float32; Nb leading entries with N a multiple of Nb, sequence n reading
//          entry n / (N / Nb); or no elements: no mask). E a multiple of 8.
// Attributes: scale (float), block (int64).
// Outputs: out [..., T, K, G, E], lse [..., K, G, T] (float32).
// Query t sees the keys s < min(T, (t / block + 1) * block), each with the score
// scale * q_t . k_s + bias[t, s]: the causal blocks of the XLA path when block < T (the bias does
// the masking inside a block), every key when block >= T. out_t = softmax(scores) . v and
// lse_t = log sum_s exp(score_s), as the XLA path computes them (to float32 rounding).
// Work is shared among XLA's intra-op threads in units of (sequence, kv head, chunk of at most
// kChunkRows query rows within one block), the units with the most keys first.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "thread_blocks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using vlm_jax_native::kLanes;
using vlm_jax_native::load;
using vlm_jax_native::splat;
using vlm_jax_native::store;
using vlm_jax_native::sum_lanes;
using vlm_jax_native::vec;
using vlm_jax_native::vexp;

constexpr int kTileRows = 6;        // query rows per tile: 6 x 2 vector accumulators + 3 registers of 16
constexpr int64_t kKeyTile = 16;    // keys per score tile (two vectors); the packed keys are padded to it
constexpr int64_t kChunkRows = 128;  // query rows per unit of work

// scores[m, s] = scale * q[m] . keys[s] for the M rows at q (row stride q_stride) and the first
// `width` keys (a multiple of kKeyTile) of kt [e_len, stride] (the keys transposed); scores row
// stride `width`.
template <int M>
void score_tile(const float* q, int64_t q_stride, int64_t e_len, const float* kt, int64_t stride, int64_t width,
                float scale, float* scores) {
  for (int64_t s0 = 0; s0 < width; s0 += kKeyTile) {
    vec acc[M][2] = {};
    for (int64_t e = 0; e < e_len; ++e) {
      const float* w = kt + e * stride + s0;
      const vec w0 = load(w), w1 = load(w + kLanes);
      for (int m = 0; m < M; ++m) {
        const vec x = splat(q[m * q_stride + e]);
        acc[m][0] += x * w0;
        acc[m][1] += x * w1;
      }
    }
    for (int m = 0; m < M; ++m) {
      store(scores + m * width + s0, acc[m][0] * scale);
      store(scores + m * width + s0 + kLanes, acc[m][1] * scale);
    }
  }
}

// out[m, :] = row_scale[m] sum_{s < kend} probs[m, s] v[s, :] for M rows: probs row stride kpad,
// v rows of e_len values (a multiple of kLanes) at stride v_stride, out rows at stride out_stride.
template <int M>
void weighted_sum_tile(const float* probs, int64_t kpad, int64_t kend, const float* v, int64_t v_stride,
                       int64_t e_len, const float* row_scale, float* out, int64_t out_stride) {
  int64_t e0 = 0;
  for (; e0 + 2 * kLanes <= e_len; e0 += 2 * kLanes) {
    vec acc[M][2] = {};
    for (int64_t s = 0; s < kend; ++s) {
      const vec v0 = load(v + s * v_stride + e0), v1 = load(v + s * v_stride + e0 + kLanes);
      for (int m = 0; m < M; ++m) {
        const vec p = splat(probs[m * kpad + s]);
        acc[m][0] += p * v0;
        acc[m][1] += p * v1;
      }
    }
    for (int m = 0; m < M; ++m) {
      store(out + m * out_stride + e0, acc[m][0] * row_scale[m]);
      store(out + m * out_stride + e0 + kLanes, acc[m][1] * row_scale[m]);
    }
  }
  if (e0 < e_len) {  // a last single vector (E = 8 mod 16)
    vec acc[M] = {};
    for (int64_t s = 0; s < kend; ++s) {
      const vec v0 = load(v + s * v_stride + e0);
      for (int m = 0; m < M; ++m) acc[m] += splat(probs[m * kpad + s]) * v0;
    }
    for (int m = 0; m < M; ++m) store(out + m * out_stride + e0, acc[m] * row_scale[m]);
  }
}

using ScoreFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float, float*);
using SumFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t);
constexpr ScoreFn kScoreFns[kTileRows] = {score_tile<1>, score_tile<2>, score_tile<3>,
                                          score_tile<4>, score_tile<5>, score_tile<6>};
constexpr SumFn kSumFns[kTileRows] = {weighted_sum_tile<1>, weighted_sum_tile<2>, weighted_sum_tile<3>,
                                      weighted_sum_tile<4>, weighted_sum_tile<5>, weighted_sum_tile<6>};

// One row of scores [kpad] in place: the bias row added to the first kend, the rest masked out,
// then exp(score - max): the softmax's unnormalised probabilities. Returns their sum; *lse gets
// the log-sum-exp. The weighted sum divides by the sum afterwards (one multiply per output
// instead of a division per probability).
float softmax_row(float* row, const float* bias_row, int64_t kend, int64_t kpad, float* lse) {
  const vec lowest = splat(-std::numeric_limits<float>::infinity());
  vec top_lanes = lowest;
  for (int64_t s = 0; s < kpad; s += kLanes) {
    vec x = load(row + s);
    if (s + kLanes <= kend) {
      if (bias_row != nullptr) x += load(bias_row + s);
    } else {  // the last vector: keys past kend (padding) are masked out
      for (int i = 0; i < kLanes; ++i) x[i] = s + i < kend ? x[i] + (bias_row != nullptr ? bias_row[s + i] : 0.0f)
                                                           : -std::numeric_limits<float>::infinity();
    }
    store(row + s, x);
    top_lanes = x > top_lanes ? x : top_lanes;
  }
  float top = top_lanes[0];
  for (int i = 1; i < kLanes; ++i) top = std::max(top, top_lanes[i]);
  vec total_lanes = {};
  const vec shift = splat(top);
  for (int64_t s = 0; s < kpad; s += kLanes) {
    const vec e = vexp(load(row + s) - shift);
    store(row + s, e);
    total_lanes += e;
  }
  const float total = sum_lanes(total_lanes);
  *lse = top + std::log(total);
  return total;
}

// the product of dims[begin, end)
int64_t product(ffi::Span<const int64_t> dims, size_t begin, size_t end) {
  int64_t result = 1;
  for (size_t i = begin; i < end; ++i) result *= dims[i];
  return result;
}

// Masked entries of an additive mask: the float32 minimum (mask_to_bias) or -inf; a score plus one
// of them is at most kMaskedScore.
constexpr float kMaskedScore = -0.5f * std::numeric_limits<float>::max();

// The number of leading keys of [0, keys) to compute for the `rows` bias rows at bias (row stride
// t_len): keys from there on are masked in every row. `keys` without a bias.
int64_t masked_tail(const float* bias, int rows, int64_t t_len, int64_t keys) {
  if (bias == nullptr) return keys;
  for (; keys > 0; --keys)
    for (int m = 0; m < rows; ++m)
      if (bias[m * t_len + keys - 1] > -std::numeric_limits<float>::max()) return keys;
  return 0;
}

struct Chunk {
  int64_t start, end, keys;  // query rows [start, end), which see keys [0, keys)
};

ffi::Error BlockedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, float scale, int64_t block,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const size_t rank = qd.size();
  if (rank < 5 || kd.size() != rank - 1 || v.dimensions().size() != rank - 1)
    return ffi::Error::InvalidArgument("blocked_attention: expected q [..., T, K, G, E] and k, v [..., T, K, E]");
  const int64_t t_len = qd[rank - 4], kv = qd[rank - 3], groups = qd[rank - 2], e_len = qd[rank - 1];
  const int64_t n_seq = product(qd, 0, rank - 4);
  for (size_t i = 0; i < rank - 1; ++i) {
    const int64_t expected = i < rank - 2 ? qd[i] : qd[i + 1];  // k drops q's G axis
    if (kd[i] != expected || v.dimensions()[i] != expected)
      return ffi::Error::InvalidArgument("blocked_attention: k and v must be [..., T, K, E] for q [..., T, K, G, E]");
  }
  if (e_len % kLanes != 0) return ffi::Error::InvalidArgument("blocked_attention: the head size must be a multiple of 8");
  if (block < 1) return ffi::Error::InvalidArgument("blocked_attention: block must be positive");
  const bool has_bias = bias.element_count() > 0;
  int64_t n_bias = 0;
  if (has_bias) {
    const auto bd = bias.dimensions();
    if (bd.size() < 4 || bd[bd.size() - 3] != 1 || bd[bd.size() - 2] != t_len || bd[bd.size() - 1] != t_len)
      return ffi::Error::InvalidArgument("blocked_attention: expected bias [..., 1, T, T]");
    n_bias = product(bd, 0, bd.size() - 3);
    if (n_bias < 1 || n_seq % n_bias != 0)
      return ffi::Error::InvalidArgument("blocked_attention: the bias's leading entries must divide the sequences");
  }

  std::vector<Chunk> chunks;  // the query rows of one (sequence, kv head), most keys first
  for (int64_t start = 0; start < t_len; start += block) {
    const int64_t end = std::min(t_len, start + block);
    for (int64_t c = start; c < end; c += kChunkRows) chunks.push_back({c, std::min(end, c + kChunkRows), end});
  }
  std::reverse(chunks.begin(), chunks.end());
  const int64_t heads = n_seq * kv, units = heads * static_cast<int64_t>(chunks.size());
  const int64_t kpad = (t_len + kKeyTile - 1) / kKeyTile * kKeyTile;

  const float* q_data = q.typed_data();
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  const float* bias_data = has_bias ? bias.typed_data() : nullptr;
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();

  // Strides of a token (one row of a head) in q and out, and in k and v.
  const int64_t q_stride = kv * groups * e_len, k_stride = kv * e_len;
  // head = sequence * kv + kv head: where its first token's row starts in q (group 0) and k
  const auto q_head = [&](int64_t head) { return ((head / kv) * t_len * kv + head % kv) * groups * e_len; };
  const auto k_head = [&](int64_t head) { return ((head / kv) * t_len * kv + head % kv) * e_len; };

  // Every head's keys transposed, [heads, E, kpad] (the keys past T zeros), and its values
  // gathered, [heads, T, E], once for all its chunks. Read in place, a head's values lie a
  // token's stride apart (2 KB for 8 heads of 64), which maps them onto a few L1 sets: the
  // weighted sums ran ~10% slower than on a copy.
  std::unique_ptr<float[]> keys_t(new float[heads * e_len * kpad]), values_c(new float[heads * t_len * e_len]);
  vlm_jax_native::run_blocks(pool, heads, [&](int64_t, int64_t head) {
    const float* keys = k_data + k_head(head);
    const float* values = v_data + k_head(head);
    float* kt = keys_t.get() + head * e_len * kpad;
    float* vc = values_c.get() + head * t_len * e_len;
    for (int64_t s = 0; s < t_len; ++s) {
      for (int64_t e = 0; e < e_len; ++e) kt[e * kpad + s] = keys[s * k_stride + e];
      std::memcpy(vc + s * e_len, values + s * k_stride, e_len * sizeof(float));
    }
    for (int64_t e = 0; e < e_len; ++e) std::fill(kt + e * kpad + t_len, kt + (e + 1) * kpad, 0.0f);
  });

  // per worker: one tile's scores [kTileRows, kpad]
  std::vector<std::vector<float>> scratch(vlm_jax_native::slots_for(pool, units),
                                          std::vector<float>(kTileRows * kpad));
  vlm_jax_native::run_blocks(pool, units, [&](int64_t slot, int64_t unit) {
    const Chunk& chunk = chunks[unit / heads];
    const int64_t head = unit % heads;
    const float* kt = keys_t.get() + head * e_len * kpad;
    const float* values = values_c.get() + head * t_len * e_len;
    const float* bias_rows = has_bias ? bias_data + (head / kv) / (n_seq / n_bias) * t_len * t_len : nullptr;
    float* scores = scratch[slot].data();
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first_row = q_head(head) + g * e_len;  // token 0 of query head (kv head, g)
      float* lse_rows = lse_data + (head * groups + g) * t_len;
      for (int64_t t = chunk.start; t < chunk.end; t += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, chunk.end - t));
        const float* tile_bias = has_bias ? bias_rows + t * t_len : nullptr;
        // Keys that the bias masks for every row of the tile (the causal block's keys after the
        // tile) add exactly nothing once a row has a visible key, so they are skipped; a row
        // that sees no key at all (left padding) averages every key, so its tile keeps them.
        const int64_t visible = masked_tail(tile_bias, rows, t_len, chunk.keys);
        for (int64_t keys : {visible, chunk.keys}) {
          if (keys == 0) continue;
          const int64_t width = (keys + kKeyTile - 1) / kKeyTile * kKeyTile;
          kScoreFns[rows - 1](q_data + first_row + t * q_stride, q_stride, e_len, kt, kpad, width, scale, scores);
          float inverse_total[kTileRows];
          bool sees_no_key = false;
          for (int m = 0; m < rows; ++m) {
            inverse_total[m] = 1.0f / softmax_row(scores + m * width, tile_bias ? tile_bias + m * t_len : nullptr,
                                                  keys, width, lse_rows + t + m);
            sees_no_key |= lse_rows[t + m] <= kMaskedScore;
          }
          if (sees_no_key && keys < chunk.keys) continue;  // again with every key
          kSumFns[rows - 1](scores, width, keys, values, e_len, e_len, inverse_total,
                            out_data + first_row + t * q_stride, q_stride);
          break;
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxBlockedAttention, BlockedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
