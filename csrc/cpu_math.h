// Vectorisable fp32 math shared by the C++ CPU kernels (the GELU's sigmoid, the attention's softmax).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace o2s {

// exp(x) in fp32, branch-free. x is clamped to [-87, 88] (exp stays a finite normal float, which is all a
// sigmoid needs). x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts), e^r by its Taylor series to r^7 (relative
// error < 2e-9 before rounding, i.e. ~1 ulp overall), 2^n put into the exponent bits.
inline float fast_exp(float x) {
  x = x > 88.0f ? 88.0f : x;                             // comparisons, not fmin / fmax: they vectorise,
  x = x < -87.0f ? -87.0f : x;                           // and a NaN passes through to the result
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-6f;
  float p = 1.98412698412698413e-4f;                     // 1/7!
  p = p * r + 1.38888888888888889e-3f;                   // 1/6!
  p = p * r + 8.33333333333333333e-3f;                   // 1/5!
  p = p * r + 4.16666666666666667e-2f;                   // 1/4!
  p = p * r + 1.66666666666666667e-1f;                   // 1/3!
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace o2s
