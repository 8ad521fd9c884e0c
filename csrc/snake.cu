// CUDA kernels of the Snake ops (math in csrc/snake.cpp and omni2sound/ops/snake.py).
//
// Forward: grid (rows = B * C, blocks of T); each thread handles VEC consecutive elements of one row, so a row's
// alpha[c], beta[c] are loaded once per thread. Backward: one block per row reduces dalpha / dbeta over T
// (deterministic block reduction, no atomics) while writing ds. fp32 math; the sine's argument is reduced to
// [-pi, pi] first because --use_fast_math turns sinf into __sinf, whose error grows outside that range.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "snake.h"
#include "cuda_common.cuh"

namespace o2s {
namespace {


__device__ __forceinline__ void sincos_reduced(float x, float* s, float* c) {
  const float k = rintf(x * 0.15915494309189535f);       // x / (2 pi)
  float r = fmaf(-k, 6.28318548202514648f, x);          // 2 pi, fp32 high part
  r = fmaf(-k, -1.7484556e-07f, r);                     // 2 pi low part
  __sincosf(r, s, c);
}

constexpr int kThreads = 256;
constexpr int kVec = 4;

template <typename T>
__global__ void snake_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ alpha,
                                 const float* __restrict__ beta, T* __restrict__ s_out, T* __restrict__ y, int64_t C,
                                 int64_t L, float eps) {
  const int64_t r = blockIdx.x;
  const int64_t c = r % C;
  const float a = alpha[c], q = 1.0f / (beta[c] + eps);
  const int64_t base = r * L;
  // A block covers kThreads * kVec consecutive samples; in each of the kVec steps the warp's 32 lanes touch 32
  // consecutive samples (coalesced). The earlier mapping gave each thread kVec consecutive samples, so a warp's
  // access in one step was strided by kVec elements: four partial passes over every cache line (sm_90a, unmeasured
  // since the change; the H100 bench had this kernel at half the Triton kernel's speed).
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kThreads * kVec + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int64_t t = t0 + int64_t(i) * kThreads;
    if (t < L) {
      float v = ld1(x + base + t);
      if (res != nullptr) {
        v += ld1(res + base + t);
        s_out[base + t] = from_f32<T>(v);
      }
      float sn, cs;
      sincos_reduced(a * v, &sn, &cs);
      y[base + t] = from_f32<T>(v + q * sn * sn);
    }
  }
}

__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = (threadIdx.x < blockDim.x / 32) ? smem[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

template <typename T>
__global__ void snake_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dso, const T* __restrict__ s,
                                 const T* __restrict__ res,
                                 const float* __restrict__ alpha, const float* __restrict__ beta, T* __restrict__ ds,
                                 float* __restrict__ da_rows, float* __restrict__ db_rows, int64_t C, int64_t L,
                                 float eps) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const int64_t c = r % C;
  const float a = alpha[c], q = 1.0f / (beta[c] + eps);
  const int64_t base = r * L;
  float da = 0.f, db = 0.f;
  for (int64_t t = threadIdx.x; t < L; t += blockDim.x) {
    const float v = ld1(s + base + t) + (res != nullptr ? ld1(res + base + t) : 0.f), g = ld1(dy + base + t);
    float sn, cs;
    sincos_reduced(a * v, &sn, &cs);
    const float sin2 = 2.0f * sn * cs;
    float d = g * (1.0f + q * a * sin2);
    if (dso != nullptr) d += ld1(dso + base + t);
    ds[base + t] = from_f32<T>(d);
    da += g * v * sin2;
    db += g * sn * sn;
  }
  da = block_sum(da, smem);
  db = block_sum(db, smem);
  if (threadIdx.x == 0) {
    da_rows[r] = q * da;
    db_rows[r] = -q * q * db;
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("omni2sound._C ") + what + ": " + cudaGetErrorString(err));
}

template <typename T>
void fwd_dtype(const SnakeParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.C;
  const int64_t per_block = int64_t(kThreads) * kVec;
  const int64_t tblocks = (p.T + per_block - 1) / per_block;
  if (tblocks > 65535) throw std::invalid_argument("omni2sound._C snake_forward_cuda: T too long (> 67M samples)");
  dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tblocks));
  snake_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.residual), p.alpha, p.beta, static_cast<T*>(p.s),
      static_cast<T*>(p.y), p.C, p.T, p.eps);
}

template <typename T>
void bwd_dtype(const SnakeBwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.C;
  const int threads = p.T >= 4096 ? 1024 : 256;
  snake_bwd_kernel<T><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      static_cast<const T*>(p.dy), static_cast<const T*>(p.ds_out), static_cast<const T*>(p.s),
      static_cast<const T*>(p.residual), p.alpha, p.beta,
      static_cast<T*>(p.ds), p.dalpha_rows, p.dbeta_rows, p.C, p.T, p.eps);
}

}  // namespace

void snake_forward_cuda_launch(const SnakeParams& p, stream_handle stream) {
  if (p.B * p.C * p.T == 0) return;
  if (p.B * p.C > 0x7fffffffLL) throw std::invalid_argument("omni2sound._C snake_forward_cuda: B * C too large");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (p.dtype == kFloat32) fwd_dtype<float>(p, s);
  else if (p.dtype == kFloat16) fwd_dtype<__half>(p, s);
  else fwd_dtype<__nv_bfloat16>(p, s);
  check_cuda(cudaGetLastError(), "snake_forward_cuda launch");
}

void snake_backward_cuda_launch(const SnakeBwdParams& p, stream_handle stream) {
  if (p.B * p.C * p.T == 0) return;
  if (p.B * p.C > 0x7fffffffLL) throw std::invalid_argument("omni2sound._C snake_backward_cuda: B * C too large");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (p.dtype == kFloat32) bwd_dtype<float>(p, s);
  else if (p.dtype == kFloat16) bwd_dtype<__half>(p, s);
  else bwd_dtype<__nv_bfloat16>(p, s);
  check_cuda(cudaGetLastError(), "snake_backward_cuda launch");
}

}  // namespace o2s
