// C++ CPU kernel of the attention forward for the sampling loop: the DiT's self-attention and its varlen
// cross-attention (omni2sound/ops/attention.py and ops/cross_attention.py have the math, the references and the
// dispatch). No gradient: training runs the references (SDPA), which autograd owns. No CUDA launcher.
//
//   out[b, i, h] = sum_j p_j v[b, j, h],  p = softmax_j(scale * q[b, i, h] . k[b, j, h])      (fp32 throughout)
//   lse[b, h, i] = log sum_j exp(scale * q . k_j)      (optional; 0 for a sample with no key, whose output is 0)
//
// Keys of sample b: dense (cu == null) rows j at k + b * k_sb + j * k_st (Tk of them), or packed (cu: int32
// [B + 1]) rows cu[b] + j at k + (cu[b] + j) * k_st. q, k, v may have any strides but a unit last one (the model
// hands the q / k / v slices of its fused qkv projection without a copy); out is contiguous [B, Tq, H, Dh], the
// layout the output projection reads.
//
// Why not SDPA: at the DiT's sampling shapes (S: [2, 250, 12, 64], one sequence of 250 frames) aten's CPU flash
// attention runs at 70-120 GFLOP/s on this 2-core Zen 4 box, about half the rate its GEMMs reach; attention was 13%
// of an S sampling step (bench/RESULTS.md). Here each (sample, head) packs its keys once as K^T panels and its
// values as rows (fp32, zero-padded to whole vectors: any Dh, any dtype, aligned loads), then per block of query
// rows: S = Q K^T with a register tile of R rows x PW keys (one broadcast of q and PW / VW vector loads of K^T per
// FMA group), an exact softmax over the whole row (no online rescaling: a row of S is at most Tk floats, L1/L2
// resident at these lengths), and O = P V with a register tile of rows x Dh. The exp is the vectorised polynomial
// of cpu_math.h. GCC vector extensions (intrinsics only for the broadcast): the same code compiles to AVX-512 (16
// floats a register), AVX2 (8) or SSE (4), with the tile sizes below chosen to fit the register file.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "attention.h"
#include "cpu_math.h"
#include "params.h"
#include "registry.h"

