// Lane-parallel form of the per-(pixel, face) math of rasterize_math.h, for the CPU kernel: one
// face is evaluated on W consecutive pixels of a row at once (W = 8 floats or 4 doubles, one
// 32-byte vector; AVX2, see kAvailable). Each function
// mirrors a scalar one of rasterize_math.h operation for operation, with its data-dependent
// branches turned into lane masks; the arithmetic is the same IEEE operations in the same
// order (no FMA contraction), except exp (vector_exp below, within 2 ulp of libm). The scalar
// form stays the CUDA kernel's and the CPU kernel's with RasterConfig::vectorize off; the tests
// compare both against the PyTorch reference.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "rasterize_math.h"

// Lane functions are small and called once per row vector: always inlined.
#define UMR_LANES inline __attribute__((always_inline))

namespace umr {
namespace lanes {

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  using Int = int32_t;
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));  // lane masks (0 / -1) and lane integers
  static constexpr int W = 8;
  // exp: rounding shift 1.5 * 2^23, exponent bias and mantissa bits, argument range
  static constexpr float kRound = 12582912.0f, kLog2e = 1.44269504088896341f;
  static constexpr int kBias = 127, kMantissa = 23;
  static constexpr float kMinArg = -104.0f, kMaxArg = 88.7228394f;  // ln(FLT_MAX)
};
template <>
struct VecTraits<double> {
  using Int = int64_t;
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  static constexpr int W = 4;
  static constexpr double kRound = 6755399441055744.0, kLog2e = 1.4426950408889634074;
  static constexpr int kBias = 1023, kMantissa = 52;
  static constexpr double kMinArg = -745.2, kMaxArg = 709.782712893384;  // ln(DBL_MAX)
};

constexpr int kMaxLanes = 8;

// The CPU kernel takes the lanes only where the compiler targets AVX2: elsewhere GCC splits
// 32-byte vectors into slow generic code, and the per-pixel path is faster.
#if defined(__AVX2__)
constexpr bool kAvailable = true;
#else
constexpr bool kAvailable = false;
#endif

template <typename T>
using Vec = typename VecTraits<T>::V;
template <typename T>
using Ints = typename VecTraits<T>::I;
template <typename T>
using IntOf = typename VecTraits<T>::Int;
template <typename V>  // element type of a vector
using LaneOf = std::remove_cvref_t<decltype(std::declval<V>()[0])>;
template <typename V>
constexpr int num_lanes() {
  return int(sizeof(V) / sizeof(LaneOf<V>));
}

