// C++ CPU kernels of the fused bias + tanh-GELU (omni2sound/ops/gelu.py has the math and the reference). No CUDA
// launcher: on a GPU the Triton kernel runs this op.
//
//   z = x + b[n];  y = z * sigmoid(2 u),  u = sqrt(2 / pi) (z + 0.044715 z^3)      (= 0.5 z (1 + tanh u))
//   backward: dz = dy * (s + z s (1 - s) 2 sqrt(2 / pi) (1 + 3 * 0.044715 z^2)),  s = sigmoid(2 u)
//             (evaluated as dy s (1 + z e s d(2u)/dz), e = exp(-2 u) = (1 - s) / s: no 1 - s cancellation)
//             dx = dz;  db[n] = sum over rows of dz
//
// Why not aten's GELU: on this kind of CPU (AVX2, no AVX-512) aten's tanh-GELU costs ~3.5 ns an element (its
// vectorised tanh); the sigmoid form needs one exp and one division, and the exp below is a branch-free polynomial
// the compiler vectorises inside the loop. x, y, dy, dx are contiguous [rows, N]; y may alias x (in place).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_math.h"
#include "gelu.h"
#include "params.h"
#include "registry.h"

namespace o2s {
namespace {

constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;   // 2 * sqrt(2 / pi)
constexpr float kCubic = 0.044715f;
constexpr int64_t kBiasChunk = 64;                      // rows per dbias partial (fixed: deterministic sums)

// e = exp(-2 u) of z; then s = sigmoid(2 u) = 1 / (1 + e), gelu(z) = z * s, and 1 - s = e * s without the
// cancellation of 1 - s when s is near 1 (the backward multiplies 1 - s by z * du/dz, ~750 at z = 15).
inline float gelu_exp(float z) { return fast_exp(-kTwoSqrt2OverPi * (z + kCubic * z * z * z)); }


template <typename T>
void forward_rows(const GeluParams& p) {
  const int64_t N = p.N;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  std::vector<float> zeros(p.bias ? 0 : N, 0.0f);      // no bias: add zeros (a branch in the loop stops vectorising)
  const float* b = p.bias ? p.bias : zeros.data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < p.rows; ++r) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      const float z = to_float(xr[n]) + b[n];
      yr[n] = from_float<T>(z / (1.0f + gelu_exp(z)));
    }
  }
}

template <typename T>
inline void backward_row(const T* xr, const T* dyr, T* dxr, const float* b, float* acc, int64_t N) {
#pragma omp simd
  for (int64_t n = 0; n < N; ++n) {
    const float z = to_float(xr[n]) + b[n];
    const float e = gelu_exp(z), s = 1.0f / (1.0f + e);
    const float dudz = kTwoSqrt2OverPi * (1.0f + 3.0f * kCubic * z * z);    // d(2u)/dz
    const float one_minus_s = e * s;                                       // e * s first: e may be ~1e38
    const float dz = to_float(dyr[n]) * s * (1.0f + z * one_minus_s * dudz);  // s + z s (1 - s) d(2u)/dz
    dxr[n] = from_float<T>(dz);
    acc[n] += dz;
  }
}

template <typename T>
void backward_rows(const GeluParams& p) {
  const int64_t N = p.N, chunks = (p.rows + kBiasChunk - 1) / kBiasChunk;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.y);
  std::vector<float> zeros(p.bias ? 0 : N, 0.0f);
  const float* b = p.bias ? p.bias : zeros.data();
  // without a bias the row sums still go somewhere (one scratch row per chunk), so the loop has no branch
  std::vector<float> scratch(p.dbias ? 0 : chunks * N);
  float* partials = p.dbias ? p.dbias : scratch.data();
  // One chunk of kBiasChunk rows per task, its dbias partial in its own row of p.dbias: the sum over rows is the
  // same whatever the thread count (the caller adds the partials in a fixed order).
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    float* acc = partials + c * N;
    std::fill(acc, acc + N, 0.0f);
    const int64_t r1 = std::min(p.rows, (c + 1) * kBiasChunk);
    for (int64_t r = c * kBiasChunk; r < r1; ++r)
      backward_row<T>(x + r * N, dy + r * N, dx + r * N, b, acc, N);
  }
}

}  // namespace

void validate(const GeluParams& p, bool backward) {
  const std::string where = backward ? "bias_gelu_backward_cpu: " : "bias_gelu_forward_cpu: ";
  check(p.rows >= 0 && p.N > 0, where + "need rows >= 0 and N >= 1, got rows=" + num(p.rows) + " N=" + num(p.N));
  check(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
        where + "dtype code must be 0, 1 or 2, got " + num(p.dtype));
  if (p.rows == 0) return;
  check(p.x && p.y, where + "null pointer for x or y");
  if (backward) {
    check(p.dy, where + "null pointer for dy");
    check((p.bias == nullptr) == (p.dbias == nullptr), where + "dbias partials go with a bias");
  }
}

static Registrar reg_bias_gelu([](pybind11::module_& m) {
  ParamsClass<GeluParams>(m, "GeluParams", "arguments of bias_gelu_{forward,backward}_cpu (csrc/gelu.h)")
      .field("rows", &GeluParams::rows).field("N", &GeluParams::N).field("x", &GeluParams::x)
      .field("bias", &GeluParams::bias).field("y", &GeluParams::y).field("dy", &GeluParams::dy)
      .field("dbias", &GeluParams::dbias).field("dtype", &GeluParams::dtype);
  m.def(
      "bias_gelu_forward_cpu",
      [](const GeluParams& p) {
        validate(p, false);
        if (p.rows == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, forward_rows<float>, forward_rows<half_t>, forward_rows<bf16_t>);
      },
      pybind11::arg("params"), "fused bias + tanh-GELU, forward (C++ CPU; y may alias x)");
  m.def(
      "bias_gelu_backward_cpu",
      [](const GeluParams& p) {
        validate(p, true);
        if (p.rows == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, backward_rows<float>, backward_rows<half_t>, backward_rows<bf16_t>);
      },
      pybind11::arg("params"), "fused bias + tanh-GELU, backward (C++ CPU): dx (into y) and dbias partials per "
                               "64-row chunk");
  m.attr("bias_gelu_bias_chunk") = kBiasChunk;
});

}  // namespace o2s