namespace o2s {
namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;          // floats per vector register
constexpr int QK_R = 6;         // S tile: 6 query rows x 4 vectors of keys = 24 accumulators of the 32 registers
constexpr int QK_NJ = 4;
constexpr int PV_ACC = 24;      // O tile: accumulators budget (rows x Dh / VW)
#elif defined(__AVX__)
constexpr int VW = 8;
constexpr int QK_R = 4;         // 4 x 3 = 12 accumulators of the 16 ymm registers
constexpr int QK_NJ = 3;
constexpr int PV_ACC = 12;
#else                           // baseline x86-64 (SSE) or another ISA: 128-bit vectors
constexpr int VW = 4;
constexpr int QK_R = 4;
constexpr int QK_NJ = 3;
constexpr int PV_ACC = 12;
#endif
constexpr int PW = QK_NJ * VW;  // keys per packed K^T panel
constexpr int BQ = 48;          // query rows per block (a multiple of every row tile used below)
constexpr int kMaxNV = 16;      // head dims up to 16 vectors: 256 floats (AVX-512), 128 (AVX2), 64 (SSE)

typedef float vec __attribute__((vector_size(VW * sizeof(float)), aligned(VW * sizeof(float))));

inline vec vload(const float* p) { return *reinterpret_cast<const vec*>(p); }           // p is VW-aligned
inline void vstore(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }
// One vbroadcastss from memory. (vec{} + x compiles to an add and a broadcast; an element-wise fill to a full-width
// load and a broadcast.)
inline vec vbroadcast(const float* x) {
#if defined(__AVX512F__)
  return reinterpret_cast<vec>(_mm512_set1_ps(*x));
#elif defined(__AVX__)
  return reinterpret_cast<vec>(_mm256_set1_ps(*x));
#else
  return vec{} + *x;
#endif
}


// A 64-byte aligned fp32 scratch buffer (grown, never shrunk).
struct Scratch {
  float* p = nullptr;
  size_t n = 0;
  float* get(size_t want) {
    if (want > n) {
      std::free(p);
      n = (want + 15) / 16 * 16;
      p = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};

// One thread's buffers: K^T panels, V rows, a block of Q rows, its scores, its output rows (+ 1 / row sums).
struct Workspace {
  Scratch kt, v, q, s, o;
};

template <typename T>
inline void load_scaled(const T* src, float* dst, int64_t n, int64_t npad, float mul) {
  for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]) * mul;
  for (int64_t d = n; d < npad; ++d) dst[d] = 0.f;
}

// S[r, j0 : j0 + PW] for R query rows: Qp rows [R][Dp], Kt one panel [Dp][PW].
template <int R>
inline void qk_tile(const float* Qp, int64_t Dp, const float* Kt, float* S, int64_t ldS) {
  vec acc[R][QK_NJ] = {};
  for (int64_t d = 0; d < Dp; ++d) {
    vec kv[QK_NJ];
    for (int n = 0; n < QK_NJ; ++n) kv[n] = vload(Kt + d * PW + n * VW);
    for (int r = 0; r < R; ++r) {
      const vec qb = vbroadcast(Qp + r * Dp + d);
      for (int n = 0; n < QK_NJ; ++n) acc[r][n] += qb * kv[n];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < QK_NJ; ++n) vstore(S + r * ldS + n * VW, acc[r][n]);
}

// O rows [R][NV * VW] = P rows [R][Tk] (row stride ldS) x Vp [Tk][NV * VW], then scaled by inv_l per row.
template <int NV, int R>
inline void pv_tile(const float* P, int64_t ldS, const float* Vp, int64_t Tk, const float* inv_l, float* O) {
  constexpr int Dp = NV * VW;
  vec acc[R][NV] = {};
  for (int64_t j = 0; j < Tk; ++j) {
    vec vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = vload(Vp + j * Dp + n * VW);
    for (int r = 0; r < R; ++r) {
      const vec pb = vbroadcast(P + r * ldS + j);
      for (int n = 0; n < NV; ++n) acc[r][n] += pb * vv[n];
    }
  }
  for (int r = 0; r < R; ++r) {
    const vec s = vbroadcast(inv_l + r);
    for (int n = 0; n < NV; ++n) vstore(O + r * Dp + n * VW, acc[r][n] * s);
  }
}

// One (sample, head) and a range of its query rows.
template <typename T, int NV>
void attend(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t i1, Workspace& ws) {
  constexpr int64_t Dp = NV * VW;
  constexpr int PV_R = PV_ACC / NV > 0 ? PV_ACC / NV : 1;    // rows per O tile; divides BQ for every NV <= 16
  constexpr int ROW_STEP = std::lcm(QK_R, PV_R);              // a block's rows are padded to whole tiles of both
  static_assert(BQ % ROW_STEP == 0, "BQ must be a multiple of both row tiles");
  const int64_t Dh = p.Dh;
  T* out = static_cast<T*>(p.out);
  int64_t kbase, Tk;
  if (p.cu) {
    kbase = p.cu[b];
    Tk = int64_t(p.cu[b + 1]) - kbase;
  } else {
    kbase = 0;
    Tk = p.Tk;
  }
  if (Tk <= 0) {                                             // nothing to attend to: zeros (and lse 0)
    for (int64_t i = i0; i < i1; ++i) {
      T* orow = out + ((b * p.Tq + i) * p.H + h) * Dh;
      for (int64_t d = 0; d < Dh; ++d) orow[d] = from_float<T>(0.f);
      if (p.lse) p.lse[(b * p.H + h) * p.Tq + i] = 0.f;
    }
    return;
  }
  const T* kb = static_cast<const T*>(p.k) + (p.cu ? kbase * p.k_st : b * p.k_sb) + h * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + (p.cu ? kbase * p.v_st : b * p.v_sb) + h * p.v_sh;
  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const int64_t panels = (Tk + PW - 1) / PW, ldS = panels * PW;

  // K^T panels [panels][Dp][PW] and V rows [Tk][Dp], fp32, zero-padded (padded keys score 0 but are never read
  // past Tk by the softmax and P V; padded head dims add 0 to every dot product).
  float* Kt = ws.kt.get(size_t(panels) * Dp * PW);
  float* Vp = ws.v.get(size_t(Tk) * Dp);
  std::memset(Kt, 0, sizeof(float) * size_t(panels) * Dp * PW);
  float row[Dp];
  for (int64_t j = 0; j < Tk; ++j) {
    load_scaled(kb + j * p.k_st, row, Dh, Dp, 1.0f);
    float* dst = Kt + (j / PW) * Dp * PW + (j % PW);
    for (int64_t d = 0; d < Dh; ++d) dst[d * PW] = row[d];
    load_scaled(vb + j * p.v_st, Vp + j * Dp, Dh, Dp, 1.0f);
  }
  float* Qp = ws.q.get(size_t(BQ) * Dp);
  float* S = ws.s.get(size_t(BQ) * ldS);
  float* O = ws.o.get(size_t(BQ) * Dp + BQ);
  float* inv_l = O + size_t(BQ) * Dp;

  for (int64_t q0 = i0; q0 < i1; q0 += BQ) {
    const int64_t rows = std::min<int64_t>(BQ, i1 - q0);
    const int64_t rows_pad = std::min<int64_t>(BQ, (rows + ROW_STEP - 1) / ROW_STEP * ROW_STEP);
    for (int64_t r = 0; r < rows_pad; ++r) {
      if (r < rows) load_scaled(qb + (q0 + r) * p.q_st, Qp + r * Dp, Dh, Dp, p.scale);
      else std::memset(Qp + r * Dp, 0, sizeof(float) * Dp);
    }
    for (int64_t r = 0; r < rows_pad; r += QK_R)
      for (int64_t pn = 0; pn < panels; ++pn)
        qk_tile<QK_R>(Qp + r * Dp, Dp, Kt + pn * Dp * PW, S + r * ldS + pn * PW, ldS);
    for (int64_t r = 0; r < rows_pad; ++r) {                // exact softmax over the row's Tk scores
      float* sr = S + r * ldS;
      float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < Tk; ++j) m = sr[j] > m ? sr[j] : m;
      float l = 0.f;
#pragma omp simd reduction(+ : l)
      for (int64_t j = 0; j < Tk; ++j) {
        const float e = fast_exp(sr[j] - m);
        sr[j] = e;
        l += e;
      }
      inv_l[r] = 1.0f / l;
      if (p.lse && r < rows) p.lse[(b * p.H + h) * p.Tq + q0 + r] = m + std::log(l);
    }
    for (int64_t r = 0; r < rows_pad; r += PV_R)
      pv_tile<NV, PV_R>(S + r * ldS, ldS, Vp, Tk, inv_l + r, O + r * Dp);
    for (int64_t r = 0; r < rows; ++r) {
      T* orow = out + ((b * p.Tq + q0 + r) * p.H + h) * Dh;
      const float* o = O + r * Dp;
      for (int64_t d = 0; d < Dh; ++d) orow[d] = from_float<T>(o[d]);
    }
  }
}

template <typename T, int NV>
void run(const AttnParams& p) {
  // Tasks: (sample, head, slice of query rows). One slice per (sample, head) when there are enough of them to keep
  // every thread busy (each task packs its K / V once); more slices when B * H is small against the thread count.
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  const int64_t pairs = p.B * p.H, blocks = (p.Tq + BQ - 1) / BQ;
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(blocks, (2 * threads + pairs - 1) / pairs));
  const int64_t rows_per = (blocks + slices - 1) / slices * BQ;
  const int64_t tasks = pairs * slices;
#pragma omp parallel
  {
    Workspace ws;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t pair = t / slices, s = t % slices;
      const int64_t i0 = s * rows_per, i1 = std::min(p.Tq, i0 + rows_per);
      if (i0 < i1) attend<T, NV>(p, pair / p.H, pair % p.H, i0, i1, ws);
    }
  }
}

