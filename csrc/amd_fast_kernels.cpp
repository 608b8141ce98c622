// Native CPU twins of amd_fast's kernels (kernels/alignment_loss.py, kernels/gather.py).
//
// - rows_impl: per token row, the normalizations, the distance and its gradient, in one pass over the row (the
//   chunked PyTorch twin makes ~8 passes over [R, Dt] temporaries); inner loops vectorized by the compiler.
// - alignment_loss_pass: the loss-only op's chunk loop; alignment_loss_z_fwd / _bwd: the with-z op. Their GEMMs
//   are ATen's (MKL), split between threads (on_threads, mm_rows); ATen's layer_norm kernels for the student LN.
// - gather_rows / scatter_add_rows: token gather (with the position-embedding add fused) and its backward.
//
// Shape legend: B batch, V gathered tokens per sample, N tokens per sample, D width, Ds / Dt student /
// teacher width. Built by setup.py (torch.utils.cpp_extension) or CMakeLists.txt as amd_fast.kernels._native.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

constexpr double kL2Eps = 1e-12;  // F.normalize's default eps


// The row loop without the prediction's L2 norm (AMD's direct alignment, MSE / L1 / smooth-L1 with an optional
// target LayerNorm), one distance per instantiation so that each loop is a plain vectorizable one, compiled for
// AVX-512, AVX2 and the baseline and picked at load time (GCC target_clones): the extension is built without
// -march flags and stays portable. g may alias z (each z[d] is read before g[d] is written).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define AMD_FAST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AMD_FAST_CLONES
#endif

template <int DIST, bool GRAD, bool ACC>
inline __attribute__((always_inline)) float plain_row(const float* z, const float* t, float* g, const float* a,
                                                      int64_t D, float scale, float tmean, float tscale) {
  float loss = 0;
#pragma omp simd reduction(+ : loss)
  for (int64_t d = 0; d < D; ++d) {
    const float diff = z[d] - (t[d] - tmean) * tscale;
    const float ad = std::abs(diff);
    float gp;
    if (DIST == 0) {
      loss += diff * diff;
      gp = 2 * diff;
    } else if (DIST == 1) {
      loss += ad;
      gp = diff > 0 ? 1.f : (diff < 0 ? -1.f : 0.f);
    } else {
      loss += ad < 1 ? 0.5f * diff * diff : ad - 0.5f;
      gp = ad < 1 ? diff : (diff > 0 ? 1.f : -1.f);
    }
    if (GRAD) g[d] = ACC ? a[d] + gp * scale : gp * scale;
  }
  return loss;
}

template <int DIST>
AMD_FAST_CLONES float plain_row_f32(const float* z, const float* t, float* g, const float* a, int64_t D, float scale,
                                    float tmean, float tscale) {
  if (g == nullptr) return plain_row<DIST, false, false>(z, t, g, a, D, scale, tmean, tscale);
  if (a != nullptr) return plain_row<DIST, true, true>(z, t, g, a, D, scale, tmean, tscale);
  return plain_row<DIST, true, false>(z, t, g, a, D, scale, tmean, tscale);
}

// One row; returns its summed loss. g may alias z (the gradient written over the projection, as the
// chunked twin does): every z[d] is read before g[d] is written.
template <typename T>
double row_loss_grad(const T* z, const T* t, T* g, const T* acc, int64_t D, T scale, bool pred_l2,
                     int target_norm, int dist, T target_eps, T* buf) {
  T tmean = 0, tscale = 1;
  if (target_norm == 1) {  // LayerNorm without affine: biased variance, as F.layer_norm
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += t[d];
    tmean = s / D;
    T v = 0;
#pragma omp simd reduction(+ : v)
    for (int64_t d = 0; d < D; ++d) v += (t[d] - tmean) * (t[d] - tmean);
    tscale = T(1) / std::sqrt(v / D + target_eps);
  } else if (target_norm == 2) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += t[d] * t[d];
    tscale = T(1) / std::max(std::sqrt(s), T(kL2Eps));
  }
  if constexpr (std::is_same_v<T, float>) {
    if (!pred_l2) {
      if (dist == 0) return plain_row_f32<0>(z, t, g, acc, D, scale, tmean, tscale);
      if (dist == 1) return plain_row_f32<1>(z, t, g, acc, D, scale, tmean, tscale);
      return plain_row_f32<2>(z, t, g, acc, D, scale, tmean, tscale);
    }
  }
  T nrm = 0, pscale = 1;
  if (pred_l2) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) s += z[d] * z[d];
    nrm = std::sqrt(s);
    pscale = T(1) / std::max(nrm, T(kL2Eps));
  }
  T loss = 0, gdotp = 0;
