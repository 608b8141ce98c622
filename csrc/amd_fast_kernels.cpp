// Native CPU twins of amd_fast's kernels (kernels/alignment_loss.py, kernels/gather.py).
//
// - alignment_rows: per token row, the normalizations, the distance and its gradient, in one pass over the
//   row (the chunked PyTorch twin makes ~8 passes over [R, Dt] temporaries); rows in parallel (ATen's OpenMP
//   pool), inner loops vectorized by the compiler (`omp simd`).
// - alignment_loss_pass: the loss-only op's chunk loop, with ATen's GEMM (addmm / mm_out) for the projection
//   and both gradient GEMMs, and ATen's layer_norm kernels for the optional student LayerNorm.
// - gather_rows / scatter_add_rows: token gather (with the position-embedding add fused) and its backward.
//
// Shape legend: B batch, V gathered tokens per sample, N tokens per sample, D width, Ds / Dt student /
// teacher width. Built by setup.py (torch.utils.cpp_extension) or CMakeLists.txt as amd_fast.kernels._native.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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
inline __attribute__((always_inline)) float plain_row(const float* z, const float* t, float* g, int64_t D, float scale,
                                                      float tmean, float tscale) {
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
    if (GRAD) g[d] = ACC ? g[d] + gp * scale : gp * scale;
  }
  return loss;
}

template <int DIST>
AMD_FAST_CLONES float plain_row_f32(const float* z, const float* t, float* g, int64_t D, float scale, bool acc,
                                    float tmean, float tscale) {
  if (g == nullptr) return plain_row<DIST, false, false>(z, t, g, D, scale, tmean, tscale);
  if (acc) return plain_row<DIST, true, true>(z, t, g, D, scale, tmean, tscale);
  return plain_row<DIST, true, false>(z, t, g, D, scale, tmean, tscale);
}

// One row; returns its summed loss. g may alias z (the gradient written over the projection, as the
// chunked twin does): every z[d] is read before g[d] is written.
template <typename T>
double row_loss_grad(const T* z, const T* t, T* g, int64_t D, T scale, bool accumulate, bool pred_l2,
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
      if (dist == 0) return plain_row_f32<0>(z, t, g, D, scale, accumulate, tmean, tscale);
      if (dist == 1) return plain_row_f32<1>(z, t, g, D, scale, accumulate, tmean, tscale);
      return plain_row_f32<2>(z, t, g, D, scale, accumulate, tmean, tscale);
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
        g[d] = accumulate ? g[d] + gz : gz;
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        T gz = buf[d] * scale;
        g[d] = accumulate ? g[d] + gz : gz;
      }
    }
  }
  return static_cast<double>(loss);
}

// Rows [row0, row0 + R) of the flattened [B*V, D] problem: z, g [R, D] (contiguous rows), t [B, V, D] (or
// [B*V, D]) with contiguous rows and any row / sample strides (t may be a t[:, :V] view, never copied).
double rows_impl(const at::Tensor& z_in, const at::Tensor& t_in, int64_t row0, const c10::optional<at::Tensor>& g_opt,
                 double scale, bool accumulate, bool pred_l2, int64_t target_norm, int64_t dist,
                 double target_eps) {
  at::Tensor z = z_in.dim() == 3 ? z_in.reshape({-1, z_in.size(2)}) : z_in;
  at::Tensor t = t_in.dim() == 2 ? t_in.unsqueeze(0) : t_in;
  TORCH_CHECK(z.dim() == 2 && t.dim() == 3 && t.size(2) == z.size(1), "alignment_rows: z [R, D], target [B, V, D]");
  TORCH_CHECK(row0 + z.size(0) <= t.size(0) * t.size(1), "alignment_rows: rows out of the target's range");
  TORCH_CHECK(z.stride(1) == 1, "alignment_rows: rows of z must be contiguous");
  if (t.scalar_type() != z.scalar_type() || t.stride(2) != 1) t = t.to(z.scalar_type()).contiguous();
  at::Tensor g;
  if (g_opt.has_value() && g_opt->defined()) {
    g = g_opt->dim() == 3 ? g_opt->view({-1, g_opt->size(2)}) : *g_opt;
    TORCH_CHECK(g.sizes() == z.sizes() && g.stride(1) == 1 && g.scalar_type() == z.scalar_type(),
                "alignment_rows: grad must match z");
  }
  const int64_t R = z.size(0), D = z.size(1), V = t.size(1);
  std::vector<double> row_loss(R, 0.0);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "alignment_rows", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* gp = g.defined() ? g.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(D);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = (row0 + r) / V, v = (row0 + r) % V;
        row_loss[r] = row_loss_grad<scalar_t>(
            zp + r * z.stride(0), tp + b * t.stride(0) + v * t.stride(1), gp ? gp + r * g.stride(0) : nullptr, D,
            static_cast<scalar_t>(scale), accumulate, pred_l2, static_cast<int>(target_norm),
            static_cast<int>(dist), static_cast<scalar_t>(target_eps), buf.data());
      }
    });
  });
  double total = 0;
  for (double x : row_loss) total += x;  // fixed order: the result does not depend on the thread count
  return total;
}