template <typename T>
void run_dtype(const AttnParams& p) {
  switch ((p.Dh + VW - 1) / VW) {
    case 1: return run<T, 1>(p);
    case 2: return run<T, 2>(p);
    case 3: return run<T, 3>(p);
    case 4: return run<T, 4>(p);
    case 5: return run<T, 5>(p);
    case 6: return run<T, 6>(p);
    case 7: return run<T, 7>(p);
    case 8: return run<T, 8>(p);
    case 9: return run<T, 9>(p);
    case 10: return run<T, 10>(p);
    case 11: return run<T, 11>(p);
    case 12: return run<T, 12>(p);
    case 13: return run<T, 13>(p);
    case 14: return run<T, 14>(p);
    case 15: return run<T, 15>(p);
    case 16: return run<T, 16>(p);
    default: check(false, "attention: head dim too large");
  }
}

}  // namespace

void validate(const AttnParams& p) {
  const std::string where = "attention_fwd_cpu: ";
  check(p.B >= 0 && p.Tq >= 0 && p.Tk >= 0 && p.H > 0 && p.Dh > 0 && p.Nk >= 0,
        where + "need B, Tq, Tk, Nk >= 0 and H, Dh >= 1, got B=" + num(p.B) + " Tq=" + num(p.Tq) + " Tk=" +
            num(p.Tk) + " H=" + num(p.H) + " Dh=" + num(p.Dh) + " Nk=" + num(p.Nk));
  check(p.Dh <= int64_t(kMaxNV) * VW, where + "head dim " + num(p.Dh) + " is larger than the kernel's register tile (" +
                                          num(int64_t(kMaxNV) * VW) + ")");
  check(p.dtype == kFloat32 || p.dtype == kFloat16 || p.dtype == kBFloat16,
        where + "dtype code must be 0, 1 or 2, got " + num(p.dtype));
  check(std::isfinite(p.scale), where + "scale must be finite");
  if (p.B * p.Tq == 0) return;
  check(p.q && p.out, where + "null pointer for q or out");
  check((p.cu ? p.Nk : p.Tk) == 0 || (p.k && p.v), where + "null pointer for k or v");   // (no keys: may be null)
  check(p.q_sb >= 0 && p.q_st >= 0 && p.q_sh >= 0 && p.k_sb >= 0 && p.k_st >= 0 && p.k_sh >= 0 && p.v_sb >= 0 &&
            p.v_st >= 0 && p.v_sh >= 0,
        where + "strides must be >= 0");
  if (p.cu) {
    check(p.cu[0] == 0, where + "cu_seqlens_k[0] must be 0, got " + num(p.cu[0]));
    for (int64_t b = 0; b < p.B; ++b) {
      check(p.cu[b + 1] >= p.cu[b], where + "cu_seqlens_k must be non-decreasing, got cu[" + num(b) + "]=" +
                                        num(p.cu[b]) + " > cu[" + num(b + 1) + "]=" + num(p.cu[b + 1]));
    }
    check(p.cu[p.B] <= p.Nk, where + "cu_seqlens_k[B]=" + num(p.cu[p.B]) + " is past the " + num(p.Nk) +
                                 " packed key rows");
  }
}