#pragma omp simd reduction(+ : loss, gdotp)
  for (int64_t d = 0; d < D; ++d) {
    T p = z[d] * pscale;
    T diff = p - (t[d] - tmean) * tscale;
    T ad = std::abs(diff);
    T sgn = diff > 0 ? T(1) : (diff < 0 ? T(-1) : T(0));
    T elem, gp;
    if (dist == 0) {
      elem = diff * diff;
      gp = 2 * diff;
    } else if (dist == 1) {
      elem = ad;
      gp = sgn;
    } else {
      elem = ad < 1 ? T(0.5) * diff * diff : ad - T(0.5);
      gp = ad < 1 ? diff : sgn;
    }
    loss += elem;
    buf[d] = gp;
    gdotp += gp * p;
  }
  if (g != nullptr) {
    if (pred_l2) {
      const bool big = nrm > T(kL2Eps);
      const T inv = big ? T(1) / nrm : T(1) / T(kL2Eps);
      const T proj = big ? gdotp : T(0);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        T gz = (buf[d] - z[d] * pscale * proj) * inv * scale;
        g[d] = acc != nullptr ? acc[d] + gz : gz;
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        T gz = buf[d] * scale;
        g[d] = acc != nullptr ? acc[d] + gz : gz;
      }
    }
  }
  return static_cast<double>(loss);
}

// Rows [row0, row0 + R) of the flattened [B*V, D] problem: z, g [R, D] (contiguous rows), t [B, V, D] (or
// [B*V, D]) with contiguous rows and any row / sample strides (t may be a t[:, :V] view, never copied).
// The gradient is g = scale * dloss/dz, or base + that (base: [R, D] rows with unit stride; any row stride).
// With row_loss_out, each row's loss is also written there (the caller sums them in
// row order).
double rows_impl(const at::Tensor& z_in, const at::Tensor& t_in, int64_t row0, const c10::optional<at::Tensor>& g_opt,
                 double scale, bool pred_l2, int64_t target_norm, int64_t dist, double target_eps,
                 double* row_loss_out = nullptr, const at::Tensor& base_in = at::Tensor()) {
  at::Tensor z = z_in.dim() == 3 ? z_in.reshape({-1, z_in.size(2)}) : z_in;
  at::Tensor t = t_in.dim() == 2 ? t_in.unsqueeze(0) : t_in;
  TORCH_CHECK(z.dim() == 2 && t.dim() == 3 && t.size(2) == z.size(1), "rows_impl: z [R, D], target [B, V, D]");
  TORCH_CHECK(row0 + z.size(0) <= t.size(0) * t.size(1), "rows_impl: rows out of the target's range");
  TORCH_CHECK(z.stride(1) == 1, "rows_impl: rows of z must be contiguous");
  if (t.scalar_type() != z.scalar_type() || t.stride(2) != 1) t = t.to(z.scalar_type()).contiguous();
  at::Tensor g;
  if (g_opt.has_value() && g_opt->defined()) {
    g = g_opt->dim() == 3 ? g_opt->view({-1, g_opt->size(2)}) : *g_opt;
    TORCH_CHECK(g.sizes() == z.sizes() && g.stride(1) == 1 && g.scalar_type() == z.scalar_type(),
                "rows_impl: grad must match z");
  }
  at::Tensor base;
  if (base_in.defined()) {
    base = base_in.dim() == 3 ? base_in.reshape({-1, base_in.size(2)}) : base_in;
    if (base.scalar_type() != z.scalar_type() || base.stride(1) != 1) base = base.to(z.scalar_type()).contiguous();
    TORCH_CHECK(g.defined() && base.sizes() == z.sizes(), "rows_impl: base must match z");
  }
  const int64_t R = z.size(0), D = z.size(1), V = t.size(1);
  std::vector<double> row_loss(R, 0.0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rows_impl", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    const scalar_t* ap = base.defined() ? base.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = (row0 + r) / V, v = (row0 + r) % V;
        row_loss[r] = row_loss_grad<scalar_t>(
            zp + r * z.stride(0), tp + b * t.stride(0) + v * t.stride(1), gp ? gp + r * g.stride(0) : nullptr,
            ap ? ap + r * base.stride(0) : nullptr, D, static_cast<scalar_t>(scale), pred_l2, static_cast<int>(target_norm),
            static_cast<int>(dist), static_cast<scalar_t>(target_eps), buf.data());
      }
    });
  });
  double total = 0;
  for (double x : row_loss) total += x;  // fixed order: the result does not depend on the thread count
  if (row_loss_out != nullptr) std::copy(row_loss.begin(), row_loss.end(), row_loss_out);
  return total;
}

