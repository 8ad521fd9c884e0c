// Parameters of the Snake ops, shared by the host file (snake.cpp) and the CUDA kernels (snake.cu).
#pragma once
#include <cstdint>

#include "common.h"

namespace o2s {

struct SnakeParams {
  int64_t B = 0, C = 0, T = 0;
  const void* x = nullptr;
  const void* residual = nullptr;  // null: plain snake
  const float* alpha = nullptr;    // [C] fp32
  const float* beta = nullptr;     // [C] fp32
  void* s = nullptr;               // x + residual, written only with a residual
  void* y = nullptr;
  float eps = 1e-9f;
  int dtype = kFloat32;
  int channels_last = 0;           // 1: memory is [B, T, C] (the VAE's channels-last decode), CPU only
};

struct SnakeBwdParams {
  int64_t B = 0, C = 0, T = 0;
  const void* dy = nullptr;
  const void* ds_out = nullptr;    // gradient reaching the s output (snake_residual), may be null
  const void* s = nullptr;         // x: the Snake input is s = x (+ residual), recomputed in fp32 (not the rounded s)
  const void* residual = nullptr;  // may be null
  const float* alpha = nullptr;
  const float* beta = nullptr;
  void* ds = nullptr;
  float* dalpha_rows = nullptr;    // [B, C] fp32 partial sums, reduced over B by the caller
  float* dbeta_rows = nullptr;
  float eps = 1e-9f;
  int dtype = kFloat32;
};

// Throw std::invalid_argument (Python: ValueError) on parameters the kernels cannot index safely.
void validate(const SnakeParams& p);
void validate(const SnakeBwdParams& p);

}  // namespace o2s
