// Shared definitions of the omni2sound native extension. No libtorch: tensors arrive as raw pointers
// with sizes, strides (in elements) and a dtype code (must match omni2sound/_native.py DTYPE_CODES).
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace o2s {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Storage-only 16-bit types for the CPU path: arithmetic is always done in float.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline float to_float(half_t v) {
  // IEEE binary16 -> binary32, including subnormals, inf and NaN.
  uint32_t h = v.bits;
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);
    float f = float(man) * (1.0f / 16777216.0f);  // man * 2^-24
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16_t from_float<bf16_t>(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
template <> inline half_t from_float<half_t>(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};          // NaN
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};         // overflow -> inf
  if (a < 0x38800000u) {                                                  // subnormal or zero
    float mag = bits_to_float(a) * 16777216.0f;                           // / 2^-24
    uint32_t m = uint32_t(mag);
    float rem = mag - float(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return half_t{uint16_t(sign | m)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
  return half_t{uint16_t(sign | ((r - 0x38000000u) >> 13))};
}

// Run the fp32, fp16 or bf16 instantiation of a CPU kernel for the params' dtype code (storage type only: the
// kernels compute in float).
template <typename P, typename F32, typename F16, typename BF16>
void by_dtype(const P& p, F32 f32, F16 f16, BF16 bf16) {
  if (p.dtype == kFloat32) f32(p);
  else if (p.dtype == kFloat16) f16(p);
  else bf16(p);
}

// cudaStream_t passed from Python as an integer (torch.cuda.current_stream().cuda_stream).
using stream_handle = std::uintptr_t;

inline void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("omni2sound._C: " + msg);
}

}  // namespace o2s
