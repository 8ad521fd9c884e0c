// CUDA kernels of the AdaLN family: [gated residual ->] LayerNorm -> modulate, forward and backward.
// Math and reference: omni2sound/ops/adaln.py.
//
// One block per row: the row is loaded once into registers (16-byte vector loads when every pointer
// and stride allows), reduced with warp shuffles plus one shared-memory hop, and written once. These
// ops are memory-bound (and launch-bound at inference sizes), so a single pass over HBM is the target.
// Kernels run on the stream passed from Python, never the legacy default stream (CUDA-graph safe).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "adaln.h"
#include "cuda_common.cuh"

namespace o2s {
namespace {

// VEC elements starting at p as floats; VEC * sizeof(T) == 16 uses one 128-bit load.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = ld1(e + i);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = ld1(p + i);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_f32<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = from_f32<T>(in[i]);
  }
}

// Sum over the block (blockDim.x is a multiple of 32, at most 1024). smem holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();  // the previous reduction's readers are done with smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? smem[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

// VEC modulation values at row (b, l), column i * VEC: a [+ a2] (a2 null: no second addend).
template <typename T, int VEC>
__device__ __forceinline__ void load_mod(const void* a, int64_t asb, int64_t asl, const void* a2, int64_t a2sb,
                                         int64_t a2sl, int64_t b, int64_t l, int i, float* out) {
  load_vec<T, VEC>(static_cast<const T*>(a) + b * asb + l * asl + i * VEC, out);
  if (a2 != nullptr) {
    float o2[VEC];
    load_vec<T, VEC>(static_cast<const T*>(a2) + b * a2sb + l * a2sl + i * VEC, o2);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] += o2[e];
  }
}

template <typename T, int VEC, int MAXV>
__global__ void adaln_fwd_kernel(AdaLNParams p) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / p.L, l = r % p.L;
  const int D = int(p.D), nvec = D / VEC;
  const T* x = static_cast<const T*>(p.x) + r * D;
  const bool gated = p.h != nullptr;
  float v[MAXV][VEC];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[k][e] = 0.f;
    if (i < nvec) {
      load_vec<T, VEC>(x + i * VEC, v[k]);
      if (gated) {
        float hv[VEC], gv[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.h) + r * D + i * VEC, hv);
        load_mod<T, VEC>(p.gate, p.gate_sb, p.gate_sl, p.gate2, p.gate2_sb, p.gate2_sl, b, l, i, gv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[k][e] += gv[e] * hv[e];
        store_vec<T, VEC>(static_cast<T*>(p.x2) + r * D + i * VEC, v[k]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += v[k][e];
    }
  }
  const float mean = block_sum(s, smem) / float(D);
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float c = v[k][e] - mean;
        ss += c * c;
      }
    }
  }
  const float ssum = block_sum(ss, smem);
  const float rstd = isinf(ssum) ? __int_as_float(0x7fc00000) : rsqrtf(ssum / float(D) + p.eps);  // overflow: NaN
  if (threadIdx.x == 0) {
    p.mean[r] = mean;
    p.rstd[r] = rstd;
  }
  T* y = static_cast<T*>(p.y) + r * D;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
      float shv[VEC], scv[VEC], out[VEC];
      load_mod<T, VEC>(p.shift, p.shift_sb, p.shift_sl, p.shift2, p.shift2_sb, p.shift2_sl, b, l, i, shv);
      load_mod<T, VEC>(p.scale, p.scale_sb, p.scale_sl, p.scale2, p.scale2_sb, p.scale2_sl, b, l, i, scv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = (v[k][e] - mean) * rstd * (1.f + scv[e]) + shv[e];
      store_vec<T, VEC>(y + i * VEC, out);
    }
  }
}

