// Host side of the AdaLN family: the C++ CPU kernels (OpenMP across rows, loops the compiler vectorises, fp32
// statistics), the checks of the parameters (adaln.h) and the bindings of the CPU and CUDA entry points.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "adaln.h"
#include "params.h"
#include "registry.h"

namespace o2s {

#ifdef OMNI2SOUND_WITH_CUDA
void adaln_forward_cuda_launch(const AdaLNParams& p, stream_handle stream);
void adaln_backward_cuda_launch(const AdaLNBwdParams& p, stream_handle stream);
#endif

namespace {

// Floats a vector register holds on the build's ISA: the row reductions below keep several accumulators of this
// width (one accumulator would serialise the row on the add latency, and the statistics of a 1536-wide row would
// then take as long as streaming it from L3).
#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
typedef float vec __attribute__((vector_size(VW * sizeof(float))));
constexpr int NACC = 4;   // independent accumulators: covers the add latency (4 cycles) at one add a cycle

inline vec vloadu(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(vec v) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// sum(v[0:D]) over a cached fp32 row.
inline float row_sum(const float* v, int64_t D) {
  vec acc[NACC] = {};
  int64_t d = 0;
  for (; d + NACC * VW <= D; d += NACC * VW)
    for (int k = 0; k < NACC; ++k) acc[k] += vloadu(v + d + k * VW);
  float s = 0.f;
  for (; d < D; ++d) s += v[d];
  for (int k = 0; k < NACC; ++k) s += hsum(acc[k]);
  return s;
}

// sum((v[0:D] - mean)^2) over a cached fp32 row: the variance about the mean, exact enough in fp32 even for
// |x| ~ 1e4, unlike E[x^2] - E[x]^2.
inline float row_ssd(const float* v, int64_t D, float mean) {
  vec acc[NACC] = {};
  const vec m = vec{} + mean;
  int64_t d = 0;
  for (; d + NACC * VW <= D; d += NACC * VW)
    for (int k = 0; k < NACC; ++k) {
      const vec c = vloadu(v + d + k * VW) - m;
      acc[k] += c * c;
    }
  float s = 0.f;
  for (; d < D; ++d) s += (v[d] - mean) * (v[d] - mean);
  for (int k = 0; k < NACC; ++k) s += hsum(acc[k]);
  return s;
}

// Asks for the cache lines of one output row of D elements of T with intent to write, so that the row's stores hit
// lines already owned instead of each waiting for its read-for-ownership (two of the seven rows a token moves are
// written). The inputs are left to the hardware's stream prefetcher: asking for them too (five more rows, 30 KB at
// width 1536 fp32) evicted the row being worked on and was slower in every layout measured.
template <typename T>
inline void prefetch_for_write(T* row, int64_t D) {
  char* p = reinterpret_cast<char*>(row);
  const int64_t bytes = D * int64_t(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 1, 3);
}

// One modulation of a row: the element a[d] (+ a2[d] when the modulation is a pair).
template <typename T, bool Pair>
inline float mod_at(const T* a, const T* a2, int64_t d) {
  if constexpr (Pair) return to_float(a[d]) + to_float(a2[d]);
  else return to_float(a[d]);
}

// Gated: h given (x2 = x + gate * h is written and normalised). Pair: some modulation has a second addend (those
// without one read a row of zeros), added as it is loaded: no per-row buffer, no extra pass.
template <typename T, bool Gated, bool Pair>
void forward_rows(const AdaLNParams& p, const T* zeros) {
  const int64_t rows = p.B * p.L, D = p.D;
  const T* x = static_cast<const T*>(p.x);
  const T* h = static_cast<const T*>(p.h);
  T* x2 = static_cast<T*>(p.x2);
  T* y = static_cast<T*>(p.y);
  // The k-th modulation tensor (gate, shift, scale, then their second addends) with its strides over B and L; a
  // missing second addend is the zero row with stride 0.
  const void* mb[6] = {p.gate, p.shift, p.scale, p.gate2, p.shift2, p.scale2};
  const int64_t msb[6] = {p.gate_sb, p.shift_sb, p.scale_sb, p.gate2_sb, p.shift2_sb, p.scale2_sb};
  const int64_t msl[6] = {p.gate_sl, p.shift_sl, p.scale_sl, p.gate2_sl, p.shift2_sl, p.scale2_sl};
  const int nmod = Pair ? 6 : 3;
  auto mods = [&](int64_t r, const T** m) {
    const int64_t b = r / p.L, l = r % p.L;
    for (int k = 0; k < nmod; ++k)
      m[k] = mb[k] ? static_cast<const T*>(mb[k]) + b * msb[k] + l * msl[k] : zeros;
  };
#pragma omp parallel
  {
    std::vector<float> buf(D);
    float* v = buf.data();   // the row being normalised (x2, or x converted to fp32), fp32
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* m[6];
      mods(r, m);
      if (r + 1 < rows) {
        if constexpr (Gated) prefetch_for_write(x2 + (r + 1) * D, D);
        prefetch_for_write(y + (r + 1) * D, D);
      }
      const T* xr = x + r * D;
      const float* vr = v;
      if constexpr (Gated && std::is_same<T, float>::value) {
        const T* hr = h + r * D;
        T* x2r = x2 + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) x2r[d] = xr[d] + mod_at<T, Pair>(m[0], m[3], d) * hr[d];
        vr = x2r;   // fp32 x2 is the exact value normalised: no second store of the row
      } else if constexpr (Gated) {
        const T* hr = h + r * D;
        T* x2r = x2 + r * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          v[d] = to_float(xr[d]) + mod_at<T, Pair>(m[0], m[3], d) * to_float(hr[d]);
          x2r[d] = from_float<T>(v[d]);
        }
      } else if constexpr (std::is_same<T, float>::value) {
        vr = xr;   // fp32 x is normalised in place of a copy
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) v[d] = to_float(xr[d]);
      }
      const float mean = row_sum(vr, D) / float(D);
      const float ss = row_ssd(vr, D, mean);
      // A row whose fp32 sum of squares overflows (|x - mean| ~ 1e19 and up) has no meaningful statistics: NaN,
      // never finite values from rstd = 0 (the reference gives NaN or 0 there, by magnitude).
      const float rstd = std::isinf(ss) ? std::numeric_limits<float>::quiet_NaN() : 1.0f / std::sqrt(ss / float(D) + p.eps);
      p.mean[r] = mean;
      p.rstd[r] = rstd;
      T* yr = y + r * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d)
        yr[d] = from_float<T>((vr[d] - mean) * rstd * (1.0f + mod_at<T, Pair>(m[2], m[5], d)) +
                              mod_at<T, Pair>(m[1], m[4], d));
    }
  }
}

