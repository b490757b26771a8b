// Per-face and per-(pixel, face) math of the soft rasterizer, written once and shared by the CPU
// kernel (rasterize_cpu.cpp, one pixel or a vector of a row's pixels at a time) and the CUDA
// kernel (rasterize_cuda.cu, one pixel per thread), so that CPU tests exercise the GPU's
// arithmetic. The formulas follow docs/rasterizer.md; section
// numbers below refer to it. Screen frame: x right, y up, pixel (r, c) of an S x S raster
// centred at ((2c + 1 - S) / S, (S - 1 - 2r) / S).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UMR_HD __host__ __device__ __forceinline__
#else
// always inlined: the lane forms (rasterize_lanes.h) are only fast when nothing is passed through memory
#define UMR_HD inline __attribute__((always_inline))
#endif

namespace umr {

enum DistFunc : int { DIST_HARD = 0, DIST_BARYCENTRIC = 1, DIST_EUCLIDEAN = 2 };
enum AggrRGB : int { RGB_HARD = 0, RGB_SOFTMAX = 1 };
enum AggrAlpha : int { ALPHA_HARD = 0, ALPHA_SUM = 1, ALPHA_PROD = 2 };
enum TextureType : int { TEX_SURFACE = 0, TEX_VERTEX = 1 };

// Square tiles used for binning; a pixel only visits the faces binned to its tile.
constexpr int kTileSize = 16;

// Per-face record written by setup_face (one per batch element and face):
//   [0, 9)   x0 y0 z0 x1 y1 z1 x2 y2 z2
//   [9, 18)  barycentric inverse A (row k gives w_k = A[k,0] x + A[k,1] y + A[k,2])
//   [18, 22) bounding box xmin xmax ymin ymax (not expanded)
//   [22]     1 if front-facing (signed area < 0), else 0
//   [23]     1 if every coordinate is finite, else 0 (such faces are never rasterized)
//   [24, 27) heights h_k: distance from vertex k to the line of the opposite edge (0 if degenerate)
//   [27, 30) 1 / z_k
//   [30, 33) 1 / |p_k − p_{k+1}|² (0 for a zero-length edge)
//   [33]     smallest vertex depth, lowered by a relative 1e-6 (a safe lower bound of the
//            interpolated depth at any pixel)
//   [34]     1 if the determinant was not clamped (A is the exact inverse), else 0
//   [35]     unused
// Reciprocals are precomputed so the per-pixel math multiplies instead of dividing; the
// PyTorch reference does the same arithmetic.
constexpr int kFaceInfoSize = 36;

// Depth of an empty z-buffer (docs/rasterizer.md §3.0) and the hard-z-buffer "no face" index.
constexpr double kEmptyDepth = 1e7;

template <typename T>
struct Settings {
  int image_size;     // S
  int num_faces;      // F (the sum-alpha divides by it)
  int texels;         // colours per face: R*R (surface) or 3 (vertex)
  int tex_res;        // R (surface)
  int dist_func;
  int aggr_rgb;
  int aggr_alpha;
  int texture_type;
  bool double_side;
  bool p2f_align_corners;
  bool rgb_geometry_grad;  // false: RGB sends gradients to the textures only, alpha to the geometry
  T near, far, eps, sigma, gamma;
  T inv_sigma, inv_gamma, inv_depth_range;  // 1/sigma, 1/gamma, 1/(far - near)
  T threshold;  // tau = ln(1/dist_eps - 1) * sigma, on the squared distance
  T margin;     // rho = sqrt(tau), bounding-box culling margin
  T bg[3];
};

template <typename T>
UMR_HD T umr_exp(T x);
template <>
UMR_HD float umr_exp<float>(float x) { return expf(x); }
template <>
UMR_HD double umr_exp<double>(double x) { return exp(x); }

template <typename T>
UMR_HD T umr_min(T a, T b) { return a < b ? a : b; }
template <typename T>
UMR_HD T umr_max(T a, T b) { return a > b ? a : b; }
template <typename T>
UMR_HD T umr_clamp(T v, T lo, T hi) { return umr_min(umr_max(v, lo), hi); }

template <typename T>
UMR_HD bool umr_isfinite(T x) { return x == x && x - x == T(0); }  // false for NaN and +-inf

// Above this argument 1 / (1 + exp(-x)) rounds to exactly 1 (exp(-x) is below half an ulp of 1).
template <typename T>
UMR_HD T sigmoid_saturation();
template <>
UMR_HD float sigmoid_saturation<float>() { return 17.5f; }
template <>
UMR_HD double sigmoid_saturation<double>() { return 38.0; }


template <typename T>
UMR_HD T pixel_x(int c, int S) { return T(2 * c + 1 - S) / T(S); }
template <typename T>
UMR_HD T pixel_y(int r, int S) { return T(S - 1 - 2 * r) / T(S); }

// docs/rasterizer.md §2: barycentric inverse, bounding box and facing of one face.
template <typename T>
UMR_HD void setup_face(const T* v, T* info) {
  const T x0 = v[0], y0 = v[1], x1 = v[3], y1 = v[4], x2 = v[6], y2 = v[7];
  bool finite = true;
  for (int k = 0; k < 9; ++k) {
    info[k] = v[k];
    finite = finite && umr_isfinite(v[k]);
  }
  const T det = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0);  // twice the signed area
  const T detc = det > T(0) ? umr_max(det, T(1e-10)) : umr_min(det, T(-1e-10));
  T* A = info + 9;
  A[0] = (y1 - y2) / detc;
  A[1] = (x2 - x1) / detc;
  A[2] = (x1 * y2 - x2 * y1) / detc;
  A[3] = (y2 - y0) / detc;
  A[4] = (x0 - x2) / detc;
  A[5] = (x2 * y0 - x0 * y2) / detc;
  A[6] = (y0 - y1) / detc;
  A[7] = (x1 - x0) / detc;
  A[8] = (x0 * y1 - x1 * y0) / detc;
  info[18] = umr_min(x0, umr_min(x1, x2));
  info[19] = umr_max(x0, umr_max(x1, x2));
  info[20] = umr_min(y0, umr_min(y1, y2));
  info[21] = umr_max(y0, umr_max(y1, y2));
  info[22] = det < T(0) ? T(1) : T(0);
  info[23] = finite ? T(1) : T(0);
  // w_k * h_k is the signed distance to the line of the edge opposite vertex k
  const T area2 = det < T(0) ? -det : det;
  for (int k = 0; k < 3; ++k) {
    const T ex = info[3 * ((k + 2) % 3)] - info[3 * ((k + 1) % 3)];
    const T ey = info[3 * ((k + 2) % 3) + 1] - info[3 * ((k + 1) % 3) + 1];
    const T len = sqrt(ex * ex + ey * ey);
    info[24 + k] = len > T(0) ? area2 / len : T(0);
    info[27 + k] = T(1) / v[3 * k + 2];
    const T fx = v[3 * k] - v[3 * ((k + 1) % 3)], fy = v[3 * k + 1] - v[3 * ((k + 1) % 3) + 1];
    const T len2 = fx * fx + fy * fy;
    info[30 + k] = len2 > T(0) ? T(1) / len2 : T(0);
  }
  const T zmin = umr_min(v[2], umr_min(v[5], v[8]));
  info[33] = zmin * (zmin > T(0) ? T(1) - T(1e-6) : T(1) + T(1e-6));
  info[34] = (det > T(1e-10) || det < T(-1e-10)) ? T(1) : T(0);
  info[35] = T(0);
}