// MKL's per-thread thread count (torch's CPU wheels link MKL; it is looked up at run time, so that a torch built
// on another BLAS still loads the extension). Inside an OpenMP region the BLAS would otherwise start its own
// team of at::get_num_threads() threads per GEMM: torch turns MKL's dynamic adjustment off.
using SetThreadsLocal = int (*)(int);  // the C entry point (mkl_set_num_threads_local is the Fortran one)
SetThreadsLocal mkl_threads_local() {
  static const SetThreadsLocal f =
      reinterpret_cast<SetThreadsLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return f;
}

// Rows per thread below which the threaded GEMMs leave the threading to the BLAS (one GEMM at a time).
constexpr int64_t kMinRowsPerThread = 64;

// Threads for `rows` rows of work: forced (> 0, tests) or auto: the ATen pool's size when every thread gets >=
// kMinRowsPerThread rows and the BLAS is MKL (whose GEMMs can be held to one thread each), else 1.
int64_t split_threads(int64_t rows, int64_t threads) {
  if (omp_in_parallel()) return 1;  // called from a parallel region: a nested team would have one thread
  int64_t P = threads > 0 ? threads : at::get_num_threads();
  if (threads <= 0 && (rows < P * kMinRowsPerThread || mkl_threads_local() == nullptr)) P = 1;
  return std::max<int64_t>(1, std::min<int64_t>(P, rows));
}

// The first error of a threaded region, kept; the other threads skip their remaining work (still meeting every
// barrier), and the caller rethrows it once the region has ended.
struct FirstError {
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex mutex;
  template <typename F>
  void guarded(F&& fn) {
    if (failed.load()) return;
    try {
      fn();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::current_exception();
      failed = true;
    }
  }
  void rethrow() {
    if (error) std::rethrow_exception(error);
  }
};

// fn(i, barrier) for i in [0, P), one OpenMP thread each, with ATen's thread-local state (as at::parallel_for
// does), grad mode off (these are kernels: out= GEMMs, no graph) and MKL held to one thread per GEMM. fn must not
// throw (FirstError). Returns false, having run nothing, when OpenMP gave a team of another size (a thread limit):
// the caller then runs its P = 1 path.
template <typename F>
bool on_threads(int64_t P, const F& fn) {
  if (P == 1) {
    at::NoGradGuard no_grad;
    fn(0, [] {});
    return true;
  }
  const at::ThreadLocalState state;
  bool full_team = true;
#pragma omp parallel num_threads(P)
  {
    if (omp_get_num_threads() != P) {  // every thread of the team sees the same: none runs fn
#pragma omp single
      full_team = false;
    } else {
      at::ThreadLocalStateGuard guard(state);
      at::NoGradGuard no_grad;
      const SetThreadsLocal set_local = mkl_threads_local();
      const int previous = set_local != nullptr ? set_local(1) : 0;
      fn(omp_get_thread_num(), [] {
#pragma omp barrier
      });
      if (set_local != nullptr) set_local(previous);
    }
  }
  return full_team;
}