template <typename T, int VEC, int MAXV>
__global__ void adaln_bwd_kernel(AdaLNBwdParams p) {
  __shared__ float smem[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / p.L, l = r % p.L;
  const int D = int(p.D), nvec = D / VEC;
  const float mean = p.mean[r], rstd = p.rstd[r];
  float xhat[MAXV][VEC], g[MAXV][VEC];
  float sg = 0.f, sgx = 0.f;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
      float dy[VEC], scv[VEC], dsc[VEC];
      load_vec<T, VEC>(static_cast<const T*>(p.dy) + r * D + i * VEC, dy);
      if (p.dshift_tok) store_vec<T, VEC>(static_cast<T*>(p.dshift_tok) + r * p.dshift_rs + i * VEC, dy);  // exact
      load_vec<T, VEC>(static_cast<const T*>(p.xin) + r * D + i * VEC, xhat[k]);
      load_mod<T, VEC>(p.scale, p.scale_sb, p.scale_sl, p.scale2, p.scale2_sb, p.scale2_sl, b, l, i, scv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        xhat[k][e] = (xhat[k][e] - mean) * rstd;
        g[k][e] = dy[e] * (1.f + scv[e]);
        dsc[e] = dy[e] * xhat[k][e];
        sg += g[k][e];
        sgx += g[k][e] * xhat[k][e];
      }
      if (p.dscale_tok) store_vec<T, VEC>(static_cast<T*>(p.dscale_tok) + r * p.dscale_rs + i * VEC, dsc);
    }
  }
  const float mg = block_sum(sg, smem) / float(D);
  const float mgx = block_sum(sgx, smem) / float(D);
  const bool gated = p.h != nullptr;
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
      float dx[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) dx[e] = rstd * (g[k][e] - mg - xhat[k][e] * mgx);
      if (p.dx2_in) {
        float d2[VEC];
        load_vec<T, VEC>(static_cast<const T*>(p.dx2_in) + r * D + i * VEC, d2);
#pragma unroll
        for (int e = 0; e < VEC; ++e) dx[e] += d2[e];
      }
      store_vec<T, VEC>(static_cast<T*>(p.dxin) + r * D + i * VEC, dx);
      if (gated) {
        float gv[VEC], dh[VEC];
        load_mod<T, VEC>(p.gate, p.gate_sb, p.gate_sl, p.gate2, p.gate2_sb, p.gate2_sl, b, l, i, gv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) dh[e] = gv[e] * dx[e];
        store_vec<T, VEC>(static_cast<T*>(p.dh) + r * D + i * VEC, dh);
        if (p.dgate_tok) {                     // h is read only for its gradient (not needed for a constant gate)
          float hv[VEC], dg[VEC];
          load_vec<T, VEC>(static_cast<const T*>(p.h) + r * D + i * VEC, hv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) dg[e] = hv[e] * dx[e];
          store_vec<T, VEC>(static_cast<T*>(p.dgate_tok) + r * p.dgate_rs + i * VEC, dg);
        }
      }
    }
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("omni2sound._C ") + what + ": " + cudaGetErrorString(err));
}

// Picks vectors per thread (MAXV) and threads per block so that the row fits in registers.
template <typename Launch>
void launch_rows(int64_t rows, int64_t nvec, Launch launch) {
  if (rows == 0) return;
  int maxv = 1;
  while (maxv < 16 && (nvec + maxv - 1) / maxv > 256) maxv *= 2;
  int64_t threads = (nvec + maxv - 1) / maxv;
  check(threads <= 1024, "adaln CUDA kernel: row too long for one block (D too large); use the triton backend");
  threads = ((threads + 31) / 32) * 32;
  launch(maxv, dim3(unsigned(rows)), dim3(unsigned(threads)));
}

