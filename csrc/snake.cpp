// Host side of the Snake ops (omni2sound/ops/snake.py): the checks of the parameters (snake.h), the C++ CPU kernels and the bindings
// of the CPU and CUDA entry points.
//
//   forward   s = x (+ residual);  y = s + q * sin^2(alpha * s),  q = 1 / (beta + eps)   (per channel c)
//   backward  ds = dy * (1 + q * alpha * sin(2 alpha s)) (+ ds_out)
//             dalpha[b, c] = sum_t dy * q * s * sin(2 alpha s);  dbeta[b, c] = -sum_t dy * q^2 * sin^2(alpha s)
//
// Tensors are contiguous [B, C, T]; a row r = b * C + c is T contiguous elements sharing alpha[c], beta[c].
// OpenMP splits rows; inside a row the loop is branch-free so the compiler vectorises it, which needs a sin the
// compiler can inline: fast_sincos below (glibc's vector sin is only exposed under -ffast-math).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "params.h"
#include "registry.h"
#include "snake.h"

namespace o2s {

#ifdef OMNI2SOUND_WITH_CUDA
void snake_forward_cuda_launch(const SnakeParams& p, stream_handle stream);
void snake_backward_cuda_launch(const SnakeBwdParams& p, stream_handle stream);
#endif

namespace {

// sin and cos of x in fp32, branch-free so loops over it vectorise. Reduce x = k * pi + r with |r| <= pi / 2
// (pi split in three parts: exact k * pi_hi for |k| < 2^12), then Taylor series to r^11 / r^12: error below
// 6e-8 on [-pi/2, pi/2], i.e. about one fp32 ulp for arguments |x| < ~1e3 (Snake sees |alpha * x| of a few units).
inline void fast_sincos(float x, float& s, float& c) {
  const float k = std::nearbyint(x * 0.318309886183790671f);
  float r = x - k * 3.140625f;
  r = r - k * 9.67502593994140625e-4f;
  r = r - k * 1.509957990978376432e-7f;
  // Past |x| ~ 1e4 the reduction is inexact and r leaves [-pi/2, pi/2], where the series grows without bound
  // (|x| = 1e10 gave inf); no fp32 sin is meaningful there, but Snake's sin^2 term must stay bounded, so r is held
  // to the series' interval (NaN passes). Below that |r| <= pi/2 already (to rounding), so the results are
  // unchanged. The outputs are not clamped instead: that also changes how the compiler contracts the callers'
  // products with them, i.e. every trained model's numerics.
  r = std::min(std::max(r, -1.57079637f), 1.57079637f);
  const float r2 = r * r;
  float ps = -2.50521083854417187751e-8f;                 // -1/11!
  ps = ps * r2 + 2.75573192239858906526e-6f;              // 1/9!
  ps = ps * r2 - 1.98412698412698412698e-4f;              // -1/7!
  ps = ps * r2 + 8.33333333333333333333e-3f;              // 1/5!
  ps = ps * r2 - 1.66666666666666666667e-1f;              // -1/3!
  const float sr = r + r * r2 * ps;
  float pc = 2.08767569878680989792e-9f;                  // 1/12!
  pc = pc * r2 - 2.75573192239858906526e-7f;              // -1/10!
  pc = pc * r2 + 2.48015873015873015873e-5f;              // 1/8!
  pc = pc * r2 - 1.38888888888888888889e-3f;              // -1/6!
  pc = pc * r2 + 4.16666666666666666667e-2f;              // 1/4!
  pc = pc * r2 - 0.5f;                                    // -1/2!
  const float cr = 1.0f + r2 * pc;
  const float sign = (static_cast<int32_t>(k) & 1) ? -1.0f : 1.0f;   // sin, cos change sign every pi
  s = sign * sr;
  c = sign * cr;
}

template <typename T>
void forward_rows(const SnakeParams& p) {
  const int64_t rows = p.B * p.C, L = p.T;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* s_out = static_cast<T*>(p.s);
  T* y = static_cast<T*>(p.y);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = r % p.C;
    const float a = p.alpha[c], q = 1.0f / (p.beta[c] + p.eps);
    const T* xr = x + r * L;
    T* yr = y + r * L;
    if (res) {
      const T* rr = res + r * L;
      T* sr = s_out + r * L;
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) {
        const float v = to_float(xr[t]) + to_float(rr[t]);
        float sn, cs;
        fast_sincos(a * v, sn, cs);
        sr[t] = from_float<T>(v);
        yr[t] = from_float<T>(v + q * sn * sn);
      }
    } else {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) {
        const float v = to_float(xr[t]);
        float sn, cs;
        fast_sincos(a * v, sn, cs);
        yr[t] = from_float<T>(v + q * sn * sn);
      }
    }
  }
}

