// Device-side helpers shared by the CUDA kernels: fp32 <-> storage-type conversions. Arithmetic is
// always fp32; fp16/bf16 are storage formats (rounded to nearest even on the way out).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace o2s {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float f);
template <> __device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <> __device__ __forceinline__ __half from_f32<__half>(float f) { return __float2half_rn(f); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }

// One element at p as fp32.
template <typename T> __device__ __forceinline__ float ld1(const T* p) { return to_f32(*p); }

}  // namespace o2s