// exp(x) is exactly 0 below this argument (float: under the smallest denormal).
template <typename T>
UMR_HD T exp_underflow();
template <>
UMR_HD float exp_underflow<float>() { return -110.0f; }
template <>
UMR_HD double exp_underflow<double>() { return -760.0; }

// docs/rasterizer.md §8: inclusive pixel range [c_lo, c_hi] x [r_lo, r_hi] that the face's expanded bounding box
// can reach, widened by one pixel against rounding (the exact per-pixel test still applies).
// Empty (c_lo > c_hi or r_lo > r_hi) for faces off the raster or with non-finite coordinates.
// With binning off, every finite face gets the whole raster.
template <typename T>
UMR_HD void face_pixel_range(const T* info, T margin, int S, bool binning, int* range) {
  range[0] = 0;
  range[1] = -1;
  range[2] = 0;
  range[3] = -1;
  if (info[23] == T(0)) return;
  if (!binning) {
    range[1] = range[3] = S - 1;
    return;
  }
  const double s = double(S);
  const double lo_x = (double(info[18]) - double(margin)) * s, hi_x = (double(info[19]) + double(margin)) * s;
  const double lo_y = (double(info[20]) - double(margin)) * s, hi_y = (double(info[21]) + double(margin)) * s;
  // clamp before the integer conversion so huge coordinates cannot overflow it
  const double c_lo = umr_clamp(ceil((lo_x + s - 1.0) / 2.0) - 1.0, -1.0, s);
  const double c_hi = umr_clamp(floor((hi_x + s - 1.0) / 2.0) + 1.0, -1.0, s);
  const double r_lo = umr_clamp(ceil((s - 1.0 - hi_y) / 2.0) - 1.0, -1.0, s);
  const double r_hi = umr_clamp(floor((s - 1.0 - lo_y) / 2.0) + 1.0, -1.0, s);
  range[0] = umr_max(int(c_lo), 0);
  range[1] = umr_min(int(c_hi), S - 1);
  range[2] = umr_max(int(r_lo), 0);
  range[3] = umr_min(int(r_hi), S - 1);
}

