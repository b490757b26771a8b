// Vectors of W consecutive pixels of a row (W = 8 floats or 4 doubles, one 32-byte vector; AVX2,
// see kAvailable) for the CPU kernel's SIMD path: the batch type Batch<Vec<T>> under which the
// per-pixel math of rasterize_math.h (written once for one pixel or a vector of them) runs,
// vector exp (within 2 ulp of libm), and the tile's per-pixel state as arrays.
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

// The vector batch of rasterize_math.h: W pixels of a row, lane masks.
template <typename T>
struct VectorBatch {
  using Value = T;
  using Mask = Ints<T>;
  using Int = Ints<T>;
  static constexpr int kLanes = VecTraits<T>::W;
  static UMR_LANES Vec<T> splat(T x) { return lanes::splat(x); }
  static UMR_LANES Ints<T> splat_int(int64_t x) { return lanes::splat_int<T>(x); }
  static UMR_LANES Ints<T> none() { return Ints<T>{}; }
  static UMR_LANES Ints<T> all() { return ~Ints<T>{}; }
  static UMR_LANES bool any(Ints<T> m) { return lanes::any(m); }
  static UMR_LANES Ints<T> mask_not(Ints<T> m) { return ~m; }
  static UMR_LANES Vec<T> select(Ints<T> m, Vec<T> a, Vec<T> b) { return m ? a : b; }
  static UMR_LANES Ints<T> select_int(Ints<T> m, Ints<T> a, Ints<T> b) { return m ? a : b; }
  static UMR_LANES Vec<T> min(Vec<T> a, Vec<T> b) { return a < b ? a : b; }  // umr_min's comparison
  static UMR_LANES Vec<T> max(Vec<T> a, Vec<T> b) { return a > b ? a : b; }
  static UMR_LANES Vec<T> exp(Vec<T> x) { return vector_exp(x); }
  static UMR_LANES Ints<T> to_int(Vec<T> x) { return __builtin_convertvector(x, Ints<T>); }
  static UMR_LANES Vec<T> to_value(Ints<T> i) { return __builtin_convertvector(i, Vec<T>); }
  // A gather, lane by lane through memory (cheaper than extracting lanes one by one).
  static UMR_LANES void gather3(const T* tex, Ints<T> texel, Ints<T> mask, Vec<T>* color) {
    constexpr int W = VecTraits<T>::W;
    IntOf<T> lane_texel[W], lane_on[W];
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
};

// Running state of a tile's pixels, one array per field (rows of kTileSize pixels), padded so
// that a row's last vector may run past the tile.
template <typename T>
struct alignas(64) TileState {
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
  // The W pixels from index i on, in two steps: what face_is_inert reads, then the rest (most
  // vectors of pixels are culled in between).
  UMR_LANES void load_inert_fields(int i, PixelState<Vec<T>>& p) const {
    p.alpha = load(alpha + i);
    p.smax = load(smax + i);
    p.zbest = load(zbest + i);
  }
  UMR_LANES void load_other_fields(int i, PixelState<Vec<T>>& p) const {
    p.ssum = load(ssum + i);
    for (int k = 0; k < 3; ++k) p.color[k] = load(color[k] + i);
    p.fbest = load_ints<T>(fbest + i);
  }
  UMR_LANES void store_lanes(int i, const PixelState<Vec<T>>& p) {
    store(alpha + i, p.alpha);
    store(ssum + i, p.ssum);
    store(smax + i, p.smax);
    for (int k = 0; k < 3; ++k) store(color[k] + i, p.color[k]);
    store(zbest + i, p.zbest);
    store_ints<T>(fbest + i, p.fbest);
  }
};

// What the backward needs of a tile's pixels, one array per field (padded as TileState).
template <typename T>
struct alignas(64) TileSaved {
  static constexpr int kSize = kTileSize * kTileSize + kMaxLanes;
  T g[4][kSize], rgba[4][kSize], ssum[kSize], smax[kSize], any_grad[kSize];
  IntOf<T> fbest[kSize];

  PixelSaved<T> get(int i) const {
    PixelSaved<T> p;
    for (int k = 0; k < 4; ++k) {
      p.g[k] = g[k][i];
      p.rgba[k] = rgba[k][i];
    }
    p.ssum = ssum[i];
    p.smax = smax[i];
    p.fbest = int(fbest[i]);
    return p;
  }
  UMR_LANES PixelSaved<Vec<T>> load_lanes(int i) const {
    PixelSaved<Vec<T>> p;
    for (int k = 0; k < 4; ++k) {
      p.g[k] = load(g[k] + i);
      p.rgba[k] = load(rgba[k] + i);
    }
    p.ssum = load(ssum + i);
    p.smax = load(smax + i);
    p.fbest = load_ints<T>(fbest + i);
    return p;
  }
};

}  // namespace lanes

template <>
struct Batch<lanes::Vec<float>> : lanes::VectorBatch<float> {};
template <>
struct Batch<lanes::Vec<double>> : lanes::VectorBatch<double> {};

}  // namespace umr