// out = a @ b (+ bias): a [M, K] (any strides: a transposed view too), b [K, N]. The rows of out are split between
// split_threads(M) threads, each running one single-threaded GEMM on its rows; with one thread it is one
// (multi-threaded) BLAS call.
at::Tensor mm_rows(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias, int64_t threads) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "mm_rows: a [M, K], b [K, N]");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (!bias.has_value() || !bias->defined() ||
                                                     bias->scalar_type() == a.scalar_type()),
              "mm_rows: a, b and bias must share one dtype");
  const bool has_b = bias.has_value() && bias->defined();
  if (has_b) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == b.size(1), "mm_rows: bias [N]");
  const int64_t M = a.size(0);
  at::Tensor out = at::empty({M, b.size(1)}, a.options());
  const int64_t P = split_threads(M, threads);
  FirstError err;
  auto part = [&](int64_t i, const auto&) {
    err.guarded([&] {
      const int64_t r0 = M * i / P, r1 = M * (i + 1) / P;
      if (r1 <= r0) return;
      at::Tensor o = out.narrow(0, r0, r1 - r0), ai = a.narrow(0, r0, r1 - r0);
      if (has_b) {
        at::addmm_out(o, *bias, ai, b);
      } else {
        at::mm_out(o, ai, b);
      }
    });
  };
  if (!on_threads(P, part)) {  // no barriers in part: its pieces can run one after another
    at::NoGradGuard no_grad;
    for (int64_t i = 0; i < P; ++i) part(i, [] {});
  }
  err.rethrow();
  return out;
}