// ---------------------------------------------------------------------------------------------
// The per-(pixel, face) math below is written once, for a batch V of pixels of one tile row:
//   V = T (float or double): one pixel, with bool masks: the CUDA kernel and the CPU kernel's
//       per-pixel path;
//   V = a vector of W = 8 floats or 4 doubles (rasterize_lanes.h): W consecutive pixels of a
//       row, with lane masks (0 / -1): the CPU kernel's SIMD path.
// Batch<V> supplies what differs between the two (types, select, any, exp, gathers). Branches
// that depend on a pixel are masks; `if (!Bt::any(mask)) return` keeps the scalar form's early
// exits. The arithmetic is the same IEEE operations in the same order for both forms (no FMA
// contraction), except exp (the vector form's is within 2 ulp of libm).
template <typename V>
struct Batch;

template <typename T>
struct ScalarBatch {
  using Value = T;
  using Mask = bool;
  using Int = int;
  static constexpr int kLanes = 1;
  static UMR_HD T splat(T x) { return x; }
  static UMR_HD int splat_int(int x) { return x; }
  static UMR_HD bool none() { return false; }
  static UMR_HD bool all() { return true; }
  static UMR_HD bool any(bool m) { return m; }
  static UMR_HD bool mask_not(bool m) { return !m; }
  static UMR_HD T select(bool m, T a, T b) { return m ? a : b; }
  static UMR_HD int select_int(bool m, int a, int b) { return m ? a : b; }
  static UMR_HD T min(T a, T b) { return umr_min(a, b); }
  static UMR_HD T max(T a, T b) { return umr_max(a, b); }
  static UMR_HD T exp(T x) { return umr_exp(x); }
  static UMR_HD int to_int(T x) { return int(x); }  // truncation
  static UMR_HD T to_value(int i) { return T(i); }
  // color[k] = tex[3 * texel + k] where m is set, else 0
  static UMR_HD void gather3(const T* tex, int texel, bool m, T* color) {
    for (int k = 0; k < 3; ++k) color[k] = m ? tex[3 * texel + k] : T(0);
  }
};
template <>
struct Batch<float> : ScalarBatch<float> {};
template <>
struct Batch<double> : ScalarBatch<double> {};

template <typename V>
using ValueOf = typename Batch<V>::Value;
template <typename V>
using MaskOf = typename Batch<V>::Mask;
template <typename V>
using IntOf = typename Batch<V>::Int;

template <typename V>
UMR_HD V clamp(V v, ValueOf<V> lo, ValueOf<V> hi) {
  using Bt = Batch<V>;
  return Bt::min(Bt::max(v, Bt::splat(lo)), Bt::splat(hi));
}

template <typename V>
UMR_HD V sigmoid(V x) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  return Bt::select(x > sigmoid_saturation<T>(), Bt::splat(T(1)), T(1) / (T(1) + Bt::exp(-x)));
}

// Is the softmax weight of a face (nearest point at depth info[33]) exactly 0 at a pixel whose
// running or final maximum closeness is smax, without the face raising that maximum?
template <typename V>
UMR_HD MaskOf<V> softmax_weight_underflows(const ValueOf<V>* info, const Settings<ValueOf<V>>& s, V smax) {
  using T = ValueOf<V>;
  const T zeta_max = (s.far - info[33]) * s.inv_depth_range;
  return (zeta_max <= smax) & ((zeta_max - smax) * s.inv_gamma < exp_underflow<T>());
}

// docs/rasterizer.md §3.1: the expanded bounding-box test (strict comparisons: a pixel on the border is kept).
template <typename T>
UMR_HD bool in_x_box(const T* info, T px, const Settings<T>& s) {
  return !(px > info[19] + s.margin || px < info[18] - s.margin);
}
template <typename T>
UMR_HD bool in_y_box(const T* info, T py, const Settings<T>& s) {
  return !(py > info[21] + s.margin || py < info[20] - s.margin);
}

// Euclidean quick cull: a pixel farther than this from the line of an edge it lies beyond is
// culled without computing its distance to the triangle (the margin plus a relative 1e-4, so that
// only clear cases are decided this way).
template <typename T>
UMR_HD T edge_cull_limit(const Settings<T>& s) { return s.margin * T(1.0001); }

