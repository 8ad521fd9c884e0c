// Parameters of the C++ CPU attention forward (attention.cpp), bound once as omni2sound._C.AttnParams.
#pragma once
#include <cstdint>

#include "common.h"

namespace o2s {

// Keys of sample b: dense (cu == null) rows j at k + b * k_sb + j * k_st (Tk of them), or packed (cu: int32
// [B + 1], host memory) rows cu[b] + j at k + (cu[b] + j) * k_st, with 0 = cu[0] <= cu[1] <= ... <= cu[B] <= Nk
// (the packed row count; rows past cu[B] belong to no sample).
struct AttnParams {
  int64_t B = 0, Tq = 0, Tk = 0, H = 0, Dh = 0;
  int64_t Nk = 0;               // packed keys only: rows of k and v
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;
  const int32_t* cu = nullptr;  // packed keys: int32 [B + 1]; null: dense, Tk per sample
  void* out = nullptr;          // contiguous [B, Tq, H, Dh]
  float* lse = nullptr;         // optional fp32 [B, H, Tq]
  float scale = 1.0f;
  int dtype = kFloat32;
};

// Throws std::invalid_argument (Python: ValueError) on parameters the kernel cannot index safely, reading the
// packed offsets (B + 1 integers).
void validate(const AttnParams& p);

}  // namespace o2s