template <typename T, int VEC>
void fwd_typed(const AdaLNParams& p, cudaStream_t s) {
  launch_rows(p.B * p.L, p.D / VEC, [&](int maxv, dim3 grid, dim3 block) {
    switch (maxv) {
      case 1: adaln_fwd_kernel<T, VEC, 1><<<grid, block, 0, s>>>(p); break;
      case 2: adaln_fwd_kernel<T, VEC, 2><<<grid, block, 0, s>>>(p); break;
      case 4: adaln_fwd_kernel<T, VEC, 4><<<grid, block, 0, s>>>(p); break;
      case 8: adaln_fwd_kernel<T, VEC, 8><<<grid, block, 0, s>>>(p); break;
      default: adaln_fwd_kernel<T, VEC, 16><<<grid, block, 0, s>>>(p); break;
    }
  });
}

template <typename T, int VEC>
void bwd_typed(const AdaLNBwdParams& p, cudaStream_t s) {
  launch_rows(p.B * p.L, p.D / VEC, [&](int maxv, dim3 grid, dim3 block) {
    switch (maxv) {
      case 1: adaln_bwd_kernel<T, VEC, 1><<<grid, block, 0, s>>>(p); break;
      case 2: adaln_bwd_kernel<T, VEC, 2><<<grid, block, 0, s>>>(p); break;
      case 4: adaln_bwd_kernel<T, VEC, 4><<<grid, block, 0, s>>>(p); break;
      case 8: adaln_bwd_kernel<T, VEC, 8><<<grid, block, 0, s>>>(p); break;
      default: adaln_bwd_kernel<T, VEC, 16><<<grid, block, 0, s>>>(p); break;
    }
  });
}

// 16-byte vectors need D, every row start and every modulation stride to be multiples of the vector.
template <typename T>
bool can_vectorise(int64_t D, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int VEC = 16 / sizeof(T);
  if (D % VEC) return false;
  for (auto q : ptrs)
    if (q && !aligned16(q)) return false;
  for (auto st : strides)
    if (st % VEC) return false;
  return true;
}

template <typename T>
void fwd_dtype(const AdaLNParams& p, cudaStream_t s) {
  if (can_vectorise<T>(p.D, {p.x, p.h, p.gate, p.shift, p.scale, p.gate2, p.shift2, p.scale2, p.x2, p.y},
                       {p.gate_sb, p.gate_sl, p.shift_sb, p.shift_sl, p.scale_sb, p.scale_sl, p.gate2_sb, p.gate2_sl,
                        p.shift2_sb, p.shift2_sl, p.scale2_sb, p.scale2_sl}))
    fwd_typed<T, 16 / sizeof(T)>(p, s);
  else
    fwd_typed<T, 1>(p, s);
}

template <typename T>
void bwd_dtype(const AdaLNBwdParams& p, cudaStream_t s) {
  if (can_vectorise<T>(p.D, {p.dy, p.dx2_in, p.xin, p.h, p.gate, p.scale, p.gate2, p.scale2, p.dxin, p.dh,
                             p.dgate_tok, p.dscale_tok, p.dshift_tok},
                       {p.gate_sb, p.gate_sl, p.scale_sb, p.scale_sl, p.gate2_sb, p.gate2_sl, p.scale2_sb,
                        p.scale2_sl, p.dgate_rs, p.dscale_rs, p.dshift_rs}))
    bwd_typed<T, 16 / sizeof(T)>(p, s);
  else
    bwd_typed<T, 1>(p, s);
}

}  // namespace

void adaln_forward_cuda_launch(const AdaLNParams& p, stream_handle stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.dtype == kFloat32) fwd_dtype<float>(p, s);
  else if (p.dtype == kFloat16) fwd_dtype<__half>(p, s);
  else fwd_dtype<__nv_bfloat16>(p, s);
  check_cuda(cudaGetLastError(), "adaln_forward_cuda launch");
}

void adaln_backward_cuda_launch(const AdaLNBwdParams& p, stream_handle stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.dtype == kFloat32) bwd_dtype<float>(p, s);
  else if (p.dtype == kFloat16) bwd_dtype<__half>(p, s);
  else bwd_dtype<__nv_bfloat16>(p, s);
  check_cuda(cudaGetLastError(), "adaln_backward_cuda launch");
}

}  // namespace o2s
