// C++ CPU kernels of the fused q/k RMSNorm + RoPE (omni2sound/ops/qk_norm_rope.py has the math and the
// reference). No CUDA launcher: on a GPU the Triton kernel runs this op.
//
//   per head row x [Dh] of group j (self-attention: q is j = 0, k is j = 1; the cross-attention's q or k alone:
//   one group) at frame t:
//     n = x * rstd * w[j],  rstd = 1 / sqrt(mean(x^2) + eps)
//     y[2i] = n[2i] c - n[2i+1] s,  y[2i+1] = n[2i] s + n[2i+1] c,   (c, s) = cs[t, i]   (no cs: y = n)
//   backward: gn = R^T dy;  dw[j] += gn * xhat;  dx = rstd * (gn w - xhat * mean(gn w xhat))
//
// x is [B, T, G, H, Dh] with any strides except a unit last stride (the model hands the q/k slice of its
// fused qkv projection without a copy); y, dy, dx are contiguous. OpenMP splits tokens (b, t); the inner loops
// are over Dh contiguous floats and vectorise.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "params.h"
#include "qk_norm_rope.h"
#include "registry.h"

namespace o2s {
namespace {


// One head row to float in buf; returns its sum of squares.
template <typename T>
inline float load_row(const T* xr, float* buf, int64_t Dh) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t d = 0; d < Dh; ++d) {
    const float v = to_float(xr[d]);
    buf[d] = v;
    ss += v * v;
  }
  return ss;
}

template <typename T>
void forward_tokens(const QKParams& p) {
  const int64_t Dh = p.Dh, H = p.H, G = p.G, tokens = p.B * p.T;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
#pragma omp parallel
  {
    std::vector<float> buf(Dh);
#pragma omp for schedule(static)
    for (int64_t tok = 0; tok < tokens; ++tok) {
      const int64_t b = tok / p.T, t = tok % p.T;
      const float* cs = p.cs ? p.cs + t * Dh : nullptr;
      for (int64_t j = 0; j < G; ++j) {
        const float* w = p.w + j * Dh;
        for (int64_t h = 0; h < H; ++h) {
          const T* xr = x + b * p.sb + t * p.st + j * p.sj + h * p.sh;
          T* yr = y + ((tok * G + j) * H + h) * Dh;
          const float rstd = 1.0f / std::sqrt(load_row(xr, buf.data(), Dh) / float(Dh) + p.eps);
          if (!cs) {
#pragma omp simd
            for (int64_t d = 0; d < Dh; ++d) yr[d] = from_float<T>(buf[d] * rstd * w[d]);
            continue;
          }
#pragma omp simd
          for (int64_t i = 0; i < Dh / 2; ++i) {
            const float n0 = buf[2 * i] * rstd * w[2 * i], n1 = buf[2 * i + 1] * rstd * w[2 * i + 1];
            const float c = cs[2 * i], s = cs[2 * i + 1];
            yr[2 * i] = from_float<T>(n0 * c - n1 * s);
            yr[2 * i + 1] = from_float<T>(n0 * s + n1 * c);
          }
        }
      }
    }
  }
}

template <typename T>
void backward_tokens(const QKParams& p) {
  const int64_t Dh = p.Dh, H = p.H, G = p.G, tokens = p.B * p.T;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.y);
