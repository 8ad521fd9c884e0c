// Host side of the AdaLN family: argument checks, the C++ CPU kernels (OpenMP across rows, loops the
// compiler vectorises, fp32 statistics) and the bindings of the CPU and CUDA entry points.
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "registry.h"

namespace o2s {

#ifdef OMNI2SOUND_WITH_CUDA
void adaln_forward_cuda_launch(const AdaLNParams& p, stream_handle stream);
void adaln_backward_cuda_launch(const AdaLNBwdParams& p, stream_handle stream);
#endif

namespace {

// One modulation row in fp32: a [+ a2] (a2 null: no second addend).
template <typename T>
inline void mod_row(float* out, const T* a, const T* a2, int64_t D) {
  if (a2) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = to_float(a[d]) + to_float(a2[d]);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = to_float(a[d]);
  }
}

template <typename T>
const T* row_or_null(const void* base, int64_t b, int64_t l, int64_t sb, int64_t sl) {
  return base ? static_cast<const T*>(base) + b * sb + l * sl : nullptr;
}

// Asks for the cache lines of one row of D elements of T (null: nothing), so the next row's loads are in flight while
// this row's statistics are computed from L1: without it the passes that read memory and the passes that only
// compute alternate, and neither overlaps the other (the per-token layout streams five rows per token).
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  if (!row) return;
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = D * int64_t(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// The row's modulation in fp32: the tensor itself when it is fp32 with no second addend (no copy), else summed /
// converted into buf.
template <typename T>
inline const float* mod_ptr(float* buf, const T* a, const T* a2, int64_t D) {
  if constexpr (std::is_same<T, float>::value) {
    if (!a2) return a;
  }
  mod_row(buf, a, a2, D);
  return buf;
}

template <typename T>
void forward_rows(const AdaLNParams& p) {
  const int64_t rows = p.B * p.L, D = p.D;
  const T* x = static_cast<const T*>(p.x);
  const T* h = static_cast<const T*>(p.h);
  const T* gate = static_cast<const T*>(p.gate);
  const T* shift = static_cast<const T*>(p.shift);
  const T* scale = static_cast<const T*>(p.scale);
  T* x2 = static_cast<T*>(p.x2);
  T* y = static_cast<T*>(p.y);
  // Row r's modulation rows (second addends: null when absent).
  auto mods = [&](int64_t r, const T** m) {
    const int64_t b = r / p.L, l = r % p.L;
    m[0] = h ? gate + b * p.gate_sb + l * p.gate_sl : nullptr;
    m[1] = h ? row_or_null<T>(p.gate2, b, l, p.gate2_sb, p.gate2_sl) : nullptr;
    m[2] = shift + b * p.shift_sb + l * p.shift_sl;
    m[3] = row_or_null<T>(p.shift2, b, l, p.shift2_sb, p.shift2_sl);
    m[4] = scale + b * p.scale_sb + l * p.scale_sl;
    m[5] = row_or_null<T>(p.scale2, b, l, p.scale2_sb, p.scale2_sl);
  };
#pragma omp parallel
  {
    std::vector<float> buf(4 * D);
    float* v = buf.data();
    float* gb = v + D;       // the row's gate, shift and scale in fp32 when they need a sum or a conversion
    float* shb = v + 2 * D;
    float* scb = v + 3 * D;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* m[6];
      mods(r, m);
      if (r + 1 < rows) {
        const T* mn[6];
        mods(r + 1, mn);
        prefetch_row(x + (r + 1) * D, D);
        prefetch_row(h ? h + (r + 1) * D : nullptr, D);
        for (int k = 0; k < 6; ++k)
          if (mn[k] != m[k]) prefetch_row(mn[k], D);   // per-sample rows are already in cache
      }
      const T* xr = x + r * D;
      float s = 0.f;
      if (h) {
        const T* hr = h + r * D;
        const float* gm = mod_ptr(gb, m[0], m[1], D);
        T* x2r = x2 + r * D;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) {
          v[d] = to_float(xr[d]) + gm[d] * to_float(hr[d]);
          x2r[d] = from_float<T>(v[d]);
          s += v[d];
        }
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) {
          v[d] = to_float(xr[d]);
          s += v[d];
        }
      }
      // Variance about the mean over the cached row: exact enough in fp32 even for |x| ~ 1e4, unlike
      // E[x^2]-E[x]^2.
      const float mean = s / float(D);
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) {
        const float c = v[d] - mean;
        ss += c * c;
      }
      const float rstd = 1.0f / std::sqrt(ss / float(D) + p.eps);
      p.mean[r] = mean;
      p.rstd[r] = rstd;
      const float* shm = mod_ptr(shb, m[2], m[3], D);
      const float* scm = mod_ptr(scb, m[4], m[5], D);
      T* yr = y + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) yr[d] = from_float<T>((v[d] - mean) * rstd * (1.0f + scm[d]) + shm[d]);
    }
  }
}

