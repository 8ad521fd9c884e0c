// Host side of the Snake ops (omni2sound/ops/snake.py): argument checks, the C++ CPU kernels and the bindings
// of the CPU and CUDA entry points.
//
//   forward   s = x (+ residual);  y = s + q * sin^2(alpha * s),  q = 1 / (beta + eps)   (per channel c)
//   backward  ds = dy * (1 + q * alpha * sin(2 alpha s)) (+ ds_out)
//             dalpha[b, c] = sum_t dy * q * s * sin(2 alpha s);  dbeta[b, c] = -sum_t dy * q^2 * sin^2(alpha s)
//
// Tensors are contiguous [B, C, T]; a row r = b * C + c is T contiguous elements sharing alpha[c], beta[c].
// OpenMP splits rows; inside a row the loop is branch-free so the compiler vectorises it, which needs a sin the
// compiler can inline: fast_sincos below (glibc's vector sin is only exposed under -ffast-math).
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
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

void check_common(int64_t B, int64_t C, int64_t T, uintptr_t alpha, uintptr_t beta, double eps, int dtype) {
  check(B >= 0 && C >= 0 && T >= 0, "snake: B, C, T must be >= 0, got " + std::to_string(B) + ", " +
                                        std::to_string(C) + ", " + std::to_string(T));
  check(dtype >= kFloat32 && dtype <= kBFloat16, "snake: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                                     std::to_string(dtype));
  check(alpha != 0 && beta != 0, "snake: alpha and beta pointers must be non-null");
  check(std::isfinite(eps) && eps >= 0, "snake: eps must be finite and >= 0");
}

SnakeParams make_fwd(int64_t B, int64_t C, int64_t T, uintptr_t x, uintptr_t residual, uintptr_t alpha,
                     uintptr_t beta, uintptr_t s, uintptr_t y, double eps, int dtype, int channels_last = 0) {
  check_common(B, C, T, alpha, beta, eps, dtype);
  check(x != 0 && y != 0, "snake_forward: x and y pointers must be non-null");
  check(residual == 0 || s != 0, "snake_forward: with a residual, the s output pointer must be non-null");
  SnakeParams p;
  p.B = B; p.C = C; p.T = T;
  p.x = reinterpret_cast<const void*>(x);
  p.residual = reinterpret_cast<const void*>(residual);
  p.alpha = reinterpret_cast<const float*>(alpha);
  p.beta = reinterpret_cast<const float*>(beta);
  p.s = reinterpret_cast<void*>(s);
  p.y = reinterpret_cast<void*>(y);
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  p.channels_last = channels_last;
  return p;
}

SnakeBwdParams make_bwd(int64_t B, int64_t C, int64_t T, uintptr_t dy, uintptr_t ds_out, uintptr_t s,
                        uintptr_t residual, uintptr_t alpha, uintptr_t beta, uintptr_t ds, uintptr_t dalpha_rows,
                        uintptr_t dbeta_rows, double eps, int dtype) {
  check_common(B, C, T, alpha, beta, eps, dtype);
  check(dy != 0 && s != 0 && ds != 0, "snake_backward: dy, s and ds pointers must be non-null");
  check(dalpha_rows != 0 && dbeta_rows != 0, "snake_backward: dalpha_rows and dbeta_rows must be non-null");
  SnakeBwdParams p;
  p.B = B; p.C = C; p.T = T;
  p.dy = reinterpret_cast<const void*>(dy);
  p.ds_out = reinterpret_cast<const void*>(ds_out);
  p.s = reinterpret_cast<const void*>(s);
  p.residual = reinterpret_cast<const void*>(residual);
  p.alpha = reinterpret_cast<const float*>(alpha);
  p.beta = reinterpret_cast<const float*>(beta);
  p.ds = reinterpret_cast<void*>(ds);
  p.dalpha_rows = reinterpret_cast<float*>(dalpha_rows);
  p.dbeta_rows = reinterpret_cast<float*>(dbeta_rows);
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  return p;
}

}  // namespace

static Registrar reg_snake([](pybind11::module_& m) {
  m.def(
      "snake_forward_cpu",
      [](int64_t B, int64_t C, int64_t T, uintptr_t x, uintptr_t residual, uintptr_t alpha, uintptr_t beta,
         uintptr_t s, uintptr_t y, double eps, int dtype, uintptr_t /*stream*/, int channels_last) {
        auto p = make_fwd(B, C, T, x, residual, alpha, beta, s, y, eps, dtype, channels_last);
        pybind11::gil_scoped_release nogil;
        if (channels_last)
          by_dtype(p, forward_rows_cl<float>, forward_rows_cl<half_t>, forward_rows_cl<bf16_t>);
        else
          by_dtype(p, forward_rows<float>, forward_rows<half_t>, forward_rows<bf16_t>);
      },
      pybind11::arg("B"), pybind11::arg("C"), pybind11::arg("T"), pybind11::arg("x"), pybind11::arg("residual"),
      pybind11::arg("alpha"), pybind11::arg("beta"), pybind11::arg("s"), pybind11::arg("y"), pybind11::arg("eps"),
      pybind11::arg("dtype"), pybind11::arg("stream"), pybind11::arg("channels_last") = 0,
      "Snake [fused with the residual add], C++ CPU. x, residual, s, y dense [B, C, T] (channels_last=1: stored as "
      "[B, T, C]); alpha, beta fp32 [C].");
  m.def(
      "snake_backward_cpu",
      [](int64_t B, int64_t C, int64_t T, uintptr_t dy, uintptr_t ds_out, uintptr_t s, uintptr_t residual,
         uintptr_t alpha, uintptr_t beta, uintptr_t ds, uintptr_t dalpha_rows, uintptr_t dbeta_rows, double eps, int dtype,
         uintptr_t /*stream*/) {
        auto p = make_bwd(B, C, T, dy, ds_out, s, residual, alpha, beta, ds, dalpha_rows, dbeta_rows, eps, dtype);
        pybind11::gil_scoped_release nogil;
        by_dtype(p, backward_rows<float>, backward_rows<half_t>, backward_rows<bf16_t>);
      },
      "Backward of the Snake ops, C++ CPU: ds and per-row fp32 partial sums of dalpha, dbeta [B, C].");
#ifdef OMNI2SOUND_WITH_CUDA
  m.def(
      "snake_forward_cuda",
      [](int64_t B, int64_t C, int64_t T, uintptr_t x, uintptr_t residual, uintptr_t alpha, uintptr_t beta,
         uintptr_t s, uintptr_t y, double eps, int dtype, uintptr_t stream) {
        auto p = make_fwd(B, C, T, x, residual, alpha, beta, s, y, eps, dtype);
        snake_forward_cuda_launch(p, stream);
      },
      "Snake [fused with the residual add], CUDA, on the given stream.");
  m.def(
      "snake_backward_cuda",
      [](int64_t B, int64_t C, int64_t T, uintptr_t dy, uintptr_t ds_out, uintptr_t s, uintptr_t residual,
         uintptr_t alpha, uintptr_t beta, uintptr_t ds, uintptr_t dalpha_rows, uintptr_t dbeta_rows, double eps, int dtype,
         uintptr_t stream) {
        auto p = make_bwd(B, C, T, dy, ds_out, s, residual, alpha, beta, ds, dalpha_rows, dbeta_rows, eps, dtype);
        snake_backward_cuda_launch(p, stream);
      },
      "Backward of the Snake ops, CUDA, on the given stream.");
#endif
});

}  // namespace o2s