#pragma omp parallel
  {
    std::vector<float> xh(Dh), gn(Dh);
#pragma omp for schedule(static)
    for (int64_t tok = 0; tok < tokens; ++tok) {
      const int64_t b = tok / p.T, t = tok % p.T;
      const float* cs = p.cs ? p.cs + t * Dh : nullptr;
      for (int64_t j = 0; j < G; ++j) {
        const float* w = p.w + j * Dh;
        float* dw = p.dw_tok + (tok * G + j) * Dh;
        for (int64_t d = 0; d < Dh; ++d) dw[d] = 0.f;
        for (int64_t h = 0; h < H; ++h) {
          const T* xr = x + b * p.sb + t * p.st + j * p.sj + h * p.sh;
          const T* gr = dy + ((tok * G + j) * H + h) * Dh;
          T* dr = dx + ((tok * G + j) * H + h) * Dh;
          const float rstd = 1.0f / std::sqrt(load_row(xr, xh.data(), Dh) / float(Dh) + p.eps);
          float proj = 0.f;
          if (cs) {
#pragma omp simd reduction(+ : proj)
            for (int64_t i = 0; i < Dh / 2; ++i) {
              // the rotation's transpose takes the gradient back to the normalised values n
              const float g0 = to_float(gr[2 * i]), g1 = to_float(gr[2 * i + 1]);
              const float c = cs[2 * i], s = cs[2 * i + 1];
              const float n0 = g0 * c + g1 * s, n1 = -g0 * s + g1 * c;
              const float x0 = xh[2 * i] * rstd, x1 = xh[2 * i + 1] * rstd;
              gn[2 * i] = n0;
              gn[2 * i + 1] = n1;
              xh[2 * i] = x0;
              xh[2 * i + 1] = x1;
              proj += n0 * w[2 * i] * x0 + n1 * w[2 * i + 1] * x1;
            }
          } else {
#pragma omp simd reduction(+ : proj)
            for (int64_t d = 0; d < Dh; ++d) {
              gn[d] = to_float(gr[d]);
              xh[d] *= rstd;
              proj += gn[d] * w[d] * xh[d];
            }
          }
          proj /= float(Dh);
#pragma omp simd
          for (int64_t d = 0; d < Dh; ++d) {
            dw[d] += gn[d] * xh[d];
            dr[d] = from_float<T>(rstd * (gn[d] * w[d] - xh[d] * proj));
          }
        }
      }
    }
  }
}

}  // namespace

void validate(const QKParams& p, bool backward) {
  const std::string where = backward ? "qk_norm_rope_backward_cpu: " : "qk_norm_rope_forward_cpu: ";
  check(p.B >= 0 && p.T >= 0 && (p.G == 1 || p.G == 2) && p.H > 0 && p.Dh > 0,
        where + "need B, T >= 0, G in {1, 2}, H, Dh >= 1, got B=" + num(p.B) + " T=" + num(p.T) + " G=" + num(p.G) +
            " H=" + num(p.H) + " Dh=" + num(p.Dh));
  check(p.Dh % 2 == 0 || !p.cs, where + "RoPE needs an even head dim, got Dh=" + num(p.Dh));
  check(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
        where + "dtype code must be 0, 1 or 2, got " + num(p.dtype));
  check(std::isfinite(p.eps) && p.eps >= 0.f, where + "eps must be finite and >= 0");
  if (p.B * p.T == 0) return;
  check(p.x && p.w && p.y, where + "null pointer among x, w, y");
  check(p.sb >= 0 && p.st >= 0 && p.sj >= 0 && p.sh >= 0, where + "strides must be >= 0");
  if (backward) check(p.dy && p.dw_tok, where + "null pointer for dy or dw_tok");
}

static Registrar reg_qk_norm_rope([](pybind11::module_& m) {
  ParamsClass<QKParams>(m, "QKParams", "arguments of qk_norm_rope_{forward,backward}_cpu (csrc/qk_norm_rope.h)")
      .field("B", &QKParams::B).field("T", &QKParams::T).field("G", &QKParams::G).field("H", &QKParams::H)
      .field("Dh", &QKParams::Dh).field("sb", &QKParams::sb).field("st", &QKParams::st).field("sj", &QKParams::sj)
      .field("sh", &QKParams::sh).field("x", &QKParams::x).field("w", &QKParams::w).field("cs", &QKParams::cs)
      .field("y", &QKParams::y).field("dy", &QKParams::dy).field("dw_tok", &QKParams::dw_tok)
      .field("eps", &QKParams::eps).field("dtype", &QKParams::dtype);
  m.def(
      "qk_norm_rope_forward_cpu",
      [](const QKParams& p) {
        validate(p, false);
        if (p.B * p.T == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, forward_tokens<float>, forward_tokens<half_t>, forward_tokens<bf16_t>);
      },
      pybind11::arg("params"), "fused q/k RMSNorm [+ RoPE], forward (C++ CPU); G = 1 or 2 head groups, cs = 0: no "
                               "rotation");
  m.def(
      "qk_norm_rope_backward_cpu",
      [](const QKParams& p) {
        validate(p, true);
        if (p.B * p.T == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, backward_tokens<float>, backward_tokens<half_t>, backward_tokens<bf16_t>);
      },
      pybind11::arg("params"), "fused q/k RMSNorm + RoPE, backward (C++ CPU): dx (into y) and per-token "
                               "weight-gradient partials");
});

}  // namespace o2s
