// XLA FFI custom calls: the blocked attention (vlm_jax/nn/attention.py, _blocked_attention) on CPU,
// forward and backward, each fused over a few query rows at a time (built and loaded by
// vlm_jax/nn/cpu_attention.py, with vlm_jax/native/build.py).
//
// XLA CPU runs the blocked attention as separate products and fusions: a [G*128, E] x [E, s] score
// product per query block, its softmax, and a second product, with the scores written out and read
// back between them; its per-block products reach about 27 GFLOP/s per thread (AVX2). Here a tile
// of kTileRows query rows computes its scores against every key it sees with a register tile of
// kTileRows x 2 vectors (16 keys with AVX2, 32 with AVX-512), then the softmax on those rows (still
// in L1), then the weighted sum with a tile of the same shape over the values; nothing but the
// output and the log-sum-exp is written to memory. The backward does the
// same per tile for its five products, accumulating each head's key and value gradients in L2.
//
// Both take the projections' own layout (no transposes around the calls): q [..., T, K, G, E],
// k and v [..., T, K, E] (float32; the leading axes, N sequences in all, the same for all; G query
// heads share kv head K), bias [..., 1, T, T] (float32; Nb leading entries with N a multiple of
// Nb, sequence n reading entry n / (N / Nb); or no elements: no mask). E a multiple of 8.
// Attributes: scale (float), block (int64).
// Query t sees the keys s < min(T, (t / block + 1) * block), each with the score
// scale * q_t . k_s + bias[t, s]: the causal blocks of the XLA path when block < T (the bias does
// the masking inside a block), every key when block >= T.
//
// VlmJaxBlockedAttention: outputs out [..., T, K, G, E] = softmax(scores) . v and
// lse [..., K, G, T] = log sum_s exp(score_s), as the XLA path computes them (to float32 rounding).
// Work is shared among XLA's intra-op threads in units of (sequence, kv head, chunk of at most
// kChunkRows query rows within one block), the units with the most keys first.
//
// VlmJaxBlockedAttentionBackward: inputs q, k, v, bias, then out, lse and d_out (out's cotangent,
// [..., T, K, G, E]); outputs d_q [..., T, K, G, E], d_k and d_v [..., T, K, E]: the gradients of
// _blocked_attention_backward, with P = exp(score - lse), dV = P^T dO, dS = P (dO V^T - D) scale
// (D_t = dO_t . O_t), dQ = dS K, dK = dS^T Q. One unit of work per (sequence, kv head), which owns
// that head's dK and dV.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "thread_blocks.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using vlm_jax_native::load;
using vlm_jax_native::splat;
using vlm_jax_native::store;
using vlm_jax_native::sum_lanes;
using vlm_jax_native::vec_of;
using vlm_jax_native::vexp;

// The kernels' vectors: the widest the machine has (16 lanes with AVX-512, else 8). Head sizes
// need only be a multiple of 8: a last eight-lane vector takes the rest.
constexpr int kW = vlm_jax_native::kWideLanes;
using wvec = vec_of<kW>;

// query rows per tile: with 16 registers (AVX2), 6 x 2 vector accumulators + 3; with 32 (AVX-512),
// 12 x 2 + 3, which halves the key loads per multiply-add (measured: 6 rows 1.42x / 1.38x the AVX2
// kernel's forward / backward, 8 rows 1.46x / 1.50x, 12 rows 1.48x / 1.56x)
constexpr int kTileRows = kW == 16 ? 12 : 6;
constexpr int64_t kKeyTile = 2 * kW;   // keys per score tile (two vectors); the packed keys are padded to it
constexpr int64_t kChunkRows = 128;   // query rows per unit of work

// scores[m, s] = scale * q[m] . keys[s] for the M rows at q (row stride q_stride) and the first
// `width` keys (a multiple of kKeyTile) of kt [e_len, stride] (the keys transposed); scores row
// stride `width`.
template <int M>
void score_tile(const float* q, int64_t q_stride, int64_t e_len, const float* kt, int64_t stride, int64_t width,
                float scale, float* scores) {
  for (int64_t s0 = 0; s0 < width; s0 += kKeyTile) {
    wvec acc[M][2] = {};
    for (int64_t e = 0; e < e_len; ++e) {
      const float* w = kt + e * stride + s0;
      const wvec w0 = load<kW>(w), w1 = load<kW>(w + kW);
      for (int m = 0; m < M; ++m) {
        const wvec x = splat<kW>(q[m * q_stride + e]);
        acc[m][0] += x * w0;
        acc[m][1] += x * w1;
      }
    }
    for (int m = 0; m < M; ++m) {
      store(scores + m * width + s0, acc[m][0] * scale);
      store(scores + m * width + s0 + kW, acc[m][1] * scale);
    }
  }
}