at::Tensor alignment_rows(const at::Tensor& z, const at::Tensor& t, const c10::optional<at::Tensor>& g, double scale,
                          bool accumulate, bool pred_l2, int64_t target_norm, int64_t dist, double target_eps) {
  double s = rows_impl(z, t, 0, g, scale, accumulate, pred_l2, target_norm, dist, target_eps);
  return at::scalar_tensor(s, z.options().dtype(at::kDouble));
}

std::vector<at::Tensor> alignment_loss_pass(const at::Tensor& h, const c10::optional<at::Tensor>& ln_w_opt,
                                            const c10::optional<at::Tensor>& ln_b_opt, double ln_eps,
                                            const at::Tensor& w, const c10::optional<at::Tensor>& b_opt,
                                            const at::Tensor& t, bool pred_l2, int64_t target_norm, int64_t dist,
                                            double target_eps, bool compute_grad, int64_t chunk) {
  TORCH_CHECK(h.dim() == 3 && h.is_contiguous(), "alignment_loss_pass: h must be a contiguous [B, V, Ds]");
  const int64_t B = h.size(0), V = h.size(1), Ds = h.size(2), Dt = w.size(0);
  const bool ln = ln_w_opt.has_value() && ln_w_opt->defined();
  const bool has_b = b_opt.has_value() && b_opt->defined();
  const double inv_numel = 1.0 / std::max<int64_t>(1, B * V * Dt);
  auto empty = h.new_empty({0});
  at::Tensor dh, dw, db, dlnw, dlnb;
  if (compute_grad) {
    dh = at::empty_like(h);
    dw = at::empty_like(w);  // the first chunk writes it (beta 0), the others accumulate
    if (has_b) db = at::zeros({Dt}, w.options());
    if (ln) {
      dlnw = at::zeros({Ds}, h.options());
      dlnb = at::zeros({Ds}, h.options());
    }
  }
  const at::Tensor wt = w.t();
  const at::Tensor h2 = h.view({B * V, Ds});
  at::Tensor dh2 = compute_grad ? dh.view({B * V, Ds}) : at::Tensor();
  const int64_t N = B * V;
  const int64_t n_chunks = (N + chunk - 1) / std::max<int64_t>(chunk, 1);
  const int64_t rows = n_chunks ? (N + n_chunks - 1) / n_chunks : 0;  // equal chunks, none a sliver
  double loss = 0;
  // one [rows, Dt] buffer for every chunk's projection (and, written over it, its gradient)
  at::Tensor zbuf = at::empty({rows, Dt}, h.options().dtype(at::promote_types(h.scalar_type(), w.scalar_type())));
  for (int64_t s = 0; s < N; s += rows) {
    const int64_t n = std::min(rows, N - s);
    at::Tensor hc = h2.narrow(0, s, n);
    at::Tensor hn = hc, mean, rstd;
    if (ln) std::tie(hn, mean, rstd) = at::native_layer_norm(hc, {Ds}, *ln_w_opt, *ln_b_opt, ln_eps);
    at::Tensor z = zbuf.narrow(0, 0, n);
    if (has_b) {
      at::addmm_out(z, *b_opt, hn, wt);
    } else {
      at::mm_out(z, hn, wt);
    }
    // the gradient w.r.t. z is written over z: the chunk's only [R, Dt] buffer
    loss += rows_impl(z, t, s, compute_grad ? c10::optional<at::Tensor>(z) : c10::nullopt, inv_numel, false,
                      pred_l2, target_norm, dist, target_eps);
    if (!compute_grad) continue;
    if (s == 0) {
      at::mm_out(dw, z.t(), hn);
    } else {
      dw.addmm_(z.t(), hn);
    }
    if (has_b) db.add_(z.sum(0));
    at::Tensor dhc = dh2.narrow(0, s, n);
    if (ln) {
      at::Tensor ghn = at::mm(z, w);
      auto grads = at::native_layer_norm_backward(ghn, hc, {Ds}, mean, rstd, *ln_w_opt, *ln_b_opt,
                                                  {true, true, true});
      dhc.copy_(std::get<0>(grads));
      dlnw.add_(std::get<1>(grads));
      dlnb.add_(std::get<2>(grads));
    } else {
      at::mm_out(dhc, z, w);
    }
  }
  auto out_dtype = at::promote_types(at::promote_types(h.scalar_type(), w.scalar_type()), t.scalar_type());
  auto loss_t = at::scalar_tensor(loss * inv_numel, h.options().dtype(out_dtype));
  auto opt = [&](const at::Tensor& x) { return x.defined() ? x : h.new_empty({0}); };
  return {loss_t, opt(dh), opt(dw), opt(db), opt(dlnw), opt(dlnb)};
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
  m.def("alignment_rows", &alignment_rows, "row part of the alignment loss -> summed loss (float64 scalar)");
  m.def("alignment_loss_pass", &alignment_loss_pass, "chunked loss-only alignment loss (+ grads)");
  m.def("gather_rows", &gather_rows, "src[b * rps + ids[b, j]] (+ pos[ids[b, j]]) (+ base[b, j])");
  m.def("scatter_add_rows", &scatter_add_rows, "backward of gather_rows w.r.t. x");
}