// Result of the coverage test of a batch of pixels against one face (docs/rasterizer.md §3.1-3.3).
template <typename V>
struct Coverage {
  V w[3];          // unclipped barycentrics
  V D;             // coverage probability
  V sign;          // euclidean: +1 strictly inside, -1 otherwise
  V coef[3];       // euclidean: barycentric coefficients of the closest boundary point Q
  V qp[2];         // euclidean: Q - P
  V wm, am[2];     // barycentric: the smallest w (docs/rasterizer.md §3.3's tie rule) and row m of the inverse A
  MaskOf<V> inside;  // closed inside test 0 <= w_k <= 1 (hard distance, z-buffer winner)
};

// docs/rasterizer.md §3.1-3.3 at pixels (px, py), whose bounding-box test the caller has applied (the cull spans of
// rasterize_tiles.h). Returns the pixels the face is not culled at (no alpha, RGB or p2f elsewhere).
template <typename V>
UMR_HD MaskOf<V> eval_coverage(const ValueOf<V>* info, V px, ValueOf<V> py, const Settings<ValueOf<V>>& s,
                               Coverage<V>& cov) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  using Mask = MaskOf<V>;
  const T* A = info + 9;
  for (int k = 0; k < 3; ++k) cov.w[k] = A[3 * k] * px + A[3 * k + 1] * py + A[3 * k + 2];
  const V w0 = cov.w[0], w1 = cov.w[1], w2 = cov.w[2];
  cov.sign = Bt::splat(T(1));
  for (int k = 0; k < 3; ++k) cov.coef[k] = Bt::splat(T(0));
  cov.D = cov.qp[0] = cov.qp[1] = cov.wm = cov.am[0] = cov.am[1] = Bt::splat(T(0));
  cov.inside = (w0 >= T(0)) & (w0 <= T(1)) & (w1 >= T(0)) & (w1 <= T(1)) & (w2 >= T(0)) & (w2 <= T(1));
  if (s.dist_func == DIST_HARD) {
    cov.D = Bt::splat(T(1));
    return cov.inside;
  }
  if (s.dist_func == DIST_BARYCENTRIC) {
    // m = w0 > w1 ? (w1 > w2 ? 2 : 1) : (w0 > w2 ? 2 : 0)
    const Mask g01 = w0 > w1, g12 = w1 > w2, g02 = w0 > w2;
    const Mask is2 = (g01 & g12) | (Bt::mask_not(g01) & g02), is1 = g01 & Bt::mask_not(g12);
    cov.wm = Bt::select(is2, w2, Bt::select(is1, w1, w0));
    for (int j = 0; j < 2; ++j)
      cov.am[j] = Bt::select(is2, Bt::splat(A[6 + j]), Bt::select(is1, Bt::splat(A[3 + j]), Bt::splat(A[j])));
    const V sq = cov.wm * cov.wm;
    const V delta = Bt::select(cov.wm > T(0), sq, -sq);
    const Mask keep = Bt::mask_not(-delta >= s.threshold);
    if (!Bt::any(keep)) return keep;
    cov.D = sigmoid(delta * s.inv_sigma);
    return keep;
  }
  // Euclidean: squared distance to the closed triangle's boundary, as the minimum over the
  // three edges of the distance to the clamped segment. In exact arithmetic this equals the
  // original's region rule (docs/rasterizer.md §3.3) both inside (nearest supporting line) and
  // outside (edge or vertex regions), without its out-of-bounds case; ties keep the lower edge index.
  const Mask strictly_inside = (w0 > T(0)) & (w0 < T(1)) & (w1 > T(0)) & (w1 < T(1)) & (w2 > T(0)) & (w2 < T(1));
  const Mask outside = Bt::mask_not(strictly_inside);
  cov.sign = Bt::select(strictly_inside, Bt::splat(T(1)), Bt::splat(T(-1)));
  // Quick cull of most outside pairs: the distance to the triangle is at least the distance
  // -w_k h_k to the line of an edge the pixel lies beyond; the exact test below decides the rest.
  const T* h = info + 24;
  const T limit = edge_cull_limit(s);
  Mask keep = Bt::mask_not(outside & ((-w0 * h[0] > limit) | (-w1 * h[1] > limit) | (-w2 * h[2] > limit)));
  if (!Bt::any(keep)) return keep;
  V best = Bt::splat(T(1e8));
  // Outside a proper triangle the closest point lies on an edge whose line the pixel is beyond
  // (or on): edge (k, k+1) is the one opposite vertex k+2. Vertex regions are covered too (a
  // pixel nearest to a vertex lies beyond one of the two edge lines through it). Inside, and for
  // degenerate faces (clamped determinant, meaningless w), every edge counts.
  const Mask skip_far_edges = info[34] != T(0) ? outside : Bt::none();
  for (int k = 0; k < 3; ++k) {
    const Mask edge_counts = Bt::mask_not(skip_far_edges & (cov.w[(k + 2) % 3] > T(0)));
    // one pixel: skip the edge; lanes: a branch per edge costs more than computing it
    if (Bt::kLanes == 1 && !Bt::any(edge_counts)) continue;
    const int a = k, b = (k + 1) % 3, o = 3 - a - b;
    const T xa = info[3 * a], ya = info[3 * a + 1], xb = info[3 * b], yb = info[3 * b + 1];
    const T ex = xa - xb, ey = ya - yb;
    // t: weight of vertex a of the foot of the perpendicular; a zero-length edge is a point
    const V t = clamp(((px - xb) * ex + (py - yb) * ey) * info[30 + k], T(0), T(1));
    const V qx = xb + t * ex - px, qy = yb + t * ey - py;
    const V d2 = qx * qx + qy * qy;
    const Mask better = edge_counts & (d2 < best);
    best = Bt::select(better, d2, best);
    cov.coef[a] = Bt::select(better, t, cov.coef[a]);
    cov.coef[b] = Bt::select(better, T(1) - t, cov.coef[b]);
    cov.coef[o] = Bt::select(better, Bt::splat(T(0)), cov.coef[o]);
    cov.qp[0] = Bt::select(better, qx, cov.qp[0]);
    cov.qp[1] = Bt::select(better, qy, cov.qp[1]);
  }
  keep = keep & Bt::mask_not((cov.sign < T(0)) & (best >= s.threshold));
  if (!Bt::any(keep)) return keep;
  cov.D = sigmoid(cov.sign * best * s.inv_sigma);
  return keep;
}

