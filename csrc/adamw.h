// Parameters of the C++ CPU AdamW step on fp32 master weights (adamw.cpp binds them once as omni2sound._C.AdamWParams).
#pragma once
#include <cstdint>

#include "common.h"

namespace o2s {

// One parameter tensor, n elements, all contiguous: param / exp_avg / exp_avg_sq fp32 (updated in place), grad of
// grad_dtype (read), copy bf16 (written; null for none). lr and step are this step's values (step already counted).
struct AdamWParams {
  int64_t n = 0;
  float* param = nullptr;
  const void* grad = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  void* copy = nullptr;          // bf16 [n] or null
  int grad_dtype = kFloat32;
  float lr = 0.0f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f, step = 1.0f;
};

}  // namespace o2s
