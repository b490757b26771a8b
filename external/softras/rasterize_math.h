// Per-face and per-(pixel, face) math of the soft rasterizer, shared by the CPU kernel
// (rasterize_cpu.cpp) and the CUDA kernel (rasterize_cuda.cu), so that CPU tests exercise
// the GPU's arithmetic. The formulas follow ../shared/spec/soft_rasterizer.md; section
// numbers below refer to it. Screen frame: x right, y up, pixel (r, c) of an S x S raster
// centred at ((2c + 1 - S) / S, (S - 1 - 2r) / S).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define UMR_HD __host__ __device__ __forceinline__
#else
#define UMR_HD inline
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

// Depth of an empty z-buffer (spec §3.0) and the hard-z-buffer "no face" index.
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
UMR_HD T sigmoid(T x) { return x > sigmoid_saturation<T>() ? T(1) : T(1) / (T(1) + umr_exp(-x)); }

template <typename T>
UMR_HD T pixel_x(int c, int S) { return T(2 * c + 1 - S) / T(S); }
template <typename T>
UMR_HD T pixel_y(int r, int S) { return T(S - 1 - 2 * r) / T(S); }

// §2: barycentric inverse, bounding box and facing of one face.
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

// Is the softmax weight of a face (nearest point at depth info[33]) exactly 0 at a pixel whose
// running or final maximum closeness is smax, without the face raising that maximum?
template <typename T>
UMR_HD bool softmax_weight_underflows(const T* info, const Settings<T>& s, T smax) {
  const T zeta_max = (s.far - info[33]) * s.inv_depth_range;
  return zeta_max <= smax && (zeta_max - smax) * s.inv_gamma < exp_underflow<T>();
}

// §8: inclusive pixel range [c_lo, c_hi] x [r_lo, r_hi] that the face's expanded bounding box
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

// Result of the coverage test of one (pixel, face) pair (§3.1-3.3).
template <typename T>
struct Coverage {
  T w[3];        // unclipped barycentrics
  T D;           // coverage probability
  T sign;        // euclidean: +1 strictly inside, -1 otherwise
  T coef[3];     // euclidean: barycentric coefficients of the closest boundary point Q
  T qp[2];       // euclidean: Q - P
  int m;         // barycentric: index of the smallest w (spec's tie rule)
  bool inside;   // closed inside test 0 <= w_k <= 1 (hard distance, z-buffer winner)
};

// §3.1: the expanded bounding-box test (strict comparisons: a pixel on the border is kept).
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