// A relaxation of eval_coverage's cull as three half-planes: every pixel the cull keeps
// satisfies w_k >= -lim[k] for k = 0, 1, 2 (euclidean: the distance -w_k h_k to an edge's line
// is within the margin; barycentric: w_k > -margin; hard: w_k >= 0). The bounds are loosened by
// 1% of the margin plus a slack that covers the rounding of w at the face's coordinate scale,
// so a pixel outside them is culled for certain. Returns false for degenerate faces (w is not
// an exact barycentric there): then no pixel may be skipped.
template <typename T>
UMR_HD bool coverage_halfplanes(const T* info, const Settings<T>& s, double* lim) {
  if (info[34] == T(0)) return false;
  double scale = 1.0;
  for (int k = 0; k < 9; ++k) scale = umr_max(scale, double(info[k] < T(0) ? -info[k] : info[k]));
  const double slack = 1e-4 * scale + 0.01 * double(s.margin);  // in distance units
  for (int k = 0; k < 3; ++k) {
    const double h = double(info[24 + k]);
    if (h <= 0.0) return false;
    const double bound = s.dist_func == DIST_EUCLIDEAN ? double(edge_cull_limit(s))
                         : s.dist_func == DIST_BARYCENTRIC ? double(s.margin) * h
                                                          : 0.0;
    lim[k] = (bound + slack) / h;
  }
  return true;
}

// docs/rasterizer.md §3.5: clipped, renormalised barycentrics and perspective-correct depth.
template <typename V>
UMR_HD V clipped_depth(const ValueOf<V>* info, const V* w, V* wb) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  for (int k = 0; k < 3; ++k) wb[k] = clamp(w[k], T(1e-5), T(1) - T(1e-5));
  const V sum = wb[0] + wb[1] + wb[2];
  const V inv_sum = T(1) / Bt::max(sum, Bt::splat(T(1e-5)));
  for (int k = 0; k < 3; ++k) wb[k] = wb[k] * inv_sum;
  return T(1) / (wb[0] * info[27] + wb[1] * info[28] + wb[2] * info[29]);
}

// docs/rasterizer.md §3.6: texel of a surface texture (R x R per face) at clipped barycentrics wb.
template <typename V>
UMR_HD IntOf<V> surface_texel(const V* wb, int R) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  using Int = IntOf<V>;
  const V u = wb[0], v = wb[1];
  const Int zero = Bt::splat_int(0), last = Bt::splat_int(R - 1);
  Int i = Bt::to_int(u * T(R)), j = Bt::to_int(v * T(R));
  i = Bt::select_int(i > 0, i, zero);
  i = Bt::select_int(i < R - 1, i, last);
  j = Bt::select_int(j > 0, j, zero);
  j = Bt::select_int(j < R - 1, j, last);
  const V lam = (u + v) * T(R) - Bt::to_value(i) - Bt::to_value(j);
  return Bt::select_int(lam <= T(1), j * R + i, (last - j) * R + (last - i));
}

