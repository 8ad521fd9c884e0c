// Flash cross-attention forward (varlen keys, dense queries) for the inference path.
//
// q [B, Lq, H, D] (strided), k/v [total_k, H, D] packed by cu_seqlens_k [B + 1] (int32), out [B, Lq, H, D]
// contiguous, lse [B, H, Lq] fp32 (natural log of the sum of exp of the scaled scores; 0 for a sample
// with no key, whose output rows are 0).
//
// One block per (batch * head, tile of 64 query rows); 4 warps, each owning 16 query rows (a lane pair
// per row). The block streams its sample's keys through shared memory in tiles of 64 (zero-filled past
// the sample's end) and every warp runs an online softmax (running max and sum in fp32, base 2):
//   S = Q K^T (tensor cores via WMMA for fp16/bf16, fp32 FMA for fp32 inputs)  -> warp scratch, fp32
//   P = 2^(S * scale * log2e - m_new); l = l * alpha + rowsum(P)               -> warp scratch, input type
//   O = O * alpha + P V                                                        -> registers, fp32
// Scores and values never leave the block; the kernel launches on the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include "cross_attention.h"
#include "cuda_common.cuh"
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace o2s {
namespace xattn {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 16;                  // one WMMA tile of rows per warp
constexpr int kBlockM = kWarps * kRowsPerWarp;    // query rows per block
constexpr int kBlockN = 64;                       // keys per shared-memory tile
constexpr float kLn2 = 0.6931471805599453f;


template <typename T> struct Traits {
  static constexpr bool kTensorCore = true;
  static constexpr int kPad = 8;  // rows stay 16-byte aligned (WMMA) and shift banks by 4 words
  using P = T;                    // P is a WMMA operand: stored in the input type
};
template <> struct Traits<float> {
  static constexpr bool kTensorCore = false;  // fp32 inputs keep fp32 products (no tf32)
  static constexpr int kPad = 1;              // stride D+1: lanes reading K_s[lane][d] hit distinct banks
  using P = float;
};

// Dynamic shared memory of one block, each region 128-byte aligned.
template <typename T, int D> struct Smem {
  static constexpr int kLd = D + Traits<T>::kPad;                  // Q_s, K_s, V_s row stride (elements)
  static constexpr int kSLd = (kBlockN > D ? kBlockN : D) + 4;     // per-warp fp32 scratch (S, then P V)
  static constexpr int kPLd = kBlockN + Traits<T>::kPad;           // per-warp P row stride
  static constexpr size_t align(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t kQ = align(sizeof(T) * kBlockM * kLd);
  static constexpr size_t kK = align(sizeof(T) * kBlockN * kLd);
  static constexpr size_t kS = align(sizeof(float) * kWarps * kRowsPerWarp * kSLd);
  static constexpr size_t kP = align(sizeof(typename Traits<T>::P) * kWarps * kRowsPerWarp * kPLd);
  static constexpr size_t kBytes = kQ + 2 * kK + kS + kP;
};

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Copy rows [0, n_valid) of a strided [rows, D] global matrix into shared memory (row stride ld) and
// zero rows [n_valid, n_rows): padding keys must have zero values, or 0 * garbage could be NaN. Scalar
// path, for inputs whose rows are not 16-byte aligned.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int64_t src_stride, int n_valid, int n_rows) {
  for (int c = threadIdx.x; c < n_rows * D; c += blockDim.x) {
    const int r = c / D, col = c % D;
    dst[r * ld + col] = r < n_valid ? src[r * src_stride + col] : from_f32<T>(0.0f);
  }
}

// The same copy through registers in 16-byte chunks, split into load() and store() so that the next key
// tile's global loads are in flight while the block computes on the current one.
template <typename T, int D, int ROWS>
struct TileRegs {
  static constexpr int kVec = 16 / sizeof(T);
  static constexpr int kChunks = D / kVec;  // 16-byte chunks per row
  static constexpr int kTotal = ROWS * kChunks;
  static constexpr int kIters = (kTotal + kWarps * 32 - 1) / (kWarps * 32);
  uint4 r[kIters];

  __device__ __forceinline__ void load(const T* src, int64_t src_stride, int n_valid) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = threadIdx.x + it * kWarps * 32, row = c / kChunks, col = (c % kChunks) * kVec;
      r[it] = make_uint4(0u, 0u, 0u, 0u);
      if (c < kTotal && row < n_valid) r[it] = *reinterpret_cast<const uint4*>(src + row * src_stride + col);
    }
  }
  template <int LD>
  __device__ __forceinline__ void store(T* dst) const {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int c = threadIdx.x + it * kWarps * 32, row = c / kChunks, col = (c % kChunks) * kVec;
      if (c >= kTotal) continue;
      if constexpr ((LD * sizeof(T)) % 16 == 0) {
        *reinterpret_cast<uint4*>(dst + row * LD + col) = r[it];
      } else {
        const T* e = reinterpret_cast<const T*>(&r[it]);
#pragma unroll
        for (int i = 0; i < kVec; ++i) dst[row * LD + col + i] = e[i];
      }
    }
  }
};

