// Parameters of the AdaLN family, shared by the host file (adaln.cpp, which binds them once as
// omni2sound._C.AdaLNParams / AdaLNBwdParams and checks them) and the CUDA kernels (adaln.cu).
#pragma once
#include <cstdint>

#include "common.h"

namespace o2s {

// Parameters of the modulated LayerNorm family (adaln_modulate and gated_residual_adaln).
// Rows are r = b * L + l. x, h, x2, y are contiguous [B, L, D]. Each modulation tensor (gate, shift,
// scale) is addressed as base + b * s_b + l * s_l (+ d), so per-sample modulation is s_l = 0.
struct AdaLNParams {
  int64_t B = 0, L = 0, D = 0;
  const void* x = nullptr;
  const void* h = nullptr;      // null: no gated residual (plain adaln_modulate)
  const void* gate = nullptr;
  const void* shift = nullptr;
  const void* scale = nullptr;
  int64_t gate_sb = 0, gate_sl = 0, shift_sb = 0, shift_sl = 0, scale_sb = 0, scale_sl = 0;
  // Optional second addend of each modulation (null: none): gate = gate + gate2, etc. A DiT's modulation is a
  // per-token part (sync features, once per request) plus a per-sample part (timestep, once per step); passing
  // both saves materialising their sum every step.
  const void* gate2 = nullptr;
  const void* shift2 = nullptr;
  const void* scale2 = nullptr;
  int64_t gate2_sb = 0, gate2_sl = 0, shift2_sb = 0, shift2_sl = 0, scale2_sb = 0, scale2_sl = 0;
  void* x2 = nullptr;           // written only when h is given
  void* y = nullptr;
  float* mean = nullptr;        // [B * L], fp32, saved for backward
  float* rstd = nullptr;        // [B * L], fp32
  float eps = 1e-6f;
  int dtype = kFloat32;
};

// Backward of the family. xin is the LayerNorm input (x2 for the gated op, x otherwise).
// Outputs: dxin (gradient reaching the LayerNorm input plus dx2_in when given) in the input dtype;
// dh (gated only) in the input dtype; dgate_tok and dscale_tok per token in the input dtype, each optional (null:
// autograd does not need it, e.g. the DiT's constant ones / zeros). In the input dtype because the per-token
// modulations they belong to are in it (under autocast: bf16 projections), so fp32 here only meant a cast
// afterwards; the caller sums them over L (fp32 accumulation) for per-sample modulation. dshift is dy itself: the
// kernels write it only where the caller gives dshift_tok (a per-token shift whose gradient lives in a shared buffer,
// see below), otherwise the caller uses dy.
// The per-token outputs are rows r = b * L + l at base + r * rs (rs: their row stride in elements, >= D), so that
// they may be slices of one [B, L, n, D] buffer (rs = n D): the gradient of a modulation split into n views lands
// in one tensor without a stack.
struct AdaLNBwdParams {
  int64_t B = 0, L = 0, D = 0;
  const void* dy = nullptr;
  const void* dx2_in = nullptr;  // gradient flowing into the x2 output (gated op), may be null
  const void* xin = nullptr;
  const void* h = nullptr;       // null: not gated
  const void* gate = nullptr;
  const void* scale = nullptr;
  int64_t gate_sb = 0, gate_sl = 0, scale_sb = 0, scale_sl = 0;
  const void* gate2 = nullptr;   // optional second addends, as in AdaLNParams
  const void* scale2 = nullptr;
  int64_t gate2_sb = 0, gate2_sl = 0, scale2_sb = 0, scale2_sl = 0;
  const float* mean = nullptr;
  const float* rstd = nullptr;
  void* dxin = nullptr;
  void* dh = nullptr;
  void* dgate_tok = nullptr;      // optional, gated only
  void* dscale_tok = nullptr;     // optional
  void* dshift_tok = nullptr;     // optional: dy copied
  int64_t dgate_rs = 0, dscale_rs = 0, dshift_rs = 0;   // row strides of the three above (elements)
  int dtype = kFloat32;
};

// Throw std::invalid_argument (Python: ValueError) on parameters the kernels cannot index safely.
void validate(const AdaLNParams& p);
void validate(const AdaLNBwdParams& p);

}  // namespace o2s