template <typename T>
void backward_rows(const AdaLNBwdParams& p) {
  const int64_t rows = p.B * p.L, D = p.D;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dx2_in = static_cast<const T*>(p.dx2_in);
  const T* xin = static_cast<const T*>(p.xin);
  const T* h = static_cast<const T*>(p.h);
  const T* gate = static_cast<const T*>(p.gate);
  const T* scale = static_cast<const T*>(p.scale);
  T* dxin = static_cast<T*>(p.dxin);
  T* dh = static_cast<T*>(p.dh);
  T* dgate_tok = static_cast<T*>(p.dgate_tok);
  T* dscale_tok = static_cast<T*>(p.dscale_tok);
#pragma omp parallel
  {
    std::vector<float> buf(4 * D);
    float* xhat = buf.data();
    float* g = buf.data() + D;
    float* scm = buf.data() + 2 * D;   // the row's scale and gate in fp32 (both addends summed)
    float* gm = buf.data() + 3 * D;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.L, l = r % p.L;
      const float mean = p.mean[r], rstd = p.rstd[r];
      const T* xr = xin + r * D;
      const T* dyr = dy + r * D;
      mod_row(scm, scale + b * p.scale_sb + l * p.scale_sl, row_or_null<T>(p.scale2, b, l, p.scale2_sb, p.scale2_sl),
              D);
      float sg = 0.f, sgx = 0.f;
#pragma omp simd reduction(+ : sg, sgx)
      for (int64_t d = 0; d < D; ++d) {
        xhat[d] = (to_float(xr[d]) - mean) * rstd;
        g[d] = to_float(dyr[d]) * (1.0f + scm[d]);
        sg += g[d];
        sgx += g[d] * xhat[d];
      }
      if (dscale_tok) {
        T* dsc = dscale_tok + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dsc[d] = from_float<T>(to_float(dyr[d]) * xhat[d]);
      }
      const float mg = sg / float(D), mgx = sgx / float(D);
      T* dxr = dxin + r * D;
      const T* d2r = dx2_in ? dx2_in + r * D : nullptr;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        g[d] = rstd * (g[d] - mg - xhat[d] * mgx) + (d2r ? to_float(d2r[d]) : 0.f);   // g becomes dx (fp32)
        dxr[d] = from_float<T>(g[d]);
      }
      if (h) {
        const T* hr = h + r * D;
        mod_row(gm, gate + b * p.gate_sb + l * p.gate_sl, row_or_null<T>(p.gate2, b, l, p.gate2_sb, p.gate2_sl), D);
        T* dhr = dh + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dhr[d] = from_float<T>(gm[d] * g[d]);
        if (dgate_tok) {
          T* dgt = dgate_tok + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dgt[d] = from_float<T>(to_float(hr[d]) * g[d]);
        }
      }
    }
  }
}

void check_common(int64_t B, int64_t L, int64_t D, int dtype) {
  check(B >= 0 && L >= 0 && D >= 1, "adaln: need B, L >= 0 and D >= 1");
  check(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, "adaln: dtype code must be 0, 1 or 2");
}

// Second addends: three pointers (0: none) and their (stride over B, stride over L) pairs.
struct Mod2 {
  uintptr_t gate = 0, shift = 0, scale = 0;
  int64_t gsb = 0, gsl = 0, ssb = 0, ssl = 0, csb = 0, csl = 0;
};