// The loss-only op's chunk loop. Each chunk's rows are split between P threads, and each thread runs its own
// single-threaded GEMMs: the projection of its rows, their row pass (loss, and the gradient written over z),
// their input gradient; then, after a barrier, its share of the weight gradient's rows (over the chunk's rows
// of every thread). On the 2-core box a single-threaded GEMM of 80 rows runs at ~87 GFLOP/s, while the BLAS's
// own 2-thread GEMM of 160 rows reaches ~144 (not 2 x 87): splitting the work by hand keeps both cores busy
// without the BLAS's per-call fork/join and partition losses. threads: 0 auto (P = the ATen pool's size when
// every thread gets >= kMinRowsPerThread rows of a chunk and the BLAS is MKL, whose GEMMs can be held to one
// thread each; else 1: the BLAS threads each GEMM), else forced (tests).
std::vector<at::Tensor> alignment_loss_pass(const at::Tensor& h, const c10::optional<at::Tensor>& ln_w_opt,
                                            const c10::optional<at::Tensor>& ln_b_opt, double ln_eps,
                                            const at::Tensor& w, const c10::optional<at::Tensor>& b_opt,
                                            const at::Tensor& t, bool pred_l2, int64_t target_norm, int64_t dist,
                                            double target_eps, bool compute_grad, int64_t chunk, int64_t threads) {
  TORCH_CHECK(h.dim() == 3 && h.is_contiguous(), "alignment_loss_pass: h must be a contiguous [B, V, Ds]");
  const int64_t B = h.size(0), V = h.size(1), Ds = h.size(2), Dt = w.size(0);
  const bool ln = ln_w_opt.has_value() && ln_w_opt->defined();
  const bool has_b = b_opt.has_value() && b_opt->defined();
  const double inv_numel = 1.0 / std::max<int64_t>(1, B * V * Dt);
  const int64_t N = B * V;
  const int64_t n_chunks = (N + chunk - 1) / std::max<int64_t>(chunk, 1);
  const int64_t rows = n_chunks ? (N + n_chunks - 1) / n_chunks : 0;  // equal chunks, none a sliver
  const int64_t P_team = std::min<int64_t>(split_threads(rows, threads), std::max<int64_t>(Dt, 1));
  // the pass's inputs are checked here, before any thread starts: nothing below throws on valid input
  const auto zdtype = at::promote_types(h.scalar_type(), w.scalar_type());
  TORCH_CHECK(h.scalar_type() == w.scalar_type() && (!has_b || b_opt->scalar_type() == w.scalar_type()) &&
                  (!ln || (ln_w_opt->scalar_type() == h.scalar_type() && ln_b_opt->scalar_type() == h.scalar_type())),
              "alignment_loss_pass: h, weight, bias and the LayerNorm's parameters must share one dtype");
  TORCH_CHECK(zdtype == at::kFloat || zdtype == at::kDouble, "alignment_loss_pass: float32 / float64 only");
  at::Tensor t3 = t.dim() == 2 ? t.unsqueeze(0) : t;
  TORCH_CHECK(t3.dim() == 3 && t3.size(0) * t3.size(1) == N && t3.size(2) == Dt,
              "alignment_loss_pass: target must have the projection's B*V rows of Dt");
  if (t3.scalar_type() != zdtype || t3.stride(2) != 1) t3 = t3.to(zdtype).contiguous();  // once, not per chunk
  at::Tensor dh, dw, db;
  if (compute_grad) {
    dh = at::empty_like(h);
    dw = at::empty_like(w);  // the first chunk writes it (beta 0), the others accumulate
    if (has_b) db = at::zeros({Dt}, w.options());
  }
  // per-thread LayerNorm weight-gradient partials, summed in thread order at the end ([P, Ds]: small)
  at::Tensor dlnw_p, dlnb_p;
  if (compute_grad && ln) {
    dlnw_p = at::zeros({P_team, Ds}, h.options());
    dlnb_p = at::zeros({P_team, Ds}, h.options());
  }
  const at::Tensor wt = w.t();
  const at::Tensor h2 = h.view({N, Ds});
  at::Tensor dh2 = compute_grad ? dh.view({N, Ds}) : at::Tensor();
  // one [rows, Dt] buffer for every chunk's projection (and, written over it, its gradient); with the
  // LayerNorm, one [rows, Ds] buffer for the chunk's normalized rows (the weight gradient reads all of them)
  at::Tensor zbuf = at::empty({rows, Dt}, h.options().dtype(zdtype));
  at::Tensor hnbuf = ln && compute_grad && P_team > 1 ? at::empty({rows, Ds}, h.options()) : at::Tensor();
  std::vector<double> row_loss(static_cast<size_t>(N), 0.0);
  FirstError err;

  // thread i of P: rows [r0, r1) of each chunk, weight-gradient rows [c0, c1)
  auto pass = [&](const int64_t P, int64_t i, const auto& barrier) {
    const int64_t c0 = Dt * i / P, c1 = Dt * (i + 1) / P;
    for (int64_t s = 0; s < N; s += rows) {
      const int64_t n = std::min(rows, N - s);
      const int64_t r0 = n * i / P, r1 = n * (i + 1) / P;
      at::Tensor z = zbuf.narrow(0, 0, n);
      at::Tensor hn_all = hnbuf.defined() ? hnbuf.narrow(0, 0, n) : h2.narrow(0, s, n);
      err.guarded([&] {
        if (r1 <= r0) return;
        at::Tensor hc = h2.narrow(0, s + r0, r1 - r0);
        at::Tensor zc = z.narrow(0, r0, r1 - r0);
        at::Tensor hn = hc, mean, rstd;
        if (ln) {
          std::tie(hn, mean, rstd) = at::native_layer_norm(hc, {Ds}, *ln_w_opt, *ln_b_opt, ln_eps);
          if (hnbuf.defined()) hn_all.narrow(0, r0, r1 - r0).copy_(hn);
        }
        if (has_b) {
          at::addmm_out(zc, *b_opt, hn, wt);
        } else {
          at::mm_out(zc, hn, wt);
        }
        // the gradient w.r.t. z is written over z: the chunk's only [R, Dt] buffer
        rows_impl(zc, t3, s + r0, compute_grad ? c10::optional<at::Tensor>(zc) : c10::nullopt, inv_numel, pred_l2,
                  target_norm, dist, target_eps, row_loss.data() + s + r0);
        if (compute_grad) {
          at::Tensor dhc = dh2.narrow(0, s + r0, r1 - r0);
          if (ln) {
            at::Tensor ghn = at::mm(zc, w);
            auto grads = at::native_layer_norm_backward(ghn, hc, {Ds}, mean, rstd, *ln_w_opt, *ln_b_opt,
                                                        {true, true, true});
            dhc.copy_(std::get<0>(grads));
            dlnw_p[i].add_(std::get<1>(grads));
            dlnb_p[i].add_(std::get<2>(grads));
            if (P == 1) hn_all = hn;
          } else {
            at::mm_out(dhc, zc, w);
          }
        }
      });
      if (!compute_grad) continue;
      barrier();  // every row of the chunk's gradient (and normalized input) is written
      err.guarded([&] {
        if (c1 <= c0) return;
        at::Tensor zg = z.narrow(1, c0, c1 - c0);
        at::Tensor dwc = dw.narrow(0, c0, c1 - c0);
        if (s == 0) {
          at::mm_out(dwc, zg.t(), hn_all);
        } else {
          dwc.addmm_(zg.t(), hn_all);
        }
        if (has_b) db.narrow(0, c0, c1 - c0).add_(zg.sum(0));
      });
      barrier();  // z is read by every thread before the next chunk overwrites it
    }
  };
  if (!on_threads(P_team, [&](int64_t i, const auto& barrier) { pass(P_team, i, barrier); })) {
    on_threads(1, [&](int64_t i, const auto& barrier) { pass(1, i, barrier); });
  }
  err.rethrow();
  double loss = 0;
  for (double x : row_loss) loss += x;  // row order
  auto out_dtype = at::promote_types(zdtype, t.scalar_type());
  auto loss_t = at::scalar_tensor(loss * inv_numel, h.options().dtype(out_dtype));
  auto e = h.new_empty({0});
  at::Tensor dlnw = compute_grad && ln ? dlnw_p.sum(0) : e, dlnb = compute_grad && ln ? dlnb_p.sum(0) : e;
  auto opt = [&](const at::Tensor& x) { return x.defined() ? x : h.new_empty({0}); };
  return {loss_t, opt(dh), opt(dw), opt(db), opt(dlnw), opt(dlnb)};
}