static Registrar reg_attention([](pybind11::module_& m) {
  ParamsClass<AttnParams>(m, "AttnParams", "arguments of attention_fwd_cpu (csrc/attention.h)")
      .field("B", &AttnParams::B).field("Tq", &AttnParams::Tq).field("Tk", &AttnParams::Tk)
      .field("H", &AttnParams::H).field("Dh", &AttnParams::Dh).field("Nk", &AttnParams::Nk)
      .field("q", &AttnParams::q).field("k", &AttnParams::k).field("v", &AttnParams::v)
      .field("q_sb", &AttnParams::q_sb).field("q_st", &AttnParams::q_st).field("q_sh", &AttnParams::q_sh)
      .field("k_sb", &AttnParams::k_sb).field("k_st", &AttnParams::k_st).field("k_sh", &AttnParams::k_sh)
      .field("v_sb", &AttnParams::v_sb).field("v_st", &AttnParams::v_st).field("v_sh", &AttnParams::v_sh)
      .field("cu", &AttnParams::cu).field("out", &AttnParams::out).field("lse", &AttnParams::lse)
      .field("scale", &AttnParams::scale).field("dtype", &AttnParams::dtype);
  m.def("attention_cpu_max_head_dim", []() { return int64_t(kMaxNV) * VW; },
        "the largest head dim the C++ attention forward takes in this build (its register tiles)");
  m.def(
      "attention_fwd_cpu",
      [](const AttnParams& p) {
        validate(p);
        if (p.B * p.Tq == 0) return;
        pybind11::gil_scoped_release nogil;
        by_dtype(p, run_dtype<float>, run_dtype<half_t>, run_dtype<bf16_t>);
      },
      pybind11::arg("params"),
      "attention forward (C++ CPU, no gradient): dense keys (cu = 0) or packed varlen keys (cu: int32 [B + 1]); "
      "out contiguous [B, Tq, H, Dh], optional fp32 lse [B, H, Tq]");
});

}  // namespace o2s