// Colour of a face at clipped barycentrics wb where mask is set (0 elsewhere); tex points at
// the face's texels (texels x 3). texel: the surface texel (surface textures only).
template <typename V>
UMR_HD void face_color(const ValueOf<V>* tex, const V* wb, MaskOf<V> mask, const Settings<ValueOf<V>>& s, V* color,
                       IntOf<V>& texel) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  if (s.texture_type == TEX_SURFACE) {
    texel = surface_texel(wb, s.tex_res);
    Bt::gather3(tex, texel, mask, color);
    return;
  }
  for (int k = 0; k < 3; ++k)
    color[k] = Bt::select(mask, wb[0] * tex[k] + wb[1] * tex[3 + k] + wb[2] * tex[6 + k], Bt::splat(T(0)));
}

// Running state of a batch of pixels during the forward pass (docs/rasterizer.md §3.0, 3.4, 3.7, 3.8).
template <typename V>
struct PixelState {
  V alpha;
  V ssum, smax;  // softmax normaliser and running maximum of the closeness
  V color[3];    // softmax accumulator, or colour of the z-buffer winner (hard RGB)
  V zbest;       // depth of the nearest face containing the pixel centre
  IntOf<V> fbest;  // its index, -1 if none
};

template <typename T>
UMR_HD void init_pixel(const Settings<T>& s, PixelState<T>& p) {
  p.alpha = s.aggr_alpha == ALPHA_PROD ? T(1) : T(0);
  // The background acts as a face of closeness 2*eps (quirk kept from the original, docs/rasterizer.md §3.8).
  p.ssum = s.aggr_rgb == RGB_SOFTMAX ? umr_exp(s.eps / s.gamma) : T(1);
  p.smax = s.eps;
  for (int k = 0; k < 3; ++k) p.color[k] = s.bg[k] * p.ssum;
  p.zbest = T(kEmptyDepth);
  p.fbest = -1;
}

// Forward early-out: can face f change nothing at these pixels? True where alpha is saturated
// (prod: the product is 0; hard: alpha is 1), the face cannot win the z-buffer and its softmax
// weight underflows to 0. Exact: skipping it changes no bit of any output.
template <typename V>
UMR_HD MaskOf<V> face_is_inert(const ValueOf<V>* info, const Settings<ValueOf<V>>& s, const PixelState<V>& p) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  using Mask = MaskOf<V>;
  const Mask alpha_saturated = s.aggr_alpha == ALPHA_PROD   ? Mask(p.alpha == T(0))
                               : s.aggr_alpha == ALPHA_HARD ? Mask(p.alpha == T(1))
                                                            : Bt::none();
  const Mask inert = alpha_saturated & (info[33] >= p.zbest);
  if (!Bt::any(inert) || s.aggr_rgb == RGB_HARD) return inert;
  return inert & softmax_weight_underflows(info, s, p.smax);
}

// Adds face f to the pixels in mask (coverage already evaluated); faces must come in ascending
// f. Returns the p2f weights u = e * D (0 where the face does not enter the softmax).
template <typename V>
UMR_HD V update_pixel(const ValueOf<V>* info, const ValueOf<V>* tex, int f, const Coverage<V>& cov, MaskOf<V> mask,
                      const Settings<ValueOf<V>>& s, PixelState<V>& p) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  using Mask = MaskOf<V>;
  if (s.aggr_alpha == ALPHA_PROD) {
    p.alpha = Bt::select(mask, p.alpha * (T(1) - cov.D), p.alpha);
  } else if (s.aggr_alpha == ALPHA_SUM) {
    p.alpha = Bt::select(mask, p.alpha + cov.D, p.alpha);
  } else {
    p.alpha = Bt::select(mask & (cov.D > T(0.5)), Bt::splat(T(1)), p.alpha);
  }
  const V none = Bt::splat(T(0));
  const bool facing = s.double_side || info[22] != T(0);
  if (!facing) return none;
  V wb[3];
  const V zp = clipped_depth(info, cov.w, wb);
  const Mask rgb = mask & Bt::mask_not((zp < s.near) | (zp > s.far));  // near/far: alpha only
  if (!Bt::any(rgb)) return none;
  const Mask wins = rgb & cov.inside & (zp < p.zbest);
  p.zbest = Bt::select(wins, zp, p.zbest);
  p.fbest = Bt::select_int(wins, Bt::splat_int(f), p.fbest);
  V color[3];
  IntOf<V> texel{};
  if (s.aggr_rgb == RGB_HARD) {
    if (!Bt::any(wins)) return none;
    face_color(tex, wb, wins, s, color, texel);
    for (int k = 0; k < 3; ++k) p.color[k] = Bt::select(wins, color[k], p.color[k]);
    return none;
  }
  face_color(tex, wb, rgb, s, color, texel);
  const V zeta = (s.far - zp) * s.inv_depth_range;
  const Mask new_max = zeta > p.smax;  // a new maximum: its own weight is exp(0) = 1
  const V e = Bt::exp(Bt::select(new_max, p.smax - zeta, zeta - p.smax) * s.inv_gamma);
  const V rescale = Bt::select(new_max, e, Bt::splat(T(1)));
  const V u = Bt::select(rgb, Bt::select(new_max, cov.D, e * cov.D), none);
  p.smax = Bt::select(rgb & new_max, zeta, p.smax);
  p.ssum = Bt::select(rgb, rescale * p.ssum + u, p.ssum);
  for (int k = 0; k < 3; ++k) p.color[k] = Bt::select(rgb, rescale * p.color[k] + u * color[k], p.color[k]);
  return u;
}

