// Parameters of the varlen flash cross-attention forward on the GPU (cross_attention.cpp binds them once as
// omni2sound._C.CrossAttnParams and checks them; cross_attention.cu launches the kernel).
#pragma once
#include <cstdint>

#include "common.h"

namespace o2s {

// q [B, Lq, H, D] strided (head dim contiguous); k, v [Nk, H, D] strided (head dim contiguous); cu [B + 1] int32 in
// device memory (the host cannot read it without a sync: the kernel clamps every offset to [0, Nk], so a bad one
// gives wrong numbers, never an access outside k and v); out [B, Lq, H, D] contiguous; lse [B, H, Lq] fp32.
struct CrossAttnParams {
  int64_t B = 0, Lq = 0, H = 0, D = 0;
  int64_t Nk = 0;                      // rows of k and v
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const int32_t* cu = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int64_t sq_b = 0, sq_l = 0, sq_h = 0, sk_n = 0, sk_h = 0, sv_n = 0, sv_h = 0;
  float scale = 1.0f;
  int dtype = kFloat32;
};

void validate(const CrossAttnParams& p);

}  // namespace o2s
