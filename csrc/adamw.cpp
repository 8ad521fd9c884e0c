// C++ CPU kernel of the AdamW step on fp32 master weights that also writes their bf16 copy (omni2sound/ops/adamw.py
// has the math and the reference). One pass over each parameter: it reads param, grad, exp_avg, exp_avg_sq and
// writes param, exp_avg, exp_avg_sq and the bf16 copy (the weight the forward reads), so no separate cast pass runs.
// No CUDA launcher: on a GPU the Triton kernel runs this op.
#include <cmath>
#include <cstdint>
#include <string>

#include "adamw.h"
#include "params.h"
#include "registry.h"

namespace o2s {
namespace {

template <typename G, bool kCopy>
void step_elements(const AdamWParams& p) {
  const G* g = static_cast<const G*>(p.grad);
  bf16_t* w = static_cast<bf16_t*>(p.copy);
  // the scalars in double, once (torch's AdamW computes them on the host in double too), then the loop in fp32
  const double bc1 = 1.0 - std::pow(double(p.beta1), double(p.step));
  const double bc2_sqrt = std::sqrt(1.0 - std::pow(double(p.beta2), double(p.step)));
  const float step_size = float(double(p.lr) / bc1), inv_bc2_sqrt = float(1.0 / bc2_sqrt);
  const float decay = 1.0f - p.lr * p.weight_decay, b1 = p.beta1, b2 = p.beta2, eps = p.eps;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < p.n; ++i) {
    const float gi = to_float(g[i]);
    const float m = b1 * p.exp_avg[i] + (1.0f - b1) * gi;
    const float v = b2 * p.exp_avg_sq[i] + (1.0f - b2) * gi * gi;
    const float x = p.param[i] * decay - step_size * m / (std::sqrt(v) * inv_bc2_sqrt + eps);
    p.exp_avg[i] = m;
    p.exp_avg_sq[i] = v;
    p.param[i] = x;
    if constexpr (kCopy) w[i] = from_float<bf16_t>(x);
  }
}

template <typename G>
void step_tensor(const AdamWParams& p) {
  if (p.copy) step_elements<G, true>(p);
  else step_elements<G, false>(p);
}

void validate(const AdamWParams& p) {
  const std::string where = "adamw_step_cpu: ";
  check(p.n >= 0, where + "need n >= 0, got " + num(p.n));
  check(p.grad_dtype == kFloat32 || p.grad_dtype == kFloat16 || p.grad_dtype == kBFloat16,
        where + "grad dtype code must be 0, 1 or 2, got " + num(p.grad_dtype));
  check(p.step >= 1.0f, where + "step must be >= 1 (counted before the update)");
  if (p.n == 0) return;
  check(p.param && p.grad && p.exp_avg && p.exp_avg_sq, where + "null pointer for param, grad or the moments");
}

}  // namespace

static Registrar reg_adamw([](pybind11::module_& m) {
  ParamsClass<AdamWParams>(m, "AdamWParams", "arguments of adamw_step_cpu (csrc/adamw.h)")
      .field("n", &AdamWParams::n).field("param", &AdamWParams::param).field("grad", &AdamWParams::grad)
      .field("exp_avg", &AdamWParams::exp_avg).field("exp_avg_sq", &AdamWParams::exp_avg_sq)
      .field("copy", &AdamWParams::copy).field("grad_dtype", &AdamWParams::grad_dtype)
      .field("lr", &AdamWParams::lr).field("beta1", &AdamWParams::beta1).field("beta2", &AdamWParams::beta2)
      .field("eps", &AdamWParams::eps).field("weight_decay", &AdamWParams::weight_decay)
      .field("step", &AdamWParams::step);
  m.def(
      "adamw_step_cpu",
      [](const AdamWParams& p) {
        validate(p);
        if (p.n == 0) return;
        pybind11::gil_scoped_release nogil;
        switch (p.grad_dtype) {
          case kFloat16: step_tensor<half_t>(p); break;
          case kBFloat16: step_tensor<bf16_t>(p); break;
          default: step_tensor<float>(p);
        }
      },
      pybind11::arg("params"), "AdamW step on fp32 master weights, writing their bf16 copy in the same pass (C++ CPU)");
});

}  // namespace o2s