// Final RGBA of a pixel (docs/rasterizer.md §3.9).
template <typename T>
UMR_HD void finish_pixel(const PixelState<T>& p, const Settings<T>& s, T* rgba) {
  for (int k = 0; k < 3; ++k) rgba[k] = s.aggr_rgb == RGB_SOFTMAX ? p.color[k] / p.ssum : p.color[k];
  if (s.aggr_alpha == ALPHA_PROD) {
    rgba[3] = T(1) - p.alpha;
  } else if (s.aggr_alpha == ALPHA_SUM) {
    rgba[3] = p.alpha / T(s.num_faces);
  } else {
    rgba[3] = p.alpha;
  }
}

// Pixel-grid position used by p2f (docs/rasterizer.md §4.2), second component pointing down.
template <typename T>
UMR_HD void p2f_grid(int r, int c, const Settings<T>& s, T* g) {
  const int S = s.image_size;
  if (s.p2f_align_corners) {
    g[0] = S > 1 ? T(-1) + T(2 * c) / T(S - 1) : T(0);
    g[1] = S > 1 ? T(-1) + T(2 * r) / T(S - 1) : T(0);
  } else {
    g[0] = T(2 * c + 1) / T(S) - T(1);
    g[1] = T(2 * r + 1) / T(S) - T(1);
  }
}

// What the backward pass reads of a batch of pixels: the incoming RGBA gradient g, the forward
// output rgba and the saved softmax state and z-buffer winner.
template <typename V>
struct PixelSaved {
  V g[4], rgba[4], ssum, smax;
  IntOf<V> fbest;
};

// Backward early-out: is every gradient of the pairs (pixel, face f) exactly 0? True where the
// alpha term vanishes (no alpha gradient, or prod alpha saturated at 1) and the RGB term does
// (no RGB gradient, not the hard winner, or a softmax weight that underflows).
template <typename V>
UMR_HD MaskOf<V> pair_is_inert(const ValueOf<V>* info, int f, const Settings<ValueOf<V>>& s, const PixelSaved<V>& px) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  using Mask = MaskOf<V>;
  const Mask no_alpha = s.aggr_alpha == ALPHA_PROD  ? Mask((px.g[3] == T(0)) | (px.rgba[3] == T(1)))
                        : s.aggr_alpha == ALPHA_SUM ? Mask(px.g[3] == T(0))
                                                    : Bt::all();
  if (!Bt::any(no_alpha)) return no_alpha;
  const Mask no_rgb = (px.g[0] == T(0)) & (px.g[1] == T(0)) & (px.g[2] == T(0));
  const Mask rgb_inert = s.aggr_rgb == RGB_HARD ? Mask(px.fbest != Bt::splat_int(f))
                                                : softmax_weight_underflows(info, s, px.smax);
  return no_alpha & (no_rgb | rgb_inert);
}