template <typename T>
UMR_LANES Vec<T> splat(T x) {
  return Vec<T>{} + x;
}
template <typename T>
UMR_LANES Ints<T> splat_int(int64_t x) {
  return Ints<T>{} + IntOf<T>(x);
}
template <typename T>
UMR_LANES Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
UMR_LANES void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
UMR_LANES Ints<T> load_ints(const IntOf<T>* p) {
  Ints<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
UMR_LANES void store_ints(IntOf<T>* p, Ints<T> v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename M, typename V>
UMR_LANES V select(M mask, V a, V b) {
  return mask ? a : b;
}
template <typename M, typename V>
UMR_LANES V select(M mask, V a, LaneOf<V> b) {
  return mask ? a : V{} + b;
}
template <typename M, typename V>
UMR_LANES V select(M mask, LaneOf<V> a, V b) {
  return mask ? V{} + a : b;
}
template <typename M>
UMR_LANES bool any(M mask) {
#if defined(__AVX__)
  return !_mm256_testz_si256((__m256i)mask, (__m256i)mask);  // one instruction instead of W extracts
#else
  LaneOf<M> acc = 0;
  for (int j = 0; j < num_lanes<M>(); ++j) acc |= mask[j];
  return acc != 0;
#endif
}
// Lanes j with j < n.
template <typename T>
UMR_LANES Ints<T> first_lanes(int n) {
  Ints<T> iota;
  for (int j = 0; j < VecTraits<T>::W; ++j) iota[j] = IntOf<T>(j);
  return iota < IntOf<T>(n);
}
template <typename V>
UMR_LANES LaneOf<V> sum_lanes(V v) {
  LaneOf<V> acc = 0;
  for (int j = 0; j < num_lanes<V>(); ++j) acc += v[j];
  return acc;
}
// umr_max / umr_min / umr_clamp of rasterize_math.h (same comparison, so the same NaN handling)
template <typename V, typename T>
UMR_LANES V vmax(V a, T b) {
  return a > b ? a : splat(b);
}
template <typename V, typename T>
UMR_LANES V vmin(V a, T b) {
  return a < b ? a : splat(b);
}
template <typename V, typename T>
UMR_LANES V vclamp(V v, T lo, T hi) {
  return vmin(vmax(v, lo), hi);
}

// 2^n for lane integers n in [2 * (1 - bias), 2 * bias]: two exactly representable factors.
template <typename T>
UMR_LANES Vec<T> pow2_pair(Ints<T> n, Vec<T> y) {
  using Tr = VecTraits<T>;
  const Ints<T> n1 = n >> 1, n2 = n - n1;
  const Vec<T> p1 = (Vec<T>)((n1 + Tr::kBias) << Tr::kMantissa);
  const Vec<T> p2 = (Vec<T>)((n2 + Tr::kBias) << Tr::kMantissa);
  return y * p1 * p2;
}

// exp of every lane: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by the Cephes approximations
// (expf: degree-6 polynomial; exp: a [2/3] rational function), times 2^n. Exactly 0 below
// the denormal range, +inf above the largest finite value and NaN for NaN, like libm.
UMR_LANES Vec<float> vector_exp(Vec<float> x) {
  using Tr = VecTraits<float>;
  const Vec<float> xc = vclamp(x, Tr::kMinArg, Tr::kMaxArg);
  const Vec<float> shifted = xc * Tr::kLog2e + Tr::kRound;  // rounds n to an integer
  const Vec<float> n = shifted - Tr::kRound;
  const Ints<float> ni = (Ints<float>)shifted - (Ints<float>)splat(Tr::kRound);
  Vec<float> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const Vec<float> z = r * r;
  Vec<float> y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const Vec<float> e = pow2_pair<float>(ni, y);
  return select(x < Tr::kMinArg, 0.0f, select(x > Tr::kMaxArg, float(INFINITY), select(x == x, e, x)));
}

UMR_LANES Vec<double> vector_exp(Vec<double> x) {
  using Tr = VecTraits<double>;
  const Vec<double> xc = vclamp(x, Tr::kMinArg, Tr::kMaxArg);
  const Vec<double> shifted = xc * Tr::kLog2e + Tr::kRound;
  const Vec<double> n = shifted - Tr::kRound;
  const Ints<double> ni = (Ints<double>)shifted - (Ints<double>)splat(Tr::kRound);
  Vec<double> r = xc - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  const Vec<double> rr = r * r;
  const Vec<double> p = r * ((rr * 1.26177193074810590878e-4 + 3.02994407707441961300e-2) * rr +
                             9.99999999999999999910e-1);
  const Vec<double> q =
      ((rr * 3.00198505138664455042e-6 + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr +
      2.00000000000000000009e0;
  const Vec<double> y = 1.0 + 2.0 * (p / (q - p));
  const Vec<double> e = pow2_pair<double>(ni, y);
  return select(x < Tr::kMinArg, 0.0, select(x > Tr::kMaxArg, double(INFINITY), select(x == x, e, x)));
}

template <typename V>
UMR_LANES V sigmoid(V x) {
  using T = LaneOf<V>;
  return select(x > sigmoid_saturation<T>(), T(1), T(1) / (T(1) + vector_exp(-x)));
}

// Coverage of W pixels (one row, columns px) by one face: the lane form of Coverage.
template <typename T>
struct CoverageLanes {
  Vec<T> w[3], D, sign, coef[3], qp[2];
  Vec<T> wm, am[2];  // barycentric: smallest w and row m of the barycentric inverse
  Ints<T> inside;
};

// eval_coverage with the bounding box already checked; returns the lanes the face is not
// culled on.
template <typename T>
UMR_LANES Ints<T> eval_coverage(const T* info, Vec<T> px, T py, const Settings<T>& s, CoverageLanes<T>& cov) {
  const T* A = info + 9;
  for (int k = 0; k < 3; ++k) cov.w[k] = A[3 * k] * px + A[3 * k + 1] * py + A[3 * k + 2];
  const Vec<T> w0 = cov.w[0], w1 = cov.w[1], w2 = cov.w[2];
  cov.inside = (w0 >= T(0)) & (w0 <= T(1)) & (w1 >= T(0)) & (w1 <= T(1)) & (w2 >= T(0)) & (w2 <= T(1));
  if (s.dist_func == DIST_HARD) {
    cov.D = splat(T(1));
    return cov.inside;
  }
  if (s.dist_func == DIST_BARYCENTRIC) {
    const Ints<T> g01 = w0 > w1, g12 = w1 > w2, g02 = w0 > w2;
    const Ints<T> is2 = (g01 & g12) | (~g01 & g02), is1 = g01 & ~g12;
    cov.wm = select(is2, w2, select(is1, w1, w0));
    for (int j = 0; j < 2; ++j) cov.am[j] = select(is2, splat(A[6 + j]), select(is1, splat(A[3 + j]), splat(A[j])));
    const Vec<T> sq = cov.wm * cov.wm;
    const Vec<T> delta = select(cov.wm > T(0), sq, -sq);
    cov.D = sigmoid(delta * s.inv_sigma);
    return ~(-delta >= s.threshold);
  }
  const Ints<T> strictly_inside =
      (w0 > T(0)) & (w0 < T(1)) & (w1 > T(0)) & (w1 < T(1)) & (w2 > T(0)) & (w2 < T(1));
  const Ints<T> outside = ~strictly_inside;
  cov.sign = select(strictly_inside, splat(T(1)), splat(T(-1)));
  const T* h = info + 24;
  const T limit = edge_cull_limit(s);
  Ints<T> keep = ~(outside & ((-w0 * h[0] > limit) | (-w1 * h[1] > limit) | (-w2 * h[2] > limit)));
  Vec<T> best = splat(T(1e8));
  for (int k = 0; k < 3; ++k) cov.coef[k] = splat(T(0));
  cov.qp[0] = cov.qp[1] = splat(T(0));
  const Ints<T> skip_far_edges = info[34] != T(0) ? outside : splat_int<T>(0);
  for (int k = 0; k < 3; ++k) {
    const int a = k, b = (k + 1) % 3, o = 3 - a - b;
    const T xa = info[3 * a], ya = info[3 * a + 1], xb = info[3 * b], yb = info[3 * b + 1];
    const T ex = xa - xb, ey = ya - yb;
    Vec<T> t = ((px - xb) * ex + (py - yb) * ey) * info[30 + k];
    t = vclamp(t, T(0), T(1));
    const Vec<T> qx = xb + t * ex - px, qy = splat(yb) + t * ey - py;
    const Vec<T> d2 = qx * qx + qy * qy;
    const Ints<T> better = ~(skip_far_edges & (cov.w[(k + 2) % 3] > T(0))) & (d2 < best);
    best = select(better, d2, best);
    cov.coef[a] = select(better, t, cov.coef[a]);
    cov.coef[b] = select(better, T(1) - t, cov.coef[b]);
    cov.coef[o] = select(better, T(0), cov.coef[o]);
    cov.qp[0] = select(better, qx, cov.qp[0]);
    cov.qp[1] = select(better, qy, cov.qp[1]);
  }
  keep &= ~((cov.sign < T(0)) & (best >= s.threshold));
  cov.D = sigmoid(cov.sign * best * s.inv_sigma);
  return keep;
}

// clipped_depth of every lane.
template <typename T>
UMR_LANES Vec<T> clipped_depth(const T* info, const Vec<T>* w, Vec<T>* wb) {
  for (int k = 0; k < 3; ++k) wb[k] = vclamp(w[k], T(1e-5), T(1) - T(1e-5));
  const Vec<T> sum = wb[0] + wb[1] + wb[2];
  const Vec<T> inv_sum = T(1) / vmax(sum, T(1e-5));
  for (int k = 0; k < 3; ++k) wb[k] *= inv_sum;
  return T(1) / (wb[0] * info[27] + wb[1] * info[28] + wb[2] * info[29]);
}

// surface_texel of every lane.
template <typename T>
UMR_LANES Ints<T> surface_texel(const Vec<T>* wb, int R) {
  const Vec<T> u = wb[0], v = wb[1];
  const Ints<T> zero = splat_int<T>(0), last = splat_int<T>(R - 1);
  Ints<T> i = __builtin_convertvector(u * T(R), Ints<T>), j = __builtin_convertvector(v * T(R), Ints<T>);
  i = i > 0 ? i : zero;
  i = i < R - 1 ? i : last;
  j = j > 0 ? j : zero;
  j = j < R - 1 ? j : last;
  const Vec<T> lam = (u + v) * T(R) - __builtin_convertvector(i, Vec<T>) - __builtin_convertvector(j, Vec<T>);
  return lam <= T(1) ? j * IntOf<T>(R) + i : (last - j) * IntOf<T>(R) + (last - i);
}

// face_color of the lanes in mask (others: 0); texel: the surface texel of every lane. Surface
// textures are read lane by lane (a gather).
template <typename T>
UMR_LANES void face_color(const T* tex, const Vec<T>* wb, Ints<T> mask, const Settings<T>& s, Vec<T>* color,
                          Ints<T>& texel) {
  if (s.texture_type == TEX_VERTEX) {
    for (int k = 0; k < 3; ++k) color[k] = select(mask, wb[0] * tex[k] + wb[1] * tex[3 + k] + wb[2] * tex[6 + k], T(0));
    return;
  }
  constexpr int W = VecTraits<T>::W;
  texel = surface_texel<T>(wb, s.tex_res);
  IntOf<T> lane_texel[W], lane_on[W];  // through memory: cheaper than extracting lane by lane
  store_ints<T>(lane_texel, texel);
  store_ints<T>(lane_on, mask);
  T gathered[3][W] = {};
  for (int j = 0; j < W; ++j) {
    if (!lane_on[j]) continue;
    const T* c = tex + 3 * lane_texel[j];
    for (int k = 0; k < 3; ++k) gathered[k][j] = c[k];
  }
  for (int k = 0; k < 3; ++k) color[k] = load(gathered[k]);
}

// Running state of a tile's pixels, one array per field (rows of kTileSize pixels), padded so
// that a row's last vector may run past the tile.
template <typename T>
struct TileState {
  static constexpr int kSize = kTileSize * kTileSize + kMaxLanes;
  T alpha[kSize], ssum[kSize], smax[kSize], color[3][kSize], zbest[kSize];
  IntOf<T> fbest[kSize];

  void init(const Settings<T>& s) {
    PixelState<T> p;
    init_pixel(s, p);
    for (int i = 0; i < kSize; ++i) set(i, p);
  }
  PixelState<T> get(int i) const {
    PixelState<T> p;
    p.alpha = alpha[i];
    p.ssum = ssum[i];
    p.smax = smax[i];
    for (int k = 0; k < 3; ++k) p.color[k] = color[k][i];
    p.zbest = zbest[i];
    p.fbest = int(fbest[i]);
    return p;
  }
  void set(int i, const PixelState<T>& p) {
    alpha[i] = p.alpha;
    ssum[i] = p.ssum;
    smax[i] = p.smax;
    for (int k = 0; k < 3; ++k) color[k][i] = p.color[k];
    zbest[i] = p.zbest;
    fbest[i] = IntOf<T>(p.fbest);
  }
};

// face_is_inert of every lane (state at index i onwards).
template <typename T>
UMR_LANES Ints<T> face_is_inert(const T* info, const Settings<T>& s, const TileState<T>& st, int i) {
  const Vec<T> alpha = load(st.alpha + i);
  const Ints<T> alpha_saturated = s.aggr_alpha == ALPHA_PROD   ? alpha == T(0)
                                  : s.aggr_alpha == ALPHA_HARD ? alpha == T(1)
                                                               : splat_int<T>(0);
  const Ints<T> behind = info[33] >= load(st.zbest + i);
  if (s.aggr_rgb == RGB_HARD) return alpha_saturated & behind;
  const T zeta_max = (s.far - info[33]) * s.inv_depth_range;
  const Vec<T> smax = load(st.smax + i);
  return alpha_saturated & behind & (zeta_max <= smax) & ((zeta_max - smax) * s.inv_gamma < exp_underflow<T>());
}

// update_pixel on the lanes in mask (coverage already evaluated); returns the p2f weights u
// (0 on the other lanes).
template <typename T>
UMR_LANES Vec<T> update_pixels(const T* info, const T* tex, int f, const CoverageLanes<T>& cov, Ints<T> mask,
                            const Settings<T>& s, TileState<T>& st, int i) {
  Vec<T> alpha = load(st.alpha + i);
  if (s.aggr_alpha == ALPHA_PROD) {
    alpha = select(mask, alpha * (T(1) - cov.D), alpha);
  } else if (s.aggr_alpha == ALPHA_SUM) {
    alpha = select(mask, alpha + cov.D, alpha);
  } else {
    alpha = select(mask & (cov.D > T(0.5)), T(1), alpha);
  }
  store(st.alpha + i, alpha);
  const bool facing = s.double_side || info[22] != T(0);
  if (!facing) return splat(T(0));
  Vec<T> wb[3];
  const Vec<T> zp = clipped_depth(info, cov.w, wb);
  const Ints<T> rgb = mask & ~((zp < s.near) | (zp > s.far));  // near/far: alpha only
  const Vec<T> zbest = load(st.zbest + i);
  const Ints<T> wins = rgb & cov.inside & (zp < zbest);
  store(st.zbest + i, select(wins, zp, zbest));
  store_ints<T>(st.fbest + i, wins ? splat_int<T>(f) : load_ints<T>(st.fbest + i));
  Vec<T> color[3];
  Ints<T> texel{};
  if (s.aggr_rgb == RGB_HARD) {
    face_color(tex, wb, wins, s, color, texel);
    for (int k = 0; k < 3; ++k) store(st.color[k] + i, select(wins, color[k], load(st.color[k] + i)));
    return splat(T(0));
  }
  face_color(tex, wb, rgb, s, color, texel);
  const Vec<T> zeta = (s.far - zp) * s.inv_depth_range;
  const Vec<T> smax = load(st.smax + i);
  const Ints<T> new_max = zeta > smax;  // a new maximum: its own weight is exp(0) = 1
  const Vec<T> e = vector_exp(select(new_max, smax - zeta, zeta - smax) * s.inv_gamma);
  const Vec<T> rescale = select(new_max, e, T(1));
  const Vec<T> u = select(rgb, select(new_max, cov.D, e * cov.D), T(0));
  store(st.smax + i, select(rgb & new_max, zeta, smax));
  const Vec<T> ssum = load(st.ssum + i);
  store(st.ssum + i, select(rgb, rescale * ssum + u, ssum));
  for (int k = 0; k < 3; ++k) {
    const Vec<T> c = load(st.color[k] + i);
    store(st.color[k] + i, select(rgb, rescale * c + u * color[k], c));
  }
  return u;
}

// What the backward needs of a tile's pixels, one array per field (padded as TileState).
template <typename T>
struct TileSaved {
  static constexpr int kSize = kTileSize * kTileSize + kMaxLanes;
  T g[4][kSize], rgba[4][kSize], ssum[kSize], smax[kSize], any_grad[kSize];
  IntOf<T> fbest[kSize];
};

// pair_is_inert of every lane.
template <typename T>
UMR_LANES Ints<T> pair_is_inert(const T* info, int f, const Settings<T>& s, const TileSaved<T>& sv, int i) {
  const Vec<T> g3 = load(sv.g[3] + i);
  const Ints<T> no_alpha = s.aggr_alpha == ALPHA_PROD  ? (g3 == T(0)) | (load(sv.rgba[3] + i) == T(1))
                           : s.aggr_alpha == ALPHA_SUM ? g3 == T(0)
                                                       : splat_int<T>(-1);
  const Ints<T> no_rgb = (load(sv.g[0] + i) == T(0)) & (load(sv.g[1] + i) == T(0)) & (load(sv.g[2] + i) == T(0));
  Ints<T> rgb_inert;
  if (s.aggr_rgb == RGB_HARD) {
    rgb_inert = load_ints<T>(sv.fbest + i) != IntOf<T>(f);
  } else {
    const T zeta_max = (s.far - info[33]) * s.inv_depth_range;
    const Vec<T> smax = load(sv.smax + i);
    rgb_inert = (zeta_max <= smax) & ((zeta_max - smax) * s.inv_gamma < exp_underflow<T>());
  }
  return no_alpha & (no_rgb | rgb_inert);
}

// Per-face gradient sums of backward_pair, one partial sum per lane.
template <typename T>
struct FaceGradLanes {
  Vec<T> g[9] = {};
  void add_to(T* grad_face) const {
    for (int j = 0; j < 9; ++j) grad_face[j] += sum_lanes(g[j]);
  }
};

// backward_pair on the lanes in mask. Texture gradients are returned per lane, to be spread by
// the caller: weight (0: none) and, for surface textures, the texel.
template <typename T>
UMR_LANES void backward_pairs(const T* info, const T* tex, int f, const CoverageLanes<T>& cov, Ints<T> mask,
                           const Settings<T>& s, const TileSaved<T>& sv, int i, FaceGradLanes<T>& grad,
                           Vec<T>* wb, Vec<T>& tex_weight, Ints<T>& texel) {
  Vec<T> g[4], rgba[4];
  for (int k = 0; k < 4; ++k) {
    g[k] = load(sv.g[k] + i);
    rgba[k] = load(sv.rgba[k] + i);
  }
  Vec<T> dD = splat(T(0));
  if (s.aggr_alpha == ALPHA_PROD) {
    dD = g[3] * (T(1) - rgba[3]) / vmax(T(1) - cov.D, T(1e-6));
  } else if (s.aggr_alpha == ALPHA_SUM) {
    dD = g[3] / T(s.num_faces);
  }
  const Vec<T> zp = clipped_depth(info, cov.w, wb);
  const bool facing = s.double_side || info[22] != T(0);
  const Ints<T> rgb = facing ? mask & (zp >= s.near) & (zp <= s.far) : splat_int<T>(0);
  tex_weight = splat(T(0));
  if (s.aggr_rgb == RGB_SOFTMAX) {
    Vec<T> color[3];
    face_color(tex, wb, rgb, s, color, texel);
    const Vec<T> zeta = (s.far - zp) * s.inv_depth_range;
    const Vec<T> weight_over_D = vector_exp((zeta - load(sv.smax + i)) * s.inv_gamma) / load(sv.ssum + i);
    const Vec<T> omega = weight_over_D * cov.D;
    const Vec<T> lam = g[0] * (color[0] - rgba[0]) + g[1] * (color[1] - rgba[1]) + g[2] * (color[2] - rgba[2]);
    if (s.rgb_geometry_grad) {
      dD = select(rgb, dD + weight_over_D * lam, dD);
      const Vec<T> dz = -omega * lam * s.inv_gamma * s.inv_depth_range * zp * zp;
      for (int k = 0; k < 3; ++k) grad.g[3 * k + 2] += select(rgb, dz * wb[k] * info[27 + k] * info[27 + k], T(0));
    }
    tex_weight = select(rgb, omega, T(0));
  } else {
    const Ints<T> winner = rgb & (load_ints<T>(sv.fbest + i) == IntOf<T>(f));
    tex_weight = select(winner, splat(T(1)), T(0));
    if (s.texture_type == TEX_SURFACE) texel = surface_texel<T>(wb, s.tex_res);
  }
  if (s.dist_func == DIST_HARD) return;
  const Vec<T> d_eta = dD * cov.D * (T(1) - cov.D) * s.inv_sigma;  // through the sigmoid
  const Ints<T> live = mask & (dD != T(0)) & (d_eta != T(0));
  if (!any(live)) return;
  if (s.dist_func == DIST_EUCLIDEAN) {
    const Vec<T> k = T(2) * cov.sign * d_eta;
    for (int v = 0; v < 3; ++v) {
      grad.g[3 * v] += select(live, k * cov.coef[v] * cov.qp[0], T(0));
      grad.g[3 * v + 1] += select(live, k * cov.coef[v] * cov.qp[1], T(0));
    }
  } else {
    const Vec<T> k = -d_eta * T(2) * select(cov.wm > T(0), cov.wm, -cov.wm);
    for (int v = 0; v < 3; ++v) {
      grad.g[3 * v] += select(live, k * cov.am[0] * cov.w[v], T(0));
      grad.g[3 * v + 1] += select(live, k * cov.am[1] * cov.w[v], T(0));
    }
  }
}

}  // namespace lanes
}  // namespace umr