AdaLNParams make_fwd(int64_t B, int64_t L, int64_t D, uintptr_t x, uintptr_t h, uintptr_t gate, uintptr_t shift,
                     uintptr_t scale, int64_t gsb, int64_t gsl, int64_t ssb, int64_t ssl, int64_t csb, int64_t csl,
                     const Mod2& m2, uintptr_t x2, uintptr_t y, uintptr_t mean, uintptr_t rstd, double eps,
                     int dtype) {
  check_common(B, L, D, dtype);
  check(x && shift && scale && y && mean && rstd, "adaln_forward: null pointer");
  check(!h || (gate && x2), "adaln_forward: gated form needs gate and x2");
  AdaLNParams p;
  p.B = B; p.L = L; p.D = D;
  p.x = reinterpret_cast<const void*>(x);
  p.h = reinterpret_cast<const void*>(h);
  p.gate = reinterpret_cast<const void*>(gate);
  p.shift = reinterpret_cast<const void*>(shift);
  p.scale = reinterpret_cast<const void*>(scale);
  p.gate_sb = gsb; p.gate_sl = gsl; p.shift_sb = ssb; p.shift_sl = ssl; p.scale_sb = csb; p.scale_sl = csl;
  check(!m2.gate || h, "adaln_forward: gate2 without the gated form");
  p.gate2 = reinterpret_cast<const void*>(m2.gate);
  p.shift2 = reinterpret_cast<const void*>(m2.shift);
  p.scale2 = reinterpret_cast<const void*>(m2.scale);
  p.gate2_sb = m2.gsb; p.gate2_sl = m2.gsl; p.shift2_sb = m2.ssb; p.shift2_sl = m2.ssl;
  p.scale2_sb = m2.csb; p.scale2_sl = m2.csl;
  p.x2 = reinterpret_cast<void*>(x2);
  p.y = reinterpret_cast<void*>(y);
  p.mean = reinterpret_cast<float*>(mean);
  p.rstd = reinterpret_cast<float*>(rstd);
  p.eps = float(eps);
  p.dtype = dtype;
  return p;
}

AdaLNBwdParams make_bwd(int64_t B, int64_t L, int64_t D, uintptr_t dy, uintptr_t dx2_in, uintptr_t xin,
                        uintptr_t h, uintptr_t gate, uintptr_t scale, int64_t gsb, int64_t gsl, int64_t csb,
                        int64_t csl, const Mod2& m2, uintptr_t mean, uintptr_t rstd, uintptr_t dxin, uintptr_t dh,
                        uintptr_t dgate_tok, uintptr_t dscale_tok, int dtype) {
  check_common(B, L, D, dtype);
  check(dy && xin && scale && mean && rstd && dxin, "adaln_backward: null pointer");
  check(!h || (gate && dh), "adaln_backward: gated form needs gate and dh");
  check(h || !dgate_tok, "adaln_backward: dgate_tok without the gated form");
  AdaLNBwdParams p;
  p.B = B; p.L = L; p.D = D;
  p.dy = reinterpret_cast<const void*>(dy);
  p.dx2_in = reinterpret_cast<const void*>(dx2_in);
  p.xin = reinterpret_cast<const void*>(xin);
  p.h = reinterpret_cast<const void*>(h);
  p.gate = reinterpret_cast<const void*>(gate);
  p.scale = reinterpret_cast<const void*>(scale);
  p.gate_sb = gsb; p.gate_sl = gsl; p.scale_sb = csb; p.scale_sl = csl;
  check(!m2.gate || h, "adaln_backward: gate2 without the gated form");
  p.gate2 = reinterpret_cast<const void*>(m2.gate);
  p.scale2 = reinterpret_cast<const void*>(m2.scale);
  p.gate2_sb = m2.gsb; p.gate2_sl = m2.gsl; p.scale2_sb = m2.csb; p.scale2_sl = m2.csl;
  p.mean = reinterpret_cast<const float*>(mean);
  p.rstd = reinterpret_cast<const float*>(rstd);
  p.dxin = reinterpret_cast<void*>(dxin);
  p.dh = reinterpret_cast<void*>(dh);
  p.dgate_tok = reinterpret_cast<void*>(dgate_tok);
  p.dscale_tok = reinterpret_cast<void*>(dscale_tok);
  p.dtype = dtype;
  return p;
}

}  // namespace