// docs/rasterizer.md §5.2: gradients of the pairs (pixel, face f) in mask (coverage already evaluated). Adds the
// geometry gradient to grad (9 values, x y z per vertex; one partial sum per lane) and returns
// the texture gradient per pixel, for the caller to spread: grad_tex[texel] += tex_weight * g
// (surface), grad_tex[v] += tex_weight * wb[v] * g (vertex); tex_weight 0: none.
// With rgb_geometry_grad false the RGB image is treated as if the geometry were detached (its
// gradient reaches the textures only), while alpha keeps its geometry gradient: one render then
// serves both a silhouette loss and a texture loss that must not move the shape.
// Where the original is undefined or drops a term by accident, the intended rule is used:
// one-hot texel gradient (docs/rasterizer.md §5.3.6), zero gradient of hard alpha, and faces outside [near, far]
// keep their alpha gradient (they do feed alpha in the forward).
template <typename V>
UMR_HD void backward_pair(const ValueOf<V>* info, const ValueOf<V>* tex, int f, const Coverage<V>& cov,
                          MaskOf<V> mask, const Settings<ValueOf<V>>& s, const PixelSaved<V>& px, V* grad, V* wb,
                          V& tex_weight, IntOf<V>& texel) {
  using Bt = Batch<V>;
  using T = ValueOf<V>;
  using Mask = MaskOf<V>;
  const V zero = Bt::splat(T(0));
  V dD = zero;  // dL/dD of each pair
  if (s.aggr_alpha == ALPHA_PROD) {
    dD = px.g[3] * (T(1) - px.rgba[3]) / Bt::max(T(1) - cov.D, Bt::splat(T(1e-6)));
  } else if (s.aggr_alpha == ALPHA_SUM) {
    dD = px.g[3] / T(s.num_faces);
  }
  const V zp = clipped_depth(info, cov.w, wb);
  const bool facing = s.double_side || info[22] != T(0);
  const Mask rgb = facing ? Mask(mask & (zp >= s.near) & (zp <= s.far)) : Bt::none();
  tex_weight = zero;
  if (Bt::any(rgb)) {
    if (s.aggr_rgb == RGB_SOFTMAX) {
      V color[3];
      face_color(tex, wb, rgb, s, color, texel);
      const V zeta = (s.far - zp) * s.inv_depth_range;
      const V weight_over_D = Bt::exp((zeta - px.smax) * s.inv_gamma) / px.ssum;  // omega / D
      const V omega = weight_over_D * cov.D;
      const V lam =
          px.g[0] * (color[0] - px.rgba[0]) + px.g[1] * (color[1] - px.rgba[1]) + px.g[2] * (color[2] - px.rgba[2]);
      if (s.rgb_geometry_grad) {
        dD = Bt::select(rgb, dD + weight_over_D * lam, dD);
        // closeness -> depth -> vertex depths, clipped barycentrics held fixed (docs/rasterizer.md §5.3.2)
        const V dz = -omega * lam * s.inv_gamma * s.inv_depth_range * zp * zp;
        for (int i = 0; i < 3; ++i)
          grad[3 * i + 2] = grad[3 * i + 2] + Bt::select(rgb, dz * wb[i] * info[27 + i] * info[27 + i], zero);
      }
      tex_weight = Bt::select(rgb, omega, zero);
    } else {
      const Mask winner = rgb & (px.fbest == Bt::splat_int(f));
      tex_weight = Bt::select(winner, Bt::splat(T(1)), zero);
      if (s.texture_type == TEX_SURFACE) texel = surface_texel(wb, s.tex_res);
    }
  }
  if (s.dist_func == DIST_HARD) return;
  const V d_eta = dD * cov.D * (T(1) - cov.D) * s.inv_sigma;  // through the sigmoid
  // zero where saturated (D exactly 0 or 1)
  const Mask live = mask & (dD != T(0)) & (d_eta != T(0));
  if (!Bt::any(live)) return;
  if (s.dist_func == DIST_EUCLIDEAN) {
    const V k = T(2) * cov.sign * d_eta;
    for (int i = 0; i < 3; ++i) {
      grad[3 * i] = grad[3 * i] + Bt::select(live, k * cov.coef[i] * cov.qp[0], zero);
      grad[3 * i + 1] = grad[3 * i + 1] + Bt::select(live, k * cov.coef[i] * cov.qp[1], zero);
    }
  } else {
    const V k = -d_eta * T(2) * Bt::select(cov.wm > T(0), cov.wm, -cov.wm);
    for (int i = 0; i < 3; ++i) {
      grad[3 * i] = grad[3 * i] + Bt::select(live, k * cov.am[0] * cov.w[i], zero);
      grad[3 * i + 1] = grad[3 * i + 1] + Bt::select(live, k * cov.am[1] * cov.w[i], zero);
    }
  }
}

// Texture-gradient targets of one pixel's pair: grad_tex[index[i]][k] += weight[i] * g_k.
template <typename T>
struct TextureGrad {
  int count;
  int index[3];
  T weight[3];
};

// backward_pair's texture gradient of one pixel as TextureGrad.
template <typename T>
UMR_HD TextureGrad<T> texture_grad(const Settings<T>& s, T tex_weight, const T* wb, int texel) {
  TextureGrad<T> tg;
  tg.count = 0;
  if (tex_weight == T(0)) return tg;
  if (s.texture_type == TEX_SURFACE) {
    tg.count = 1;
    tg.index[0] = texel;
    tg.weight[0] = tex_weight;
  } else {
    tg.count = 3;
    for (int i = 0; i < 3; ++i) {
      tg.index[i] = i;
      tg.weight[i] = tex_weight * wb[i];
    }
  }
  return tg;
}

}  // namespace umr
