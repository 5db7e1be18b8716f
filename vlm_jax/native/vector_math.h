// Float vectors of N lanes (GCC/Clang vector extensions: SSE/AVX2/AVX-512 registers on x86, NEON
// registers elsewhere) and the few operations the kernels of this folder share. `vec` is the
// eight-lane vector (an AVX2 register); kWideLanes is the widest vector this machine's compiler
// targets (16 lanes with AVX-512, else 8), for the kernels whose register tiles are written for
// any width.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

namespace vlm_jax_native {

template <int N>
struct Lanes {
  typedef float f32 __attribute__((vector_size(N * sizeof(float))));
  typedef int32_t i32 __attribute__((vector_size(N * sizeof(int32_t))));
};
template <int N>
using vec_of = typename Lanes<N>::f32;

constexpr int kLanes = 8;
typedef vec_of<kLanes> vec;
typedef Lanes<kLanes>::i32 ivec;

#if defined(__AVX512F__)
constexpr int kWideLanes = 16;
#else
constexpr int kWideLanes = 8;
#endif

// the lane count of a vector type
template <class V>
constexpr int lanes_of() {
  return static_cast<int>(sizeof(V) / sizeof(float));
}

template <int N, std::size_t... I>
inline vec_of<N> splat_lanes(float x, std::index_sequence<I...>) {
  return vec_of<N>{((void)I, x)...};
}
// every lane x: one broadcast (`vec{} + x` costs an add first, since 0 + x is not x for x = -0,
// and a loop over the lanes compiles to masked inserts)
template <int N = kLanes>
inline vec_of<N> splat(float x) {
  return splat_lanes<N>(x, std::make_index_sequence<N>());
}
template <int N = kLanes>
inline vec_of<N> load(const float* p) {
  vec_of<N> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline void store(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

template <class V>
inline float sum_lanes(V v) {
  float total = 0;
  for (int i = 0; i < lanes_of<V>(); ++i) total += v[i];
  return total;
}

// the largest lane, lane 0 first (std::max keeps the earlier value when a comparison is false)
template <class V>
inline float max_lanes(V v) {
  float m = v[0];
  for (int i = 1; i < lanes_of<V>(); ++i) m = std::max(m, v[i]);
  return m;
}

// exp on every lane: 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], degree-6 polynomial
// (relative error ~1e-7); inputs below -87 give 0.
template <class V>
inline V vexp(V x) {
  constexpr int N = lanes_of<V>();
  using IV = typename Lanes<N>::i32;
  const V lo = splat<N>(-87.0f);
  V xc = x < lo ? lo : x;
  const V shifter = splat<N>(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  V n = (xc * 1.44269504088896341f + shifter) - shifter;
  V r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  V p = splat<N>(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  V result = p * scale;
  return x < lo ? splat<N>(0.0f) : result;
}

}  // namespace vlm_jax_native