// Channels-last layout: memory [B, T, C], so a row is one time step over all channels, alpha[c] varying along it.
template <typename T>
void forward_rows_cl(const SnakeParams& p) {
  const int64_t rows = p.B * p.T, C = p.C;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  T* s_out = static_cast<T*>(p.s);
  T* y = static_cast<T*>(p.y);
  std::vector<float> qv(C);
  for (int64_t c = 0; c < C; ++c) qv[c] = 1.0f / (p.beta[c] + p.eps);
  const float* q = qv.data();
  const float* alpha = p.alpha;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    if (res) {
      const T* rr = res + r * C;
      T* sr = s_out + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float v = to_float(xr[c]) + to_float(rr[c]);
        float sn, cs;
        fast_sincos(alpha[c] * v, sn, cs);
        sr[c] = from_float<T>(v);
        yr[c] = from_float<T>(v + q[c] * sn * sn);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float v = to_float(xr[c]);
        float sn, cs;
        fast_sincos(alpha[c] * v, sn, cs);
        yr[c] = from_float<T>(v + q[c] * sn * sn);
      }
    }
  }
}

template <typename T>
void backward_rows(const SnakeBwdParams& p) {
  const int64_t rows = p.B * p.C, L = p.T;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dso = static_cast<const T*>(p.ds_out);
  const T* s = static_cast<const T*>(p.s);
  const T* res = static_cast<const T*>(p.residual);
  T* ds = static_cast<T*>(p.ds);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = r % p.C;
    const float a = p.alpha[c], q = 1.0f / (p.beta[c] + p.eps);
    const T* gr = dy + r * L;
    const T* sr = s + r * L;
    T* dr = ds + r * L;
    const T* or_ = dso ? dso + r * L : nullptr;
    const T* rr = res ? res + r * L : nullptr;
    float da = 0.f, db = 0.f;
#pragma omp simd reduction(+ : da, db)
    for (int64_t t = 0; t < L; ++t) {
      const float v = to_float(sr[t]) + (rr ? to_float(rr[t]) : 0.f), g = to_float(gr[t]);
      float sn, cs;
      fast_sincos(a * v, sn, cs);
      const float sin2 = 2.0f * sn * cs;                  // sin(2 alpha s)
      float d = g * (1.0f + q * a * sin2);
      if (or_) d += to_float(or_[t]);
      dr[t] = from_float<T>(d);
      da += g * v * sin2;
      db += g * sn * sn;
    }
    p.dalpha_rows[r] = q * da;
    p.dbeta_rows[r] = -q * q * db;
  }
}

}  // namespace