// s_w[r][n] = sum_d Q[r][d] K[n][d] for the warp's 16 rows and the tile's kBlockN keys (unscaled, fp32).
template <typename T, int D>
__device__ __forceinline__ void tile_scores(const T* q_w, const T* k_s, float* s_w, int lane) {
  using S = Smem<T, D>;
  if constexpr (Traits<T>::kTensorCore) {
    // Q fragments come from shared memory each tile (registers are better spent on O at D = 128).
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBlockN / 16];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 16; ++nt) wmma::fill_fragment(acc[nt], 0.0f);
#pragma unroll
    for (int kt = 0; kt < D / 16; ++kt) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa;
      wmma::load_matrix_sync(qa, q_w + kt * 16, S::kLd);
#pragma unroll
      for (int nt = 0; nt < kBlockN / 16; ++nt) {
        // K row-major [n][d] is K^T column-major [d][n]: the B operand of Q K^T.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;
        wmma::load_matrix_sync(kb, k_s + nt * 16 * S::kLd + kt * 16, S::kLd);
        wmma::mma_sync(acc[nt], qa, kb, acc[nt]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 16; ++nt) {
      wmma::store_matrix_sync(s_w + nt * 16, acc[nt], S::kSLd, wmma::mem_row_major);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBlockN / 32; ++j) {
      const int n = lane + 32 * j;
      float acc[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.0f;
      for (int d = 0; d < D; ++d) {
        const float kv = to_f32(k_s[n * S::kLd + d]);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = fmaf(to_f32(q_w[r * S::kLd + d]), kv, acc[r]);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s_w[r * S::kSLd + n] = acc[r];
    }
  }
}

// s_w[r][d] = sum_n P[r][n] V[n][d] (fp32), overwriting the scores already consumed.
template <typename T, int D>
__device__ __forceinline__ void tile_pv(const typename Traits<T>::P* p_w, const T* v_s, float* s_w, int lane) {
  using S = Smem<T, D>;
  if constexpr (Traits<T>::kTensorCore) {
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int nt = 0; nt < kBlockN / 16; ++nt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
        wmma::load_matrix_sync(pa, p_w + nt * 16, S::kPLd);
        wmma::load_matrix_sync(vb, v_s + nt * 16 * S::kLd + dt * 16, S::kLd);
        wmma::mma_sync(acc, pa, vb, acc);
      }
      wmma::store_matrix_sync(s_w + dt * 16, acc, S::kSLd, wmma::mem_row_major);
    }
  } else {
#pragma unroll
    for (int c = 0; c < D / 32; ++c) {
      const int d = lane + 32 * c;
      float acc[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.0f;
      for (int n = 0; n < kBlockN; ++n) {
        const float vv = to_f32(v_s[n * S::kLd + d]);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = fmaf(to_f32(p_w[r * S::kPLd + n]), vv, acc[r]);
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s_w[r * S::kSLd + d] = acc[r];
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
cross_attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const int32_t* __restrict__ cu, int total_k, T* __restrict__ out,
                           float* __restrict__ lse, int H, int Lq, int64_t sq_b, int64_t sq_l, int64_t sq_h, int64_t sk_n, int64_t sk_h,
                           int64_t sv_n, int64_t sv_h, float scale_log2, bool vec_ok) {
  static_assert(D % 32 == 0 && D <= 128, "head dim must be 32, 64, 96 or 128");
  using S = Smem<T, D>;
  using PT = typename Traits<T>::P;
  constexpr int kPerLane = D / 2;  // O elements each lane accumulates (half of one row)

  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = reinterpret_cast<T*>(smem + S::kQ);
  T* v_s = reinterpret_cast<T*>(smem + S::kQ + S::kK);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* s_w = reinterpret_cast<float*>(smem + S::kQ + 2 * S::kK) + warp * kRowsPerWarp * S::kSLd;
  PT* p_w = reinterpret_cast<PT*>(smem + S::kQ + 2 * S::kK + S::kS) + warp * kRowsPerWarp * S::kPLd;
  const T* q_w = q_s + warp * kRowsPerWarp * S::kLd;

  const int bh = blockIdx.x;
  const int b = bh / H, h = bh % H;
  const int m0 = blockIdx.y * kBlockM;
  // Offsets clamped to the key rows (the host cannot check device memory without a sync): bad offsets give wrong
  // numbers, never a read outside k and v. Valid ones pass unchanged.
  const int k_lo = min(max(cu[b], 0), total_k);
  const int64_t k_start = k_lo;
  const int n_k = min(max(cu[b + 1], k_lo), total_k) - k_lo;

  const T* q_blk = q + b * sq_b + h * sq_h + m0 * sq_l;
  if (vec_ok) {
    TileRegs<T, D, kBlockM> qr;
    qr.load(q_blk, sq_l, min(kBlockM, Lq - m0));
    qr.template store<S::kLd>(q_s);
  } else {
    load_rows<T, D>(q_s, S::kLd, q_blk, sq_l, min(kBlockM, Lq - m0), kBlockM);
  }
  __syncthreads();

  // Softmax state: lane pair (2r, 2r+1) owns query row r of the warp; each lane of the pair scans half of
  // the tile's keys (interleaved) and accumulates half of the row's output (a contiguous D/2 chunk).
  const int r = lane >> 1, half = lane & 1;
  float m_i = -INFINITY, l_i = 0.0f, o[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[i] = 0.0f;

  const T* k_seq = k + k_start * sk_n + h * sk_h;
  const T* v_seq = v + k_start * sv_n + h * sv_h;
  TileRegs<T, D, kBlockN> kr, vr;  // the next K/V tile, loaded one iteration ahead
  if (vec_ok && n_k > 0) {
    kr.load(k_seq, sk_n, min(kBlockN, n_k));
    vr.load(v_seq, sv_n, min(kBlockN, n_k));
  }

  for (int n0 = 0; n0 < n_k; n0 += kBlockN) {
    const int n_valid = min(kBlockN, n_k - n0);
    __syncthreads();  // every warp is done with the previous K/V tile
    if (vec_ok) {
      kr.template store<S::kLd>(k_s);
      vr.template store<S::kLd>(v_s);
    } else {
      load_rows<T, D>(k_s, S::kLd, k_seq + n0 * sk_n, sk_n, n_valid, kBlockN);
      load_rows<T, D>(v_s, S::kLd, v_seq + n0 * sv_n, sv_n, n_valid, kBlockN);
    }
    __syncthreads();
    if (vec_ok && n0 + kBlockN < n_k) {  // prefetch: these loads overlap the tile's math below
      kr.load(k_seq + (n0 + kBlockN) * sk_n, sk_n, min(kBlockN, n_k - n0 - kBlockN));
      vr.load(v_seq + (n0 + kBlockN) * sv_n, sv_n, min(kBlockN, n_k - n0 - kBlockN));
    }

    tile_scores<T, D>(q_w, k_s, s_w, lane);
    __syncwarp();

    // Online softmax. The tile holds >= 1 real key, so m_new is finite, and alpha = 2^(-inf) = 0 on the
    // first tile.
    float sv[kBlockN / 2];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBlockN / 2; ++j) {
      const int n = half + 2 * j;
      sv[j] = n < n_valid ? s_w[r * S::kSLd + n] * scale_log2 : -INFINITY;
      mx = fmaxf(mx, sv[j]);
    }
    const float m_new = fmaxf(m_i, fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1)));
    const float alpha = exp2f(m_i - m_new);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kBlockN / 2; ++j) {
      const float p = exp2f(sv[j] - m_new);  // 0 for padding keys
      sum += p;
      p_w[r * S::kPLd + half + 2 * j] = from_f32<PT>(p);
    }
    l_i = l_i * alpha + sum + __shfl_xor_sync(0xffffffffu, sum, 1);
    m_i = m_new;
    __syncwarp();

    tile_pv<T, D>(p_w, v_s, s_w, lane);
    __syncwarp();
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[i] = o[i] * alpha + s_w[r * S::kSLd + half * kPerLane + i];
    __syncwarp();
  }

  // Epilogue: O / l (0 for a sample with no key) in 16-byte stores, lse in natural-log units.
  const int row = m0 + warp * kRowsPerWarp + r;
  if (row < Lq) {
    const float inv_l = l_i > 0.0f ? 1.0f / l_i : 0.0f;
    T* dst = out + ((static_cast<int64_t>(b) * Lq + row) * H + h) * D + half * kPerLane;
    constexpr int kVec = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < kPerLane; c += kVec) {
      uint4 packed;
      T* e = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int i = 0; i < kVec; ++i) e[i] = from_f32<T>(o[c + i] * inv_l);
      *reinterpret_cast<uint4*>(dst + c) = packed;
    }
    if (half == 0) {
      lse[static_cast<int64_t>(bh) * Lq + row] = l_i > 0.0f ? (m_i + log2f(l_i)) * kLn2 : 0.0f;
    }
  }
}

