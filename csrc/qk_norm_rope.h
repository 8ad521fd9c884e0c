// Parameters of the fused q/k RMSNorm + RoPE C++ CPU kernels (qk_norm_rope.cpp binds them once as
// omni2sound._C.QKParams).
#pragma once
#include <cstdint>

#include "common.h"

namespace o2s {

// x [B, T, G, H, Dh] strided (unit last stride); y (forward) or dx (backward) and dy contiguous; w [G, Dh] fp32;
// cs [T, Dh / 2, 2] fp32 or null.
struct QKParams {
  int64_t B = 0, T = 0, G = 2, H = 0, Dh = 0;
  int64_t sb = 0, st = 0, sj = 0, sh = 0;   // x strides in elements
  const void* x = nullptr;
  const float* w = nullptr;                 // [G, Dh]
  const float* cs = nullptr;                // [T, Dh / 2, 2]: (cos, sin); null: no rotation
  void* y = nullptr;                        // forward output, or backward dx
  const void* dy = nullptr;                 // backward only
  float* dw_tok = nullptr;                  // backward only: [B * T, G, Dh] fp32 partials
  float eps = 1e-6f;
  int dtype = kFloat32;
};

void validate(const QKParams& p, bool backward);

}  // namespace o2s