// Gated and Pair as in forward_rows. Two passes over the row: the first streams x, dy and the scale in (writing the
// per-token dscale as it goes) and reduces; the second writes dx and, gated, dh and the per-token dgate.
template <typename T, bool Gated, bool Pair>
void backward_rows(const AdaLNBwdParams& p, const T* zeros) {
  const int64_t rows = p.B * p.L, D = p.D;
  const T* dy = static_cast<const T*>(p.dy);
  const T* dx2_in = static_cast<const T*>(p.dx2_in);
  const T* xin = static_cast<const T*>(p.xin);
  const T* h = static_cast<const T*>(p.h);
  T* dxin = static_cast<T*>(p.dxin);
  T* dh = static_cast<T*>(p.dh);
  T* dgate_tok = static_cast<T*>(p.dgate_tok);
  T* dscale_tok = static_cast<T*>(p.dscale_tok);
  T* dshift_tok = static_cast<T*>(p.dshift_tok);
  const void* mb[4] = {p.gate, p.scale, p.gate2, p.scale2};
  const int64_t msb[4] = {p.gate_sb, p.scale_sb, p.gate2_sb, p.scale2_sb};
  const int64_t msl[4] = {p.gate_sl, p.scale_sl, p.gate2_sl, p.scale2_sl};
#pragma omp parallel
  {
    std::vector<float> buf(2 * D);
    float* xhat = buf.data();
    float* g = buf.data() + D;   // dy * (1 + scale), then dx (fp32)
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r / p.L, l = r % p.L;
      const T* m[4];   // gate, scale, gate2, scale2 rows (a missing one: the zero row)
      for (int k = 0; k < 4; ++k) m[k] = mb[k] ? static_cast<const T*>(mb[k]) + b * msb[k] + l * msl[k] : zeros;
      const float mean = p.mean[r], rstd = p.rstd[r];
      const T* xr = xin + r * D;
      const T* dyr = dy + r * D;
      float sg = 0.f, sgx = 0.f;
      if (dshift_tok) std::memcpy(dshift_tok + r * p.dshift_rs, dyr, D * sizeof(T));   // dy's row, still in L1 below
      if (dscale_tok) {
        T* dsc = dscale_tok + r * p.dscale_rs;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t d = 0; d < D; ++d) {
          const float dyd = to_float(dyr[d]);
          xhat[d] = (to_float(xr[d]) - mean) * rstd;
          g[d] = dyd * (1.0f + mod_at<T, Pair>(m[1], m[3], d));
          dsc[d] = from_float<T>(dyd * xhat[d]);
          sg += g[d];
          sgx += g[d] * xhat[d];
        }
      } else {
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t d = 0; d < D; ++d) {
          xhat[d] = (to_float(xr[d]) - mean) * rstd;
          g[d] = to_float(dyr[d]) * (1.0f + mod_at<T, Pair>(m[1], m[3], d));
          sg += g[d];
          sgx += g[d] * xhat[d];
        }
      }
      const float mg = sg / float(D), mgx = sgx / float(D);
      T* dxr = dxin + r * D;
      const T* d2r = dx2_in ? dx2_in + r * D : nullptr;
      if (d2r) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g[d] = rstd * (g[d] - mg - xhat[d] * mgx) + to_float(d2r[d]);
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g[d] = rstd * (g[d] - mg - xhat[d] * mgx);
      }
      if constexpr (Gated) {
        const T* hr = h + r * D;
        T* dhr = dh + r * D;
        if (dgate_tok) {
          T* dgt = dgate_tok + r * p.dgate_rs;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            dxr[d] = from_float<T>(g[d]);
            dhr[d] = from_float<T>(mod_at<T, Pair>(m[0], m[2], d) * g[d]);
            dgt[d] = from_float<T>(to_float(hr[d]) * g[d]);
          }
        } else {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            dxr[d] = from_float<T>(g[d]);
            dhr[d] = from_float<T>(mod_at<T, Pair>(m[0], m[2], d) * g[d]);
          }
        }
      } else {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dxr[d] = from_float<T>(g[d]);
      }
    }
  }
}

