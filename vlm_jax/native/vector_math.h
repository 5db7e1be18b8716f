// Eight-lane float vectors (GCC/Clang vector extensions: AVX2 registers on x86, pairs of NEON
// registers elsewhere) and the few operations the kernels of this folder share.
#pragma once

#include <cstdint>
#include <cstring>

namespace vlm_jax_native {

constexpr int kLanes = 8;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// every lane x (one broadcast; `vec{} + x` costs an add first, since 0 + x is not x for x = -0)
inline vec splat(float x) { return vec{x, x, x, x, x, x, x, x}; }
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

}  // namespace vlm_jax_native