template <typename T, int D>
void launch(const CrossAttnParams& p, cudaStream_t stream) {
  using S = Smem<T, D>;
  constexpr int64_t kVec = 16 / sizeof(T);
  auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  const bool vec_ok = aligned(p.q) && aligned(p.k) && aligned(p.v) && p.sq_b % kVec == 0 && p.sq_l % kVec == 0 &&
                      p.sq_h % kVec == 0 && p.sk_n % kVec == 0 && p.sk_h % kVec == 0 && p.sv_n % kVec == 0 &&
                      p.sv_h % kVec == 0;
  auto kernel = cross_attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(S::kBytes));
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("omni2sound._C cross_attention_fwd_cuda: cannot reserve ") +
                             std::to_string(S::kBytes) + " bytes of shared memory: " + cudaGetErrorString(err));
  }
  const dim3 grid(static_cast<unsigned>(p.B * p.H), static_cast<unsigned>((p.Lq + kBlockM - 1) / kBlockM));
  kernel<<<grid, kWarps * 32, S::kBytes, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v), p.cu,
      static_cast<int>(p.Nk), static_cast<T*>(p.out), p.lse, static_cast<int>(p.H), static_cast<int>(p.Lq), p.sq_b,
      p.sq_l, p.sq_h, p.sk_n, p.sk_h, p.sv_n, p.sv_h, p.scale * 1.4426950408889634f, vec_ok);
  err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("omni2sound._C cross_attention_fwd_cuda: kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

template <typename T>
void launch_d(const CrossAttnParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: throw std::invalid_argument("omni2sound._C cross_attention_fwd_cuda: head dim must be 32, 64 or 128");
  }
}

}  // namespace xattn

// Declared in cross_attention.cpp, which checks the parameters first. dtype: 0 fp32, 1 fp16, 2 bf16.
void cross_attention_fwd_cuda_launch(const CrossAttnParams& p, std::uintptr_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case 0: return xattn::launch_d<float>(p, s);
    case 1: return xattn::launch_d<__half>(p, s);
    case 2: return xattn::launch_d<__nv_bfloat16>(p, s);
    default: throw std::invalid_argument("omni2sound._C cross_attention_fwd_cuda: unknown dtype code " +
                                         std::to_string(p.dtype));
  }
}

}  // namespace o2s
