// Host side of the varlen flash cross-attention: the checks of its parameters and the binding of the CUDA forward.
// There is no C++ CPU kernel of its own: on the CPU it runs the varlen form of the attention forward
// (attention.cpp) or the reference (see omni2sound/ops/cross_attention.py). The backward runs in Triton or PyTorch.
#include <cmath>
#include <cstdint>
#include <string>

#include "cross_attention.h"
#include "params.h"
#include "registry.h"

namespace o2s {

#ifdef OMNI2SOUND_WITH_CUDA
// csrc/cross_attention.cu
void cross_attention_fwd_cuda_launch(const CrossAttnParams& p, stream_handle stream);
#endif

void validate(const CrossAttnParams& p) {
  const std::string where = "cross_attention_fwd_cuda: ";
  check(p.D == 32 || p.D == 64 || p.D == 128, where + "head dim D must be 32, 64 or 128, got " + num(p.D));
  check(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
        where + "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + num(p.dtype));
  check(p.B > 0 && p.Lq > 0 && p.H > 0, where + "B, Lq and H must be positive (the caller skips empty outputs), got B=" +
                                             num(p.B) + " Lq=" + num(p.Lq) + " H=" + num(p.H));
  check(p.Nk >= 0 && p.Nk < (int64_t(1) << 31), where + "the key row count Nk must be in [0, 2^31), got " + num(p.Nk));
  check(p.B * p.H < (int64_t(1) << 31), where + "B * H must be below 2^31");
  check((p.Lq + 63) / 64 <= 65535, where + "Lq must be at most 65535 * 64, got " + num(p.Lq));
  check(p.q && p.cu && p.out && p.lse, where + "null pointer for q, cu_seqlens_k, out or lse");
  check(p.Nk == 0 || (p.k && p.v), where + "null pointer for k or v");
  check(p.sq_b >= 0 && p.sq_l >= 0 && p.sq_h >= 0 && p.sk_n >= 0 && p.sk_h >= 0 && p.sv_n >= 0 && p.sv_h >= 0,
        where + "strides must be >= 0");
  check(std::isfinite(p.scale), where + "scale must be finite");
}

static Registrar reg_cross_attention([](pybind11::module_& m) {
  ParamsClass<CrossAttnParams>(m, "CrossAttnParams", "arguments of cross_attention_fwd_cuda (csrc/cross_attention.h)")
      .field("B", &CrossAttnParams::B).field("Lq", &CrossAttnParams::Lq).field("H", &CrossAttnParams::H)
      .field("D", &CrossAttnParams::D).field("Nk", &CrossAttnParams::Nk)
      .field("q", &CrossAttnParams::q).field("k", &CrossAttnParams::k).field("v", &CrossAttnParams::v)
      .field("cu", &CrossAttnParams::cu).field("out", &CrossAttnParams::out).field("lse", &CrossAttnParams::lse)
      .field("sq_b", &CrossAttnParams::sq_b).field("sq_l", &CrossAttnParams::sq_l).field("sq_h", &CrossAttnParams::sq_h)
      .field("sk_n", &CrossAttnParams::sk_n).field("sk_h", &CrossAttnParams::sk_h)
      .field("sv_n", &CrossAttnParams::sv_n).field("sv_h", &CrossAttnParams::sv_h)
      .field("scale", &CrossAttnParams::scale).field("dtype", &CrossAttnParams::dtype);
  m.def(
      "cross_attention_fwd_cuda",
      [](const CrossAttnParams& p, stream_handle stream) {
        validate(p);
#ifdef OMNI2SOUND_WITH_CUDA
        cross_attention_fwd_cuda_launch(p, stream);
#else
        (void)stream;
        check(false, "cross_attention_fwd_cuda: this build of omni2sound._C has no CUDA kernels (built without nvcc)");
#endif
      },
      pybind11::arg("params"), pybind11::arg("stream"),
      "Varlen flash cross-attention forward on the GPU, on the given stream");
});

}  // namespace o2s