namespace {
void check_common(const char* where, int64_t B, int64_t C, int64_t T, const float* alpha, const float* beta,
                  float eps, int dtype) {
  const std::string w = where;
  check(B >= 0 && C >= 0 && T >= 0, w + "B, C, T must be >= 0, got " + num(B) + ", " + num(C) + ", " + num(T));
  check(dtype >= kFloat32 && dtype <= kBFloat16, w + "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                                     num(dtype));
  check(alpha != nullptr && beta != nullptr, w + "alpha and beta pointers must be non-null");
  check(std::isfinite(eps) && eps >= 0, w + "eps must be finite and >= 0");
}
}  // namespace

void validate(const SnakeParams& p) {
  check_common("snake_forward: ", p.B, p.C, p.T, p.alpha, p.beta, p.eps, p.dtype);
  check(p.x && p.y, "snake_forward: x and y pointers must be non-null");
  check(!p.residual || p.s, "snake_forward: with a residual, the s output pointer must be non-null");
  check(p.channels_last == 0 || p.channels_last == 1, "snake_forward: channels_last must be 0 or 1");
}

void validate(const SnakeBwdParams& p) {
  check_common("snake_backward: ", p.B, p.C, p.T, p.alpha, p.beta, p.eps, p.dtype);
  check(p.dy && p.s && p.ds, "snake_backward: dy, s and ds pointers must be non-null");
  check(p.dalpha_rows && p.dbeta_rows, "snake_backward: dalpha_rows and dbeta_rows must be non-null");
}

static Registrar reg_snake([](pybind11::module_& m) {
  ParamsClass<SnakeParams>(m, "SnakeParams", "arguments of snake_forward_{cpu,cuda} (csrc/snake.h)")
      .field("B", &SnakeParams::B).field("C", &SnakeParams::C).field("T", &SnakeParams::T)
      .field("x", &SnakeParams::x).field("residual", &SnakeParams::residual).field("alpha", &SnakeParams::alpha)
      .field("beta", &SnakeParams::beta).field("s", &SnakeParams::s).field("y", &SnakeParams::y)
      .field("eps", &SnakeParams::eps).field("dtype", &SnakeParams::dtype)
      .field("channels_last", &SnakeParams::channels_last);
  ParamsClass<SnakeBwdParams>(m, "SnakeBwdParams", "arguments of snake_backward_{cpu,cuda} (csrc/snake.h)")
      .field("B", &SnakeBwdParams::B).field("C", &SnakeBwdParams::C).field("T", &SnakeBwdParams::T)
      .field("dy", &SnakeBwdParams::dy).field("ds_out", &SnakeBwdParams::ds_out).field("s", &SnakeBwdParams::s)
      .field("residual", &SnakeBwdParams::residual).field("alpha", &SnakeBwdParams::alpha)
      .field("beta", &SnakeBwdParams::beta).field("ds", &SnakeBwdParams::ds)
      .field("dalpha_rows", &SnakeBwdParams::dalpha_rows).field("dbeta_rows", &SnakeBwdParams::dbeta_rows)
      .field("eps", &SnakeBwdParams::eps).field("dtype", &SnakeBwdParams::dtype);
  m.def(
      "snake_forward_cpu",
      [](const SnakeParams& p) {
        validate(p);
        if (p.B * p.C * p.T == 0) return;
        pybind11::gil_scoped_release nogil;
        if (p.channels_last)
          by_dtype(p, forward_rows_cl<float>, forward_rows_cl<half_t>, forward_rows_cl<bf16_t>);
        else
          by_dtype(p, forward_rows<float>, forward_rows<half_t>, forward_rows<bf16_t>);
      },
      pybind11::arg("params"),
      "Snake [fused with the residual add], C++ CPU. x, residual, s, y dense [B, C, T] (channels_last=1: stored as "
      "[B, T, C]); alpha, beta fp32 [C].");
  m.def(
      "snake_backward_cpu",
      [](const SnakeBwdParams& p) {
        validate(p);
        if (p.B * p.C * p.T == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, backward_rows<float>, backward_rows<half_t>, backward_rows<bf16_t>);
      },
      pybind11::arg("params"),
      "Backward of the Snake ops, C++ CPU: ds and per-row fp32 partial sums of dalpha, dbeta [B, C].");
#ifdef OMNI2SOUND_WITH_CUDA
  m.def(
      "snake_forward_cuda",
      [](const SnakeParams& p, stream_handle stream) {
        validate(p);
        check(!p.channels_last, "snake_forward_cuda: channels_last memory runs on the CPU only");
        if (p.B * p.C * p.T == 0) return;
        snake_forward_cuda_launch(p, stream);
      },
      pybind11::arg("params"), pybind11::arg("stream"), "Snake [fused with the residual add], CUDA, on the given stream.");
  m.def(
      "snake_backward_cuda",
      [](const SnakeBwdParams& p, stream_handle stream) {
        validate(p);
        if (p.B * p.C * p.T == 0) return;
        snake_backward_cuda_launch(p, stream);
      },
      pybind11::arg("params"), pybind11::arg("stream"), "Backward of the Snake ops, CUDA, on the given stream.");
#endif
});

}  // namespace o2s