// Runs Rows<T, gated, pair>(params, zero row) for the params' form: with or without h, with or without a second
// addend to some modulation (the zero row, D elements, stands in for the missing ones).
template <template <typename, bool, bool> class Rows, typename T, typename P>
void by_form(const P& p, bool pair) {
  std::vector<T> zeros(pair ? p.D : 0, from_float<T>(0.f));
  if (p.h) {
    if (pair) Rows<T, true, true>::run(p, zeros.data());
    else Rows<T, true, false>::run(p, nullptr);
  } else {
    if (pair) Rows<T, false, true>::run(p, zeros.data());
    else Rows<T, false, false>::run(p, nullptr);
  }
}

template <typename T, bool Gated, bool Pair>
struct ForwardRows {
  static void run(const AdaLNParams& p, const T* zeros) { forward_rows<T, Gated, Pair>(p, zeros); }
};
template <typename T, bool Gated, bool Pair>
struct BackwardRows {
  static void run(const AdaLNBwdParams& p, const T* zeros) { backward_rows<T, Gated, Pair>(p, zeros); }
};

template <typename T>
void forward(const AdaLNParams& p) {
  by_form<ForwardRows, T>(p, p.gate2 || p.shift2 || p.scale2);
}

template <typename T>
void backward(const AdaLNBwdParams& p) {
  by_form<BackwardRows, T>(p, p.gate2 || p.scale2);
}

}  // namespace