// The with-z op (AMD: the generator reads the projection), forward: hn = LN(h) (optional), z = hn W^T + b by
// mm_rows, the loss by the row pass -> (loss, z [B, V, Dt]).
std::vector<at::Tensor> alignment_loss_z_fwd(const at::Tensor& h, const c10::optional<at::Tensor>& ln_w,
                                             const c10::optional<at::Tensor>& ln_b, double ln_eps, const at::Tensor& w,
                                             const c10::optional<at::Tensor>& b, const at::Tensor& t, bool pred_l2,
                                             int64_t target_norm, int64_t dist, double target_eps, int64_t threads) {
  TORCH_CHECK(h.dim() == 3, "alignment_loss_z: h must be [B, V, Ds]");
  const int64_t B = h.size(0), V = h.size(1), Ds = h.size(2), Dt = w.size(0);
  const bool ln = ln_w.has_value() && ln_w->defined();
  at::Tensor hn = ln ? at::layer_norm(h, {Ds}, *ln_w, *ln_b, ln_eps) : h;
  at::Tensor z = mm_rows(hn.reshape({B * V, Ds}), w.t(), b, threads).view({B, V, Dt});
  const double loss = rows_impl(z, t, 0, c10::nullopt, 0.0, pred_l2, target_norm, dist, target_eps);
  const auto out_dtype = at::promote_types(z.scalar_type(), t.scalar_type());
  return {at::scalar_tensor(loss / std::max<int64_t>(1, B * V * Dt), h.options().dtype(out_dtype)), z};
}