static Registrar reg_adaln([](pybind11::module_& m) {
  m.def(
      "adaln_forward_cpu",
      [](int64_t B, int64_t L, int64_t D, uintptr_t x, uintptr_t h, uintptr_t gate, uintptr_t shift,
         uintptr_t scale, int64_t gsb, int64_t gsl, int64_t ssb, int64_t ssl, int64_t csb, int64_t csl,
         uintptr_t gate2, uintptr_t shift2, uintptr_t scale2, int64_t g2sb, int64_t g2sl, int64_t s2sb,
         int64_t s2sl, int64_t c2sb, int64_t c2sl,
         uintptr_t x2, uintptr_t y, uintptr_t mean, uintptr_t rstd, double eps, int dtype, uintptr_t /*stream*/) {
        const Mod2 m2{gate2, shift2, scale2, g2sb, g2sl, s2sb, s2sl, c2sb, c2sl};
        auto p = make_fwd(B, L, D, x, h, gate, shift, scale, gsb, gsl, ssb, ssl, csb, csl, m2, x2, y, mean, rstd,
                          eps, dtype);
        pybind11::gil_scoped_release nogil;
        by_dtype(p, forward_rows<float>, forward_rows<half_t>, forward_rows<bf16_t>);
      },
      "Fused [gated residual ->] LayerNorm -> modulate, C++ CPU. Pointers/strides as integers.");
  m.def(
      "adaln_backward_cpu",
      [](int64_t B, int64_t L, int64_t D, uintptr_t dy, uintptr_t dx2_in, uintptr_t xin, uintptr_t h,
         uintptr_t gate, uintptr_t scale, int64_t gsb, int64_t gsl, int64_t csb, int64_t csl, uintptr_t gate2,
         uintptr_t scale2, int64_t g2sb, int64_t g2sl, int64_t c2sb, int64_t c2sl, uintptr_t mean,
         uintptr_t rstd, uintptr_t dxin, uintptr_t dh, uintptr_t dgate_tok, uintptr_t dscale_tok, int dtype,
         uintptr_t /*stream*/) {
        Mod2 m2;
        m2.gate = gate2; m2.scale = scale2; m2.gsb = g2sb; m2.gsl = g2sl; m2.csb = c2sb; m2.csl = c2sl;
        auto p = make_bwd(B, L, D, dy, dx2_in, xin, h, gate, scale, gsb, gsl, csb, csl, m2, mean, rstd, dxin, dh,
                          dgate_tok, dscale_tok, dtype);
        pybind11::gil_scoped_release nogil;
        by_dtype(p, backward_rows<float>, backward_rows<half_t>, backward_rows<bf16_t>);
      },
      "Backward of the fused AdaLN family, C++ CPU.");
#ifdef OMNI2SOUND_WITH_CUDA
  m.def(
      "adaln_forward_cuda",
      [](int64_t B, int64_t L, int64_t D, uintptr_t x, uintptr_t h, uintptr_t gate, uintptr_t shift,
         uintptr_t scale, int64_t gsb, int64_t gsl, int64_t ssb, int64_t ssl, int64_t csb, int64_t csl,
         uintptr_t gate2, uintptr_t shift2, uintptr_t scale2, int64_t g2sb, int64_t g2sl, int64_t s2sb,
         int64_t s2sl, int64_t c2sb, int64_t c2sl,
         uintptr_t x2, uintptr_t y, uintptr_t mean, uintptr_t rstd, double eps, int dtype, uintptr_t stream) {
        const Mod2 m2{gate2, shift2, scale2, g2sb, g2sl, s2sb, s2sl, c2sb, c2sl};
        auto p = make_fwd(B, L, D, x, h, gate, shift, scale, gsb, gsl, ssb, ssl, csb, csl, m2, x2, y, mean, rstd,
                          eps, dtype);
        adaln_forward_cuda_launch(p, stream);
      },
      "Fused [gated residual ->] LayerNorm -> modulate, CUDA, on the given stream.");
  m.def(
      "adaln_backward_cuda",
      [](int64_t B, int64_t L, int64_t D, uintptr_t dy, uintptr_t dx2_in, uintptr_t xin, uintptr_t h,
         uintptr_t gate, uintptr_t scale, int64_t gsb, int64_t gsl, int64_t csb, int64_t csl, uintptr_t gate2,
         uintptr_t scale2, int64_t g2sb, int64_t g2sl, int64_t c2sb, int64_t c2sl, uintptr_t mean,
         uintptr_t rstd, uintptr_t dxin, uintptr_t dh, uintptr_t dgate_tok, uintptr_t dscale_tok, int dtype,
         uintptr_t stream) {
        Mod2 m2;
        m2.gate = gate2; m2.scale = scale2; m2.gsb = g2sb; m2.gsl = g2sl; m2.csb = c2sb; m2.csl = c2sl;
        auto p = make_bwd(B, L, D, dy, dx2_in, xin, h, gate, scale, gsb, gsl, csb, csl, m2, mean, rstd, dxin, dh,
                          dgate_tok, dscale_tok, dtype);
        adaln_backward_cuda_launch(p, stream);
      },
      "Backward of the fused AdaLN family, CUDA, on the given stream.");
#endif
});

}  // namespace o2s