namespace {
// The sizes and dtype code both directions check, with the entry point's name ("adaln_forward: ") in the message.
void check_sizes(const std::string& where, int64_t B, int64_t L, int64_t D, int dtype) {
  check(B >= 0 && L >= 0 && D >= 1, where + "need B, L >= 0 and D >= 1, got B=" + num(B) + " L=" + num(L) + " D=" +
                                        num(D));
  check(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
        where + "dtype code must be 0, 1 or 2, got " + num(dtype));
}
}  // namespace

void validate(const AdaLNParams& p) {
  check_sizes("adaln_forward: ", p.B, p.L, p.D, p.dtype);
  check(p.x && p.shift && p.scale && p.y && p.mean && p.rstd, "adaln_forward: null pointer among x, shift, scale, "
                                                                "y, mean, rstd");
  check(!p.h || (p.gate && p.x2), "adaln_forward: the gated form (h) needs gate and x2");
  check(!p.gate2 || p.h, "adaln_forward: gate2 without the gated form");
  check(p.gate_sb >= 0 && p.gate_sl >= 0 && p.shift_sb >= 0 && p.shift_sl >= 0 && p.scale_sb >= 0 &&
            p.scale_sl >= 0 && p.gate2_sb >= 0 && p.gate2_sl >= 0 && p.shift2_sb >= 0 && p.shift2_sl >= 0 &&
            p.scale2_sb >= 0 && p.scale2_sl >= 0,
        "adaln_forward: modulation strides must be >= 0");
  check(std::isfinite(p.eps) && p.eps >= 0.f, "adaln_forward: eps must be finite and >= 0");
}

void validate(const AdaLNBwdParams& p) {
  check_sizes("adaln_backward: ", p.B, p.L, p.D, p.dtype);
  check(p.dy && p.xin && p.scale && p.mean && p.rstd && p.dxin, "adaln_backward: null pointer among dy, xin, "
                                                                  "scale, mean, rstd, dxin");
  check(!p.h || (p.gate && p.dh), "adaln_backward: the gated form (h) needs gate and dh");
  check(p.h || !p.dgate_tok, "adaln_backward: dgate_tok without the gated form");
  check(!p.gate2 || p.h, "adaln_backward: gate2 without the gated form");
  check(p.gate_sb >= 0 && p.gate_sl >= 0 && p.scale_sb >= 0 && p.scale_sl >= 0 && p.gate2_sb >= 0 &&
            p.gate2_sl >= 0 && p.scale2_sb >= 0 && p.scale2_sl >= 0,
        "adaln_backward: modulation strides must be >= 0");
  check((!p.dgate_tok || p.dgate_rs >= p.D) && (!p.dscale_tok || p.dscale_rs >= p.D) &&
            (!p.dshift_tok || p.dshift_rs >= p.D),
        "adaln_backward: the row stride of each per-token gradient (dgate_rs, dscale_rs, dshift_rs) must be >= D, "
        "got " + num(p.dgate_rs) + ", " + num(p.dscale_rs) + ", " + num(p.dshift_rs) + " for D=" + num(p.D));
}