// ... its backward: g = grad_z + grad_loss * dloss/dz in one row pass (no copy of grad_z first), then the input
// gradient (through the LayerNorm's backward when there is one) and the weight gradient, both by mm_rows
// -> (dh, dw, db, dlnw, dlnb).
std::vector<at::Tensor> alignment_loss_z_bwd(double grad_loss, const c10::optional<at::Tensor>& grad_z,
                                             const at::Tensor& z, const at::Tensor& h,
                                             const c10::optional<at::Tensor>& ln_w,
                                             const c10::optional<at::Tensor>& ln_b, double ln_eps, const at::Tensor& w,
                                             bool has_bias, const at::Tensor& t, bool pred_l2, int64_t target_norm,
                                             int64_t dist, double target_eps, int64_t threads) {
  TORCH_CHECK(h.dim() == 3 && z.dim() == 3, "alignment_loss_z_backward: h [B, V, Ds], z [B, V, Dt]");
  const int64_t B = h.size(0), V = h.size(1), Ds = h.size(2), Dt = z.size(2), N = B * V;
  const bool ln = ln_w.has_value() && ln_w->defined();
  at::Tensor g = at::empty({N, Dt}, z.options());
  const at::Tensor base = grad_z.has_value() && grad_z->defined() ? *grad_z : at::Tensor();
  rows_impl(z, t, 0, g, grad_loss / std::max<int64_t>(1, N * Dt), pred_l2, target_norm, dist, target_eps,
            nullptr, base);
  const at::Tensor h2 = h.reshape({N, Ds});
  at::Tensor dh, dw, dlnw, dlnb, hn = h2;
  if (ln) {
    at::Tensor mean, rstd;
    std::tie(hn, mean, rstd) = at::native_layer_norm(h2, {Ds}, *ln_w, *ln_b, ln_eps);
    auto grads = at::native_layer_norm_backward(mm_rows(g, w, c10::nullopt, threads), h2, {Ds}, mean, rstd, *ln_w,
                                                *ln_b, {true, true, true});
    dh = std::get<0>(grads);
    dlnw = std::get<1>(grads);
    dlnb = std::get<2>(grads);
  } else {
    dh = mm_rows(g, w, c10::nullopt, threads);
  }
  dw = mm_rows(g.t(), hn, c10::nullopt, threads);
  auto e = h.new_empty({0});
  return {dh.view(h.sizes()), dw, has_bias ? g.sum(0) : e, ln ? dlnw : e.clone(), ln ? dlnb : e.clone()};
}

// Row loops live outside the AT_DISPATCH lambdas: a #pragma cannot appear inside a macro argument.
template <typename T>
inline void add_rows(T* dst, const T* a, const T* b, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = a[d] + b[d];
}

template <typename T>
inline void add_rows3(T* dst, const T* base, const T* a, const T* b, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = base[d] + (a[d] + b[d]);
}

template <typename T>
inline void accumulate_row(T* dst, const T* a, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) dst[d] = dst[d] + a[d];
}

template <typename index_t>
inline int64_t checked(index_t id, int64_t N) {
  TORCH_CHECK(id >= 0 && id < N, "gather: index ", static_cast<int64_t>(id), " out of range for ", N, " tokens");
  return static_cast<int64_t>(id);
}