// §3.1-3.3. Returns false when the face is culled for this pixel (no alpha, RGB or p2f).
// box_checked: the caller already applied the bounding-box test.
template <typename T, bool box_checked = false>
UMR_HD bool eval_coverage(const T* info, T px, T py, const Settings<T>& s, Coverage<T>& cov) {
  if (!box_checked && !(in_x_box(info, px, s) && in_y_box(info, py, s))) return false;
  cov.sign = T(1);
  cov.m = 0;
  for (int k = 0; k < 3; ++k) cov.coef[k] = T(0);
  cov.qp[0] = cov.qp[1] = T(0);
  const T* A = info + 9;
  for (int k = 0; k < 3; ++k) cov.w[k] = A[3 * k] * px + A[3 * k + 1] * py + A[3 * k + 2];
  const T w0 = cov.w[0], w1 = cov.w[1], w2 = cov.w[2];
  cov.inside = w0 >= T(0) && w0 <= T(1) && w1 >= T(0) && w1 <= T(1) && w2 >= T(0) && w2 <= T(1);
  if (s.dist_func == DIST_HARD) {
    if (!cov.inside) return false;
    cov.D = T(1);
    return true;
  }
  if (s.dist_func == DIST_BARYCENTRIC) {
    cov.m = w0 > w1 ? (w1 > w2 ? 2 : 1) : (w0 > w2 ? 2 : 0);
    const T wm = cov.w[cov.m];
    const T delta = wm > T(0) ? wm * wm : -wm * wm;
    if (-delta >= s.threshold) return false;
    cov.D = sigmoid(delta * s.inv_sigma);
    return true;
  }
  // Euclidean: squared distance to the closed triangle's boundary, as the minimum over the
  // three edges of the distance to the clamped segment. In exact arithmetic this equals the
  // spec's region rule (§3.3) both inside (nearest supporting line) and outside (edge or vertex
  // regions), without its out-of-bounds case; ties keep the lower edge index.
  const bool strictly_inside = w0 > T(0) && w0 < T(1) && w1 > T(0) && w1 < T(1) && w2 > T(0) && w2 < T(1);
  cov.sign = strictly_inside ? T(1) : T(-1);
  if (!strictly_inside) {
    // Quick cull of most outside pairs: the distance to the triangle is at least the distance
    // -w_k h_k to the line of an edge the pixel lies beyond; the exact test below decides the rest.
    const T* h = info + 24;
    const T limit = edge_cull_limit(s);
    if (-w0 * h[0] > limit || -w1 * h[1] > limit || -w2 * h[2] > limit) return false;
  }
  T best = T(1e8);
  // Outside a proper triangle the closest point lies on an edge whose line the pixel is beyond
  // (or on): edge (k, k+1) is the one opposite vertex k+2. Vertex regions are covered too (a
  // pixel nearest to a vertex lies beyond one of the two edge lines through it). Inside, and for
  // degenerate faces (clamped determinant, meaningless w), every edge counts.
  const bool skip_far_edges = !strictly_inside && info[34] != T(0);
  for (int k = 0; k < 3; ++k) {
    if (skip_far_edges && cov.w[(k + 2) % 3] > T(0)) continue;
    const int a = k, b = (k + 1) % 3;
    const T xa = info[3 * a], ya = info[3 * a + 1], xb = info[3 * b], yb = info[3 * b + 1];
    const T ex = xa - xb, ey = ya - yb;
    // t: weight of vertex a of the foot of the perpendicular; a zero-length edge is a point
    T t = ((px - xb) * ex + (py - yb) * ey) * info[30 + k];
    t = umr_clamp(t, T(0), T(1));
    const T qx = xb + t * ex - px, qy = yb + t * ey - py;
    const T d2 = qx * qx + qy * qy;
    if (d2 < best) {
      best = d2;
      cov.coef[a] = t;
      cov.coef[b] = T(1) - t;
      cov.coef[3 - a - b] = T(0);
      cov.qp[0] = qx;
      cov.qp[1] = qy;
    }
  }
  if (cov.sign < T(0) && best >= s.threshold) return false;
  cov.D = sigmoid(cov.sign * best * s.inv_sigma);
  return true;
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

// §3.5: clipped, renormalised barycentrics and perspective-correct depth.
template <typename T>
UMR_HD T clipped_depth(const T* info, const T* w, T* wb) {
  T sum = T(0);
  for (int k = 0; k < 3; ++k) {
    wb[k] = umr_clamp(w[k], T(1e-5), T(1) - T(1e-5));
    sum += wb[k];
  }
  const T inv_sum = T(1) / umr_max(sum, T(1e-5));
  for (int k = 0; k < 3; ++k) wb[k] *= inv_sum;
  return T(1) / (wb[0] * info[27] + wb[1] * info[28] + wb[2] * info[29]);
}

// §3.6: texel of a surface texture (R x R per face) at clipped barycentrics wb.
template <typename T>
UMR_HD int surface_texel(const T* wb, int R) {
  const T u = wb[0], v = wb[1];
  const int i = umr_clamp(int(u * T(R)), 0, R - 1);
  const int j = umr_clamp(int(v * T(R)), 0, R - 1);
  const T lam = (u + v) * T(R) - T(i) - T(j);
  return lam <= T(1) ? j * R + i : (R - 1 - j) * R + (R - 1 - i);
}

// Colour of a face at clipped barycentrics wb; tex points at the face's texels (texels x 3).
template <typename T>
UMR_HD void face_color(const T* tex, const T* wb, const Settings<T>& s, T* color) {
  if (s.texture_type == TEX_SURFACE) {
    const T* c = tex + 3 * surface_texel(wb, s.tex_res);
    color[0] = c[0];
    color[1] = c[1];
    color[2] = c[2];
  } else {
    for (int k = 0; k < 3; ++k) color[k] = wb[0] * tex[k] + wb[1] * tex[3 + k] + wb[2] * tex[6 + k];
  }
}

// Running state of one pixel during the forward pass (§3.0, 3.4, 3.7, 3.8).
template <typename T>
struct PixelState {
  T alpha;
  T ssum, smax;  // softmax normaliser and running maximum of the closeness
  T color[3];    // softmax accumulator, or colour of the z-buffer winner (hard RGB)
  T zbest;       // depth of the nearest face containing the pixel centre
  int fbest;     // its index, -1 if none
};

template <typename T>
UMR_HD void init_pixel(const Settings<T>& s, PixelState<T>& p) {
  p.alpha = s.aggr_alpha == ALPHA_PROD ? T(1) : T(0);
  // The background acts as a face of closeness 2*eps (quirk kept from the original, §3.8).
  p.ssum = s.aggr_rgb == RGB_SOFTMAX ? umr_exp(s.eps / s.gamma) : T(1);
  p.smax = s.eps;
  for (int k = 0; k < 3; ++k) p.color[k] = s.bg[k] * p.ssum;
  p.zbest = T(kEmptyDepth);
  p.fbest = -1;
}

// Forward early-out: can face f change nothing at this pixel? True when alpha is saturated
// (prod: the product is 0; hard: alpha is 1), the face cannot win the z-buffer and its softmax
// weight underflows to 0. Exact: skipping it changes no bit of any output.
template <typename T>
UMR_HD bool face_is_inert(const T* info, const Settings<T>& s, const PixelState<T>& p) {
  const bool alpha_saturated =
      s.aggr_alpha == ALPHA_PROD ? p.alpha == T(0) : (s.aggr_alpha == ALPHA_HARD && p.alpha == T(1));
  if (!alpha_saturated || !(info[33] >= p.zbest)) return false;
  return s.aggr_rgb == RGB_HARD || softmax_weight_underflows(info, s, p.smax);
}

// Adds face f (already through eval_coverage) to the pixel; faces must come in ascending f.
// Returns the p2f weight u = e * D of the pair (0 when the face does not enter the softmax).
template <typename T>
UMR_HD T update_pixel(const T* info, const T* tex, int f, const Coverage<T>& cov, const Settings<T>& s,
                      PixelState<T>& p) {
  if (s.aggr_alpha == ALPHA_PROD) {
    p.alpha *= T(1) - cov.D;
  } else if (s.aggr_alpha == ALPHA_SUM) {
    p.alpha += cov.D;
  } else if (cov.D > T(0.5)) {
    p.alpha = T(1);
  }
  T wb[3];
  const T zp = clipped_depth(info, cov.w, wb);
  if (zp < s.near || zp > s.far) return T(0);  // near/far: alpha only
  const bool facing = s.double_side || info[22] != T(0);
  if (!facing) return T(0);
  T color[3];
  const bool wins = cov.inside && zp < p.zbest;
  if (wins) {
    p.zbest = zp;
    p.fbest = f;
  }
  if (s.aggr_rgb == RGB_HARD) {
    if (wins) face_color(tex, wb, s, p.color);
    return T(0);
  }
  face_color(tex, wb, s, color);
  const T zeta = (s.far - zp) * s.inv_depth_range;
  T rescale = T(1), u;
  if (zeta > p.smax) {  // a new maximum: its own weight is exp(0) = 1
    rescale = umr_exp((p.smax - zeta) * s.inv_gamma);
    p.smax = zeta;
    u = cov.D;
  } else {
    u = umr_exp((zeta - p.smax) * s.inv_gamma) * cov.D;
  }
  p.ssum = rescale * p.ssum + u;
  for (int k = 0; k < 3; ++k) p.color[k] = rescale * p.color[k] + u * color[k];
  return u;
}

// Final RGBA of a pixel (§3.9).
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

// Pixel-grid position used by p2f (§4.2), second component pointing down.
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

// Backward early-out: is every gradient of the pair (pixel, face f) exactly 0? True when the
// alpha term vanishes (no alpha gradient, or prod alpha saturated at 1) and the RGB term does
// (no RGB gradient, not the hard winner, or a softmax weight that underflows).
template <typename T>
UMR_HD bool pair_is_inert(const T* info, int f, const Settings<T>& s, const T* g, const T* rgba, T smax, int fbest) {
  const bool no_alpha = s.aggr_alpha == ALPHA_PROD  ? (g[3] == T(0) || rgba[3] == T(1))
                        : s.aggr_alpha == ALPHA_SUM ? g[3] == T(0)
                                                    : true;
  if (!no_alpha) return false;
  if (g[0] == T(0) && g[1] == T(0) && g[2] == T(0)) return true;
  return s.aggr_rgb == RGB_HARD ? f != fbest : softmax_weight_underflows(info, s, smax);
}

// Texture-gradient targets of one pair: grad_tex[index[i]][k] += weight[i] * g_k.
template <typename T>
struct TextureGrad {
  int count;
  int index[3];
  T weight[3];
};

// §5.2: gradient of one (pixel, face) pair. g: incoming RGBA gradient at the pixel; rgba: the
// pixel's forward output; ssum, smax, fbest: the pixel's saved softmax state and z-buffer
// winner. Adds to grad_face (9 values, x y z per vertex) and describes the texture gradient.
// With rgb_geometry_grad false the RGB image is treated as if the geometry were detached (its
// gradient reaches the textures only), while alpha keeps its geometry gradient: one render then
// serves both a silhouette loss and a texture loss that must not move the shape.
// Where the original is undefined or drops a term by accident, the intended rule is used:
// one-hot texel gradient (§5.3.6), zero gradient of hard alpha, and faces outside [near, far]
// keep their alpha gradient (they do feed alpha in the forward).
template <typename T>
UMR_HD void backward_pair(const T* info, const T* tex, int f, const Coverage<T>& cov, const Settings<T>& s,
                          const T* g, const T* rgba, T ssum, T smax, int fbest, T* grad_face, TextureGrad<T>& tg) {
  tg.count = 0;
  T dD = T(0);  // dL/dD of this pair
  if (s.aggr_alpha == ALPHA_PROD) {
    dD = g[3] * (T(1) - rgba[3]) / umr_max(T(1) - cov.D, T(1e-6));
  } else if (s.aggr_alpha == ALPHA_SUM) {
    dD = g[3] / T(s.num_faces);
  }
  T wb[3];
  const T zp = clipped_depth(info, cov.w, wb);
  const bool facing = s.double_side || info[22] != T(0);
  if (zp >= s.near && zp <= s.far && facing) {
    if (s.aggr_rgb == RGB_SOFTMAX) {
      T color[3];
      face_color(tex, wb, s, color);
      const T zeta = (s.far - zp) * s.inv_depth_range;
      const T weight_over_D = umr_exp((zeta - smax) * s.inv_gamma) / ssum;  // omega / D
      const T omega = weight_over_D * cov.D;
      const T lam = g[0] * (color[0] - rgba[0]) + g[1] * (color[1] - rgba[1]) + g[2] * (color[2] - rgba[2]);
      if (s.rgb_geometry_grad) {
        dD += weight_over_D * lam;
        // closeness -> depth -> vertex depths, clipped barycentrics held fixed (§5.3.2)
        const T dz = -omega * lam * s.inv_gamma * s.inv_depth_range * zp * zp;
        for (int i = 0; i < 3; ++i) grad_face[3 * i + 2] += dz * wb[i] * info[27 + i] * info[27 + i];
      }
      if (s.texture_type == TEX_SURFACE) {
        tg.count = 1;
        tg.index[0] = surface_texel(wb, s.tex_res);
        tg.weight[0] = omega;
      } else {
        tg.count = 3;
        for (int i = 0; i < 3; ++i) {
          tg.index[i] = i;
          tg.weight[i] = omega * wb[i];
        }
      }
    } else if (f == fbest) {
      if (s.texture_type == TEX_SURFACE) {
        tg.count = 1;
        tg.index[0] = surface_texel(wb, s.tex_res);
        tg.weight[0] = T(1);
      } else {
        tg.count = 3;
        for (int i = 0; i < 3; ++i) {
          tg.index[i] = i;
          tg.weight[i] = wb[i];
        }
      }
    }
  }
  if (s.dist_func == DIST_HARD || dD == T(0)) return;
  const T d_eta = dD * cov.D * (T(1) - cov.D) * s.inv_sigma;  // through the sigmoid
  if (d_eta == T(0)) return;  // saturated coverage (D is exactly 0 or 1)
  if (s.dist_func == DIST_EUCLIDEAN) {
    const T k = T(2) * cov.sign * d_eta;
    for (int i = 0; i < 3; ++i) {
      grad_face[3 * i] += k * cov.coef[i] * cov.qp[0];
      grad_face[3 * i + 1] += k * cov.coef[i] * cov.qp[1];
    }
  } else {
    const T* A = info + 9;
    const T wm = cov.w[cov.m];
    const T k = -d_eta * T(2) * (wm > T(0) ? wm : -wm);
    for (int i = 0; i < 3; ++i) {
      grad_face[3 * i] += k * A[3 * cov.m] * cov.w[i];
      grad_face[3 * i + 1] += k * A[3 * cov.m + 1] * cov.w[i];
    }
  }
}

// Does face range (c_lo, c_hi, r_lo, r_hi) reach tile (tx, ty)?
UMR_HD bool range_hits_tile(const int* range, int tx, int ty) {
  return range[0] <= range[1] && range[2] <= range[3] && range[1] >= tx * kTileSize &&
         range[0] < (tx + 1) * kTileSize && range[3] >= ty * kTileSize && range[2] < (ty + 1) * kTileSize;
}

}  // namespace umr