// Calls fn(lanes, vectors, e0) for the chunks that cover a head's e_len values (a multiple of 8),
// lanes and vectors as std::integral_constant: pairs of widest vectors, then one, then (16-lane
// vectors, E = 8 mod 16) a last eight values.
template <class Fn>
inline void over_head_values(int64_t e_len, Fn fn) {
  using wide = std::integral_constant<int, kW>;
  using eight = std::integral_constant<int, 8>;
  using one = std::integral_constant<int, 1>;
  int64_t e0 = 0;
  for (; e0 + 2 * kW <= e_len; e0 += 2 * kW) fn(wide(), std::integral_constant<int, 2>(), e0);
  if (e0 + kW <= e_len) {
    fn(wide(), one(), e0);
    e0 += kW;
  }
  if (e0 < e_len) fn(eight(), one(), e0);
}

// out[m, 0:V*N] = row_scale[m] sum_{s < kend} probs[m, s] v[s, 0:V*N] for M rows, with V vectors
// of N lanes per row: probs row stride kpad, v rows at stride v_stride, out rows at stride out_stride.
template <int M, int N, int V>
void weighted_sum_columns(const float* probs, int64_t kpad, int64_t kend, const float* v, int64_t v_stride,
                          const float* row_scale, float* out, int64_t out_stride) {
  vec_of<N> acc[M][V] = {};
  for (int64_t s = 0; s < kend; ++s) {
    vec_of<N> x[V];
    for (int j = 0; j < V; ++j) x[j] = load<N>(v + s * v_stride + j * N);
    for (int m = 0; m < M; ++m) {
      const vec_of<N> p = splat<N>(probs[m * kpad + s]);
      for (int j = 0; j < V; ++j) acc[m][j] += p * x[j];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < V; ++j) store(out + m * out_stride + j * N, acc[m][j] * row_scale[m]);
}

// out[m, :] = row_scale[m] sum_{s < kend} probs[m, s] v[s, :] for M rows: probs row stride kpad,
// v rows of e_len values (a multiple of 8) at stride v_stride, out rows at stride out_stride.
template <int M>
void weighted_sum_tile(const float* probs, int64_t kpad, int64_t kend, const float* v, int64_t v_stride,
                       int64_t e_len, const float* row_scale, float* out, int64_t out_stride) {
  over_head_values(e_len, [&](auto lanes, auto vectors, int64_t e0) {
    weighted_sum_columns<M, decltype(lanes)::value, decltype(vectors)::value>(probs, kpad, kend, v + e0, v_stride,
                                                                              row_scale, out + e0, out_stride);
  });
}

using ScoreFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float, float*);
using SumFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t);
// the tile functions for 1 .. kTileRows rows, indexed by rows - 1
template <std::size_t... I>
constexpr std::array<ScoreFn, kTileRows> score_fns(std::index_sequence<I...>) {
  return {score_tile<I + 1>...};
}
template <std::size_t... I>
constexpr std::array<SumFn, kTileRows> sum_fns(std::index_sequence<I...>) {
  return {weighted_sum_tile<I + 1>...};
}
constexpr auto kScoreFns = score_fns(std::make_index_sequence<kTileRows>());
constexpr auto kSumFns = sum_fns(std::make_index_sequence<kTileRows>());

// The keys (s .. s + kW - 1) of a row of scores with the row's bias added (bias_row may be null),
// and -inf for keys from kend on (the padding of the last vector).
inline wvec masked_scores(const float* row, const float* bias_row, int64_t s, int64_t kend) {
  wvec x = load<kW>(row + s);
  if (s + kW <= kend) return bias_row != nullptr ? x + load<kW>(bias_row + s) : x;
  for (int i = 0; i < kW; ++i)
    x[i] = s + i < kend ? x[i] + (bias_row != nullptr ? bias_row[s + i] : 0.0f) : -std::numeric_limits<float>::infinity();
  return x;
}