// out[b, j] = src[b * rps + ids[b, j]] (+ pos[ids[b, j]]) (+ base[b, j]); rps: src rows per sample (N for
// a [B*N, D] batch of tokens, 0 for a table shared by the batch)
at::Tensor gather_rows(const at::Tensor& src_in, const at::Tensor& ids_in, int64_t rps,
                       const c10::optional<at::Tensor>& pos_opt, const c10::optional<at::Tensor>& base_opt) {
  TORCH_CHECK(src_in.dim() == 2 && ids_in.dim() == 2, "gather: src [S, D], ids [B, V]");
  at::Tensor src = src_in.contiguous(), ids = ids_in.contiguous();
  const int64_t S = src.size(0), D = src.size(1), B = ids.size(0), V = ids.size(1);
  const int64_t N = rps > 0 ? rps : S;  // valid index range
  at::Tensor out = at::empty({B, V, D}, src.options());
  at::Tensor pos, base;
  if (pos_opt.has_value() && pos_opt->defined()) {
    pos = pos_opt->to(src.scalar_type()).contiguous();
    TORCH_CHECK(pos.dim() == 2 && pos.size(0) >= N && pos.size(1) == D, "gather: pos must be [N, D]");
  }
  if (base_opt.has_value() && base_opt->defined()) {
    base = base_opt->to(src.scalar_type()).contiguous();
    TORCH_CHECK(base.numel() == B * V * D, "gather: base must be [B, V, D]");
  }
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "gather_rows", [&] {
    const index_t* ip = ids.data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "gather_rows", [&] {
      const scalar_t* sp = src.data_ptr<scalar_t>();
      const scalar_t* pp = pos.defined() ? pos.data_ptr<scalar_t>() : nullptr;
      const scalar_t* bp = base.defined() ? base.data_ptr<scalar_t>() : nullptr;
      scalar_t* op = out.data_ptr<scalar_t>();
      at::parallel_for(0, B * V, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t id = checked(ip[r], N);
          const scalar_t* a = sp + ((r / V) * rps + id) * D;
          scalar_t* dst = op + r * D;
          if (pp == nullptr && bp == nullptr) {
            std::memcpy(dst, a, D * sizeof(scalar_t));
          } else if (bp == nullptr) {
            add_rows(dst, a, pp + id * D, D);
          } else if (pp == nullptr) {
            add_rows(dst, bp + r * D, a, D);
          } else {
            add_rows3(dst, bp + r * D, a, pp + id * D, D);
          }
        }
      });
    });
  });
  return out;
}

// grad_src[b * rps + ids[b, j]] += g[b, j] -> [S, D]. With rps > 0 the samples write disjoint rows and run in
// parallel (a sample's repeated ids stay in one thread); a shared table (rps 0) is summed in one thread.
at::Tensor scatter_add_rows(const at::Tensor& g_in, const at::Tensor& ids_in, int64_t rps, int64_t S) {
  at::Tensor g = g_in.contiguous(), ids = ids_in.contiguous();
  const int64_t B = ids.size(0), V = ids.size(1), D = g.size(-1);
  const int64_t N = rps > 0 ? rps : S;
  at::Tensor out = at::zeros({S, D}, g.options());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "scatter_add_rows", [&] {
    const index_t* ip = ids.data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "scatter_add_rows", [&] {
      const scalar_t* gp = g.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      auto body = [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t j = 0; j < V; ++j) {
            const int64_t id = checked(ip[b * V + j], N);
            const scalar_t* a = gp + (b * V + j) * D;
            accumulate_row(op + (b * rps + id) * D, a, D);
          }
        }
      };
      if (rps > 0) {
        at::parallel_for(0, B, 1, body);
      } else {
        body(0, B);
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "amd_fast native CPU kernels (alignment loss, token gather)";
  m.def("alignment_loss_pass", &alignment_loss_pass, "chunked loss-only alignment loss (+ grads)");
  m.def("gather_rows", &gather_rows, "src[b * rps + ids[b, j]] (+ pos[ids[b, j]]) (+ base[b, j])");
  m.def("alignment_loss_z_fwd", &alignment_loss_z_fwd, "with-z alignment loss -> (loss, z)");
  m.def("alignment_loss_z_bwd", &alignment_loss_z_bwd, "its backward -> (dh, dw, db, dlnw, dlnb)");
  m.def("mm_rows", &mm_rows, "a @ b (+ bias), rows split between threads running single-threaded GEMMs",
        py::arg("a"), py::arg("b"), py::arg("bias") = py::none(), py::arg("threads") = 0);
  m.def("blas_threads_local", [] { return mkl_threads_local() != nullptr; },
        "whether the BLAS's per-thread thread count can be set (MKL): the threaded loss-only pass needs it");
  m.def("scatter_add_rows", &scatter_add_rows, "backward of gather_rows w.r.t. x");
}