static Registrar reg_adaln([](pybind11::module_& m) {
  ParamsClass<AdaLNParams>(m, "AdaLNParams", "arguments of adaln_forward_{cpu,cuda} (csrc/adaln.h)")
      .field("B", &AdaLNParams::B).field("L", &AdaLNParams::L).field("D", &AdaLNParams::D)
      .field("x", &AdaLNParams::x).field("h", &AdaLNParams::h).field("gate", &AdaLNParams::gate)
      .field("shift", &AdaLNParams::shift).field("scale", &AdaLNParams::scale)
      .field("gate_sb", &AdaLNParams::gate_sb).field("gate_sl", &AdaLNParams::gate_sl)
      .field("shift_sb", &AdaLNParams::shift_sb).field("shift_sl", &AdaLNParams::shift_sl)
      .field("scale_sb", &AdaLNParams::scale_sb).field("scale_sl", &AdaLNParams::scale_sl)
      .field("gate2", &AdaLNParams::gate2).field("shift2", &AdaLNParams::shift2).field("scale2", &AdaLNParams::scale2)
      .field("gate2_sb", &AdaLNParams::gate2_sb).field("gate2_sl", &AdaLNParams::gate2_sl)
      .field("shift2_sb", &AdaLNParams::shift2_sb).field("shift2_sl", &AdaLNParams::shift2_sl)
      .field("scale2_sb", &AdaLNParams::scale2_sb).field("scale2_sl", &AdaLNParams::scale2_sl)
      .field("x2", &AdaLNParams::x2).field("y", &AdaLNParams::y).field("mean", &AdaLNParams::mean)
      .field("rstd", &AdaLNParams::rstd).field("eps", &AdaLNParams::eps).field("dtype", &AdaLNParams::dtype);
  ParamsClass<AdaLNBwdParams>(m, "AdaLNBwdParams", "arguments of adaln_backward_{cpu,cuda} (csrc/adaln.h)")
      .field("B", &AdaLNBwdParams::B).field("L", &AdaLNBwdParams::L).field("D", &AdaLNBwdParams::D)
      .field("dy", &AdaLNBwdParams::dy).field("dx2_in", &AdaLNBwdParams::dx2_in).field("xin", &AdaLNBwdParams::xin)
      .field("h", &AdaLNBwdParams::h).field("gate", &AdaLNBwdParams::gate).field("scale", &AdaLNBwdParams::scale)
      .field("gate_sb", &AdaLNBwdParams::gate_sb).field("gate_sl", &AdaLNBwdParams::gate_sl)
      .field("scale_sb", &AdaLNBwdParams::scale_sb).field("scale_sl", &AdaLNBwdParams::scale_sl)
      .field("gate2", &AdaLNBwdParams::gate2).field("scale2", &AdaLNBwdParams::scale2)
      .field("gate2_sb", &AdaLNBwdParams::gate2_sb).field("gate2_sl", &AdaLNBwdParams::gate2_sl)
      .field("scale2_sb", &AdaLNBwdParams::scale2_sb).field("scale2_sl", &AdaLNBwdParams::scale2_sl)
      .field("mean", &AdaLNBwdParams::mean).field("rstd", &AdaLNBwdParams::rstd)
      .field("dxin", &AdaLNBwdParams::dxin).field("dh", &AdaLNBwdParams::dh)
      .field("dgate_tok", &AdaLNBwdParams::dgate_tok).field("dscale_tok", &AdaLNBwdParams::dscale_tok)
      .field("dshift_tok", &AdaLNBwdParams::dshift_tok).field("dgate_rs", &AdaLNBwdParams::dgate_rs)
      .field("dscale_rs", &AdaLNBwdParams::dscale_rs).field("dshift_rs", &AdaLNBwdParams::dshift_rs)
      .field("dtype", &AdaLNBwdParams::dtype);
  m.def(
      "adaln_forward_cpu",
      [](const AdaLNParams& p) {
        validate(p);
        if (p.B * p.L == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, forward<float>, forward<half_t>, forward<bf16_t>);
      },
      pybind11::arg("params"), "Fused [gated residual ->] LayerNorm -> modulate, C++ CPU.");
  m.def(
      "adaln_backward_cpu",
      [](const AdaLNBwdParams& p) {
        validate(p);
        if (p.B * p.L == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, backward<float>, backward<half_t>, backward<bf16_t>);
      },
      pybind11::arg("params"), "Backward of the fused AdaLN family, C++ CPU.");
#ifdef OMNI2SOUND_WITH_CUDA
  m.def(
      "adaln_forward_cuda",
      [](const AdaLNParams& p, stream_handle stream) {
        validate(p);
        if (p.B * p.L == 0) return;
        adaln_forward_cuda_launch(p, stream);
      },
      pybind11::arg("params"), pybind11::arg("stream"),
      "Fused [gated residual ->] LayerNorm -> modulate, CUDA, on the given stream.");
  m.def(
      "adaln_backward_cuda",
      [](const AdaLNBwdParams& p, stream_handle stream) {
        validate(p);
        if (p.B * p.L == 0) return;
        adaln_backward_cuda_launch(p, stream);
      },
      pybind11::arg("params"), pybind11::arg("stream"), "Backward of the fused AdaLN family, CUDA, on the given stream.");
#endif
});

}  // namespace o2s