// keys rounded up to whole score tiles
inline int64_t tile_width(int64_t keys) { return (keys + kKeyTile - 1) / kKeyTile * kKeyTile; }

// One row of scores [kpad] in place: the bias row added to the first kend, the rest masked out,
// then exp(score - max): the softmax's unnormalised probabilities. Returns their sum; *lse gets
// the log-sum-exp. The weighted sum divides by the sum afterwards (one multiply per output
// instead of a division per probability).
float softmax_row(float* row, const float* bias_row, int64_t kend, int64_t kpad, float* lse) {
  wvec top_lanes = splat<kW>(-std::numeric_limits<float>::infinity());
  // the whole vectors of visible keys without masked_scores' branch: it made GCC spill top_lanes
  // in every iteration (forward 2-3% faster)
  const int64_t whole = kend / kW * kW;
  int64_t s = 0;
  if (bias_row != nullptr) {
    for (; s < whole; s += kW) {
      const wvec x = load<kW>(row + s) + load<kW>(bias_row + s);
      store(row + s, x);
      top_lanes = x > top_lanes ? x : top_lanes;
    }
  } else {
    for (; s < whole; s += kW) {
      const wvec x = load<kW>(row + s);
      top_lanes = x > top_lanes ? x : top_lanes;
    }
  }
  for (; s < kpad; s += kW) {  // the last keys and the padding
    const wvec x = masked_scores(row, bias_row, s, kend);
    store(row + s, x);
    top_lanes = x > top_lanes ? x : top_lanes;
  }
  float top = top_lanes[0];
  for (int i = 1; i < kW; ++i) top = std::max(top, top_lanes[i]);
  wvec total_lanes = {};
  const wvec shift = splat<kW>(top);
  for (int64_t s = 0; s < kpad; s += kW) {
    const wvec e = vexp(load<kW>(row + s) - shift);
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

// The query rows of one (sequence, kv head) in chunks of at most kChunkRows within a block, most keys first.
std::vector<Chunk> make_chunks(int64_t t_len, int64_t block) {
  std::vector<Chunk> chunks;
  for (int64_t start = 0; start < t_len; start += block) {
    const int64_t end = std::min(t_len, start + block);
    for (int64_t c = start; c < end; c += kChunkRows) chunks.push_back({c, std::min(end, c + kChunkRows), end});
  }
  std::reverse(chunks.begin(), chunks.end());
  return chunks;
}

// The shapes of a call and where each head's rows lie. head = sequence * kv + kv head.
struct Layout {
  int64_t n_seq = 0, t_len = 0, kv = 0, groups = 0, e_len = 0, n_bias = 0;
  bool has_bias = false;
  int64_t heads() const { return n_seq * kv; }
  int64_t q_stride() const { return kv * groups * e_len; }  // a token's stride in q, out, d_out, d_q
  int64_t k_stride() const { return kv * e_len; }           // in k, v, d_k, d_v
  int64_t kpad() const { return tile_width(t_len); }
  // offsets of a head's token 0 (query group 0) in q and k
  int64_t q_head(int64_t head) const { return ((head / kv) * t_len * kv + head % kv) * groups * e_len; }
  int64_t k_head(int64_t head) const { return ((head / kv) * t_len * kv + head % kv) * e_len; }
  // a head's mask [T, T], or nullptr
  const float* bias_rows(const float* bias, int64_t head) const {
    return has_bias ? bias + (head / kv) / (n_seq / n_bias) * t_len * t_len : nullptr;
  }
};

ffi::Error read_layout(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd, ffi::Span<const int64_t> vd,
                       ffi::Span<const int64_t> bd, bool has_bias, int64_t block, Layout* layout) {
  const size_t rank = qd.size();
  if (rank < 5 || kd.size() != rank - 1 || vd.size() != rank - 1)
    return ffi::Error::InvalidArgument("blocked_attention: expected q [..., T, K, G, E] and k, v [..., T, K, E]");
  Layout& l = *layout;
  l.t_len = qd[rank - 4], l.kv = qd[rank - 3], l.groups = qd[rank - 2], l.e_len = qd[rank - 1];
  l.n_seq = product(qd, 0, rank - 4);
  for (size_t i = 0; i < rank - 1; ++i) {
    const int64_t expected = i < rank - 2 ? qd[i] : qd[i + 1];  // k drops q's G axis
    if (kd[i] != expected || vd[i] != expected)
      return ffi::Error::InvalidArgument("blocked_attention: k and v must be [..., T, K, E] for q [..., T, K, G, E]");
  }
  if (l.e_len % 8 != 0) return ffi::Error::InvalidArgument("blocked_attention: the head size must be a multiple of 8");
  if (block < 1) return ffi::Error::InvalidArgument("blocked_attention: block must be positive");
  l.has_bias = has_bias;
  if (has_bias) {
    if (bd.size() < 4 || bd[bd.size() - 3] != 1 || bd[bd.size() - 2] != l.t_len || bd[bd.size() - 1] != l.t_len)
      return ffi::Error::InvalidArgument("blocked_attention: expected bias [..., 1, T, T]");
    l.n_bias = product(bd, 0, bd.size() - 3);
    if (l.n_bias < 1 || l.n_seq % l.n_bias != 0)
      return ffi::Error::InvalidArgument("blocked_attention: the bias's leading entries must divide the sequences");
  }
  return ffi::Error::Success();
}

// A head's keys (or values), rows [T, E] at `stride`, transposed into kt [E, kpad] (the tokens
// past T zeros).
void transpose_head(const float* rows, int64_t stride, const Layout& l, float* kt) {
  const int64_t kpad = l.kpad();
  for (int64_t s = 0; s < l.t_len; ++s)
    for (int64_t e = 0; e < l.e_len; ++e) kt[e * kpad + s] = rows[s * stride + e];
  for (int64_t e = 0; e < l.e_len; ++e) std::fill(kt + e * kpad + l.t_len, kt + (e + 1) * kpad, 0.0f);
}

// A head's rows [T, E] at `stride` gathered into dense rows [T, E]. Read in place, a head's rows
// lie a token's stride apart (2 KB for 8 heads of 64), which maps them onto a few L1 sets: the
// products over them ran ~10% slower than on a gathered copy.
void gather_head(const float* rows, int64_t stride, const Layout& l, float* dense) {
  for (int64_t s = 0; s < l.t_len; ++s) std::memcpy(dense + s * l.e_len, rows + s * stride, l.e_len * sizeof(float));
}

// dense rows [T, E] written to a head's rows at `stride` (gather_head's inverse)
void scatter_head(const float* dense, int64_t stride, const Layout& l, float* rows) {
  for (int64_t s = 0; s < l.t_len; ++s) std::memcpy(rows + s * stride, dense + s * l.e_len, l.e_len * sizeof(float));
}

ffi::Error BlockedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias, float scale, int64_t block,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  Layout l;
  const ffi::Error error = read_layout(q.dimensions(), k.dimensions(), v.dimensions(), bias.dimensions(),
                                       bias.element_count() > 0, block, &l);
  if (error.failure()) return error;
  const std::vector<Chunk> chunks = make_chunks(l.t_len, block);
  const int64_t heads = l.heads(), units = heads * static_cast<int64_t>(chunks.size());
  const int64_t kpad = l.kpad(), e_len = l.e_len, t_len = l.t_len, q_stride = l.q_stride();
  const float* q_data = q.typed_data();
  const float* bias_data = l.has_bias ? bias.typed_data() : nullptr;
  float* out_data = out->typed_data();
  float* lse_data = lse->typed_data();

  // Every head's keys transposed [E, kpad] and its values gathered [T, E], once for all its chunks.
  std::unique_ptr<float[]> keys_t(new float[heads * e_len * kpad]), values_c(new float[heads * t_len * e_len]);
  vlm_jax_native::run_blocks(pool, heads, [&](int64_t, int64_t head) {
    transpose_head(k.typed_data() + l.k_head(head), l.k_stride(), l, keys_t.get() + head * e_len * kpad);
    gather_head(v.typed_data() + l.k_head(head), l.k_stride(), l, values_c.get() + head * t_len * e_len);
  });

  // per worker: one tile's scores [kTileRows, kpad]
  std::vector<std::vector<float>> scratch(vlm_jax_native::slots_for(pool, units),
                                          std::vector<float>(kTileRows * kpad));
  vlm_jax_native::run_blocks(pool, units, [&](int64_t slot, int64_t unit) {
    const Chunk& chunk = chunks[unit / heads];
    const int64_t head = unit % heads;
    const float* kt = keys_t.get() + head * e_len * kpad;
    const float* values = values_c.get() + head * t_len * e_len;
    const float* bias_rows = l.bias_rows(bias_data, head);
    float* scores = scratch[slot].data();
    for (int64_t g = 0; g < l.groups; ++g) {
      const int64_t first_row = l.q_head(head) + g * e_len;  // token 0 of query head (kv head, g)
      float* lse_rows = lse_data + (head * l.groups + g) * t_len;
      for (int64_t t = chunk.start; t < chunk.end; t += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, chunk.end - t));
        const float* tile_bias = bias_rows ? bias_rows + t * t_len : nullptr;
        // Keys that the bias masks for every row of the tile (the causal block's keys after the
        // tile) add exactly nothing once a row has a visible key, so they are skipped; a row
        // that sees no key at all (left padding) averages every key, so its tile keeps them.
        const int64_t visible = masked_tail(tile_bias, rows, t_len, chunk.keys);
        for (int64_t keys : {visible, chunk.keys}) {
          if (keys == 0) continue;
          const int64_t width = tile_width(keys);
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

// acc[s, 0:V*N] += sum_m coef[m, s] rows[m, 0:V*N] for s < keys and the M rows at `rows` (row
// stride row_stride; coef row stride width; acc rows at stride acc_stride), V vectors of N lanes.
template <int M, int N, int V>
void rank_update_columns(const float* coef, int64_t width, int64_t keys, const float* rows, int64_t row_stride,
                         int64_t acc_stride, float* acc) {
  vec_of<N> r[M][V];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < V; ++j) r[m][j] = load<N>(rows + m * row_stride + j * N);
  for (int64_t s = 0; s < keys; ++s) {
    float* a = acc + s * acc_stride;
    vec_of<N> sums[V];
    for (int j = 0; j < V; ++j) sums[j] = load<N>(a + j * N);
    for (int m = 0; m < M; ++m) {
      const vec_of<N> c = splat<N>(coef[m * width + s]);
      for (int j = 0; j < V; ++j) sums[j] += c * r[m][j];
    }
    for (int j = 0; j < V; ++j) store(a + j * N, sums[j]);
  }
}

// acc[s, :] += sum_m coef[m, s] rows[m, :] for s < keys and the M rows at `rows` (row stride
// row_stride; coef row stride width; acc rows of e_len values, a multiple of 8).
template <int M>
void rank_update(const float* coef, int64_t width, int64_t keys, const float* rows, int64_t row_stride,
                 int64_t e_len, float* acc) {
  over_head_values(e_len, [&](auto lanes, auto vectors, int64_t e0) {
    rank_update_columns<M, decltype(lanes)::value, decltype(vectors)::value>(coef, width, keys, rows + e0, row_stride,
                                                                             e_len, acc + e0);
  });
}

using UpdateFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*);
template <std::size_t... I>
constexpr std::array<UpdateFn, kTileRows> update_fns(std::index_sequence<I...>) {
  return {rank_update<I + 1>...};
}
constexpr auto kUpdateFns = update_fns(std::make_index_sequence<kTileRows>());

ffi::Error BlockedAttentionBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                                        ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                                        ffi::Buffer<ffi::F32> d_out, float scale, int64_t block,
                                        ffi::ResultBuffer<ffi::F32> d_q, ffi::ResultBuffer<ffi::F32> d_k,
                                        ffi::ResultBuffer<ffi::F32> d_v) {
  Layout l;
  const ffi::Error error = read_layout(q.dimensions(), k.dimensions(), v.dimensions(), bias.dimensions(),
                                       bias.element_count() > 0, block, &l);
  if (error.failure()) return error;
  if (out.element_count() != q.element_count() || d_out.element_count() != q.element_count() ||
      lse.element_count() != l.heads() * l.groups * l.t_len)
    return ffi::Error::InvalidArgument("blocked_attention_backward: out and d_out must be shaped as q, lse [..., K, G, T]");
  const std::vector<Chunk> chunks = make_chunks(l.t_len, block);
  const int64_t kpad = l.kpad(), e_len = l.e_len, t_len = l.t_len, q_stride = l.q_stride();
  const int64_t head_size = t_len * e_len;
  const float* bias_data = l.has_bias ? bias.typed_data() : nullptr;
  // per worker: keys and values transposed [E, kpad] each, keys gathered [T, E], the head's key
  // and value gradients [T, E] each, a tile's probabilities and score gradients [kTileRows, kpad] each
  const int64_t slots = vlm_jax_native::slots_for(pool, l.heads());
  std::vector<std::vector<float>> scratch(slots, std::vector<float>(2 * e_len * kpad + 3 * head_size + 2 * kTileRows * kpad));
  vlm_jax_native::run_blocks(pool, l.heads(), [&](int64_t slot, int64_t head) {
    float* kt = scratch[slot].data();
    float* vt = kt + e_len * kpad;
    float* kc = vt + e_len * kpad;
    float* dk = kc + head_size;
    float* dv = dk + head_size;
    float* probs = dv + head_size;
    float* d_scores = probs + kTileRows * kpad;
    transpose_head(k.typed_data() + l.k_head(head), l.k_stride(), l, kt);
    gather_head(k.typed_data() + l.k_head(head), l.k_stride(), l, kc);
    transpose_head(v.typed_data() + l.k_head(head), l.k_stride(), l, vt);
    std::fill(dk, dk + 2 * head_size, 0.0f);
    const float* bias_rows = l.bias_rows(bias_data, head);
    for (int64_t g = 0; g < l.groups; ++g) {
      const int64_t first_row = l.q_head(head) + g * e_len;
      const float* lse_rows = lse.typed_data() + (head * l.groups + g) * t_len;
      for (const Chunk& chunk : chunks)
        for (int64_t t = chunk.start; t < chunk.end; t += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, chunk.end - t));
          const float* tile_bias = bias_rows ? bias_rows + t * t_len : nullptr;
          const float* q_tile = q.typed_data() + first_row + t * q_stride;
          const float* o_tile = out.typed_data() + first_row + t * q_stride;
          const float* do_tile = d_out.typed_data() + first_row + t * q_stride;
          // the keys the forward summed over: masked ones have probability 0 unless a row sees no key
          bool sees_no_key = false;
          for (int m = 0; m < rows; ++m) sees_no_key |= lse_rows[t + m] <= kMaskedScore;
          const int64_t visible = sees_no_key ? chunk.keys : masked_tail(tile_bias, rows, t_len, chunk.keys);
          const int64_t keys = visible > 0 ? visible : chunk.keys;  // as the forward
          const int64_t width = tile_width(keys);
          kScoreFns[rows - 1](q_tile, q_stride, e_len, kt, kpad, width, scale, probs);
          kScoreFns[rows - 1](do_tile, q_stride, e_len, vt, kpad, width, 1.0f, d_scores);  // dO V^T
          for (int m = 0; m < rows; ++m) {
            float row_term = 0;  // D_t = dO_t . O_t
            for (int64_t e = 0; e < e_len; ++e) row_term += do_tile[m * q_stride + e] * o_tile[m * q_stride + e];
            const wvec shift = splat<kW>(lse_rows[t + m]), d = splat<kW>(row_term), scale_v = splat<kW>(scale);
            float* p = probs + m * width;
            float* ds = d_scores + m * width;
            const float* b = tile_bias ? tile_bias + m * t_len : nullptr;
            for (int64_t s = 0; s < width; s += kW) {  // keys past `keys` get probability 0
              const wvec x = vexp(masked_scores(p, b, s, keys) - shift);
              store(p + s, x);
              store(ds + s, x * (load<kW>(ds + s) - d) * scale_v);
            }
          }
          float ones[kTileRows];
          std::fill(ones, ones + kTileRows, 1.0f);
          kSumFns[rows - 1](d_scores, width, keys, kc, e_len, e_len, ones, d_q->typed_data() + first_row + t * q_stride,
                            q_stride);  // dQ = dS K
          kUpdateFns[rows - 1](probs, width, keys, do_tile, q_stride, e_len, dv);    // dV += P^T dO
          kUpdateFns[rows - 1](d_scores, width, keys, q_tile, q_stride, e_len, dk);  // dK += dS^T Q
        }
    }
    scatter_head(dk, l.k_stride(), l, d_k->typed_data() + l.k_head(head));
    scatter_head(dv, l.k_stride(), l, d_v->typed_data() + l.k_head(head));
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(VlmJaxBlockedAttentionBackward, BlockedAttentionBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
