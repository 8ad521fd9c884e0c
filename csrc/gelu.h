// Parameters of the fused bias + tanh-GELU C++ CPU kernels (gelu.cpp binds them once as omni2sound._C.GeluParams).
#pragma once
#include <cstdint>

#include "common.h"

namespace o2s {

// x, y, dy contiguous [rows, N]; forward reads x (+ bias) and writes y; backward reads dy, x (+ bias) and writes dx
// into y and, with a bias, dbias partials [ceil(rows / bias_gelu_bias_chunk), N] fp32.
struct GeluParams {
  int64_t rows = 0, N = 0;
  const void* x = nullptr;
  const float* bias = nullptr;   // [N] fp32 or null
  void* y = nullptr;             // forward output (may alias x); backward: dx (may alias dy)
  const void* dy = nullptr;      // backward only
  float* dbias = nullptr;        // backward only, null when no bias: [ceil(rows / kBiasChunk), N] fp32 partials
  int dtype = kFloat32;
};

void validate(const GeluParams& p, bool backward);

}  // namespace o2s
