// Host side of the varlen flash cross-attention: argument checks and the binding of the CUDA forward.
// There is no C++ CPU kernel: on the CPU the padded-SDPA reference is the fast path (see
// omni2sound/ops/cross_attention.py). The backward runs in Triton or PyTorch.
#include <cstdint>
#include <string>

#include "common.h"
#include "registry.h"

namespace o2s {

#ifdef OMNI2SOUND_WITH_CUDA
// csrc/cross_attention.cu
void cross_attention_fwd_cuda_launch(const void* q, const void* k, const void* v, const int32_t* cu, void* out,
                                     float* lse, int64_t B, int64_t Lq, int64_t H, int64_t D, int64_t sq_b,
                                     int64_t sq_l, int64_t sq_h, int64_t sk_n, int64_t sk_h, int64_t sv_n,
                                     int64_t sv_h, float scale, int dtype, std::uintptr_t stream);
#endif

// q [B, Lq, H, D] strided (head dim contiguous); k, v [total_k, H, D] strided (head dim contiguous);
// cu [B + 1] int32 on the device; out [B, Lq, H, D] contiguous; lse [B, H, Lq] fp32 contiguous.
static void cross_attention_fwd_cuda(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t cu,
                                     std::uintptr_t out, std::uintptr_t lse, int64_t B, int64_t Lq, int64_t H,
                                     int64_t D, int64_t sq_b, int64_t sq_l, int64_t sq_h, int64_t sk_n, int64_t sk_h,
                                     int64_t sv_n, int64_t sv_h, double scale, int dtype, std::uintptr_t stream) {
  const std::string where = "cross_attention_fwd_cuda: ";
  check(D == 32 || D == 64 || D == 128, where + "head dim D must be 32, 64 or 128, got " + std::to_string(D));
  check(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
        where + "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(dtype));
  check(B > 0 && Lq > 0 && H > 0, where + "B, Lq and H must be positive (the caller skips empty outputs), got B=" +
                                       std::to_string(B) + " Lq=" + std::to_string(Lq) + " H=" + std::to_string(H));
  check(B * H < (int64_t(1) << 31), where + "B * H must be below 2^31");
  check((Lq + 63) / 64 <= 65535, where + "Lq must be at most 65535 * 64, got " + std::to_string(Lq));
  check(q != 0 && cu != 0 && out != 0 && lse != 0, where + "null pointer for q, cu_seqlens_k, out or lse");
#ifdef OMNI2SOUND_WITH_CUDA
  cross_attention_fwd_cuda_launch(reinterpret_cast<const void*>(q), reinterpret_cast<const void*>(k),
                                  reinterpret_cast<const void*>(v), reinterpret_cast<const int32_t*>(cu),
                                  reinterpret_cast<void*>(out), reinterpret_cast<float*>(lse), B, Lq, H, D, sq_b, sq_l,
                                  sq_h, sk_n, sk_h, sv_n, sv_h, static_cast<float>(scale), dtype, stream);
#else
  (void)k; (void)v; (void)sq_b; (void)sq_h; (void)sk_n; (void)sk_h; (void)sv_n; (void)sv_h; (void)scale; (void)stream;
  check(false, where + "this build of omni2sound._C has no CUDA kernels (built without nvcc)");
#endif
}

static Registrar reg_cross_attention([](pybind11::module_& m) {
  m.def("cross_attention_fwd_cuda", &cross_attention_fwd_cuda,
        "Varlen flash cross-attention forward on the GPU (raw pointers, element strides, dtype code, stream)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cu_seqlens_k"),
        pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("B"), pybind11::arg("Lq"), pybind11::arg("H"),
        pybind11::arg("D"), pybind11::arg("sq_b"), pybind11::arg("sq_l"), pybind11::arg("sq_h"),
        pybind11::arg("sk_n"), pybind11::arg("sk_h"), pybind11::arg("sv_n"), pybind11::arg("sv_h"),
        pybind11::arg("scale"), pybind11::arg("dtype"), pybind11::arg("stream"));
});

}  // namespace o2s
