"""The C++ soft-rasterizer kernel against the dense PyTorch reference (docs/rasterizer.md)."""
import itertools
import os
from dataclasses import replace

import pytest
import torch

from umr import _C
from umr.rasterizer_reference import kept_pairs_reference, soft_rasterize_reference
from umr.renderer import RasterSettings, soft_rasterize

UMR = dict(sigma_val=1e-5, gamma_val=1e-4, dist_eps=1e-10)  # the values UMR renders with
SOFT = dict(sigma_val=1e-3, gamma_val=1e-2, dist_eps=1e-10)  # well-conditioned, for gradients


def random_faces(batch, num_faces, seed, dtype=torch.float64, special=True):
    """Random screen-space triangles, incl. degenerate, back-facing and border-crossing ones."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, num_faces, 1, 2, generator=g, dtype=dtype) * 2.4 - 1.2
    sizes = torch.rand(batch, num_faces, 1, 1, generator=g, dtype=dtype) * 0.6 + 0.05
    xy = centres + (torch.rand(batch, num_faces, 3, 2, generator=g, dtype=dtype) - 0.5) * sizes
    z = torch.rand(batch, num_faces, 3, 1, generator=g, dtype=dtype) * 6 + 2
    fv = torch.cat([xy, z], dim=-1)
    if special:
        fv[:, 0, :, :2] = torch.tensor([[-0.5, -0.5], [0.0, 0.0], [0.5, 0.5]], dtype=dtype)  # collinear
        fv[:, 1, 1] = fv[:, 1, 0]  # zero-length edge
        fv[:, 2, :, :2] = 0.1  # a point
        fv[:, 3, :, :2] = torch.tensor([[-1.6, -1.3], [1.7, -0.2], [-0.3, 1.5]], dtype=dtype)  # crosses the border
        fv[:, 4, :, 2] = 0.5  # nearer than the near plane: alpha only
        fv[:, 5, :, :2] = fv[:, 5, :, :2].flip(1)  # reversed winding
    return fv


def random_textures(fv, kind, seed, res=4):
    g = torch.Generator().manual_seed(seed)
    texels = res * res if kind == "surface" else 3
    return torch.rand(*fv.shape[:2], texels, 3, generator=g, dtype=fv.dtype)


MODES = list(itertools.product(["euclidean", "barycentric", "hard"], ["softmax", "hard"], ["prod", "sum", "hard"]))


def on(device, vectorize, *tensors):
    """The tensors on ``device``; skips the per-pixel variant on CUDA (one kernel there)."""
    if device.type == "cuda" and not vectorize:
        pytest.skip("CUDA has one path: the per-pixel math")
    return [t.to(device) for t in tensors]


def assert_outputs_close(out, ref, atol):
    torch.testing.assert_close(out.image, ref.image, atol=atol, rtol=0)
    assert torch.equal(out.face_index, ref.face_index)
    torch.testing.assert_close(out.depth, ref.depth, atol=atol, rtol=0)
    if ref.p2f is not None:
        torch.testing.assert_close(out.p2f, ref.p2f, atol=atol, rtol=0)


@pytest.mark.parametrize("vectorize", [True, False])  # SIMD lanes / the per-pixel (CUDA) math
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("texture_type", ["surface", "vertex"])
@pytest.mark.parametrize("dist,rgb,alpha", MODES)
def test_forward_matches_reference(dtype, atol, texture_type, dist, rgb, alpha, vectorize, device):
    fv = random_faces(2, 40, seed=1, dtype=dtype)
    fv, tex = on(device, vectorize, fv, random_textures(fv, texture_type, seed=2))
    for params in (SOFT, UMR):
        settings = RasterSettings(
            image_size=40, dist_func=dist, aggr_func_rgb=rgb, aggr_func_alpha=alpha, texture_type=texture_type,
            background_color=(0.2, 0.4, 0.6), return_p2f=True, vectorize=vectorize, **params,
        )
        assert_outputs_close(soft_rasterize(fv, tex, settings), soft_rasterize_reference(fv, tex, settings), atol)


@pytest.mark.parametrize("vectorize", [True, False])  # SIMD lanes / the per-pixel (CUDA) math
@pytest.mark.parametrize("dist", ["euclidean", "barycentric", "hard"])
def test_small_and_sliver_faces_match_reference(dist, vectorize, device):
    """Faces of a few pixels, slivers and faces with far-off vertices: the kernel skips most of
    such a face's bounding box by its per-row cull spans, which must drop no pixel that counts."""
    g = torch.Generator().manual_seed(11)
    B, F = 2, 60
    centres = torch.rand(B, F, 1, 2, generator=g, dtype=torch.float64) * 2 - 1
    xy = centres + (torch.rand(B, F, 3, 2, generator=g, dtype=torch.float64) - 0.5) * 0.08
    xy[:, :10, 2] = xy[:, :10, 0] + (xy[:, :10, 1] - xy[:, :10, 0]) * 1.5 + 1e-4  # slivers
    xy[:, 10:15, 0] = xy[:, 10:15, 0] * 300.0  # one vertex far off the raster
    fv = torch.cat([xy, torch.rand(B, F, 3, 1, generator=g, dtype=torch.float64) * 4 + 2], dim=-1)
    fv, tex = on(device, vectorize, fv, random_textures(fv, "surface", seed=3))
    for params in (SOFT, UMR):
        settings = RasterSettings(image_size=64, dist_func=dist, return_p2f=True, vectorize=vectorize, **params)
        assert_outputs_close(soft_rasterize(fv, tex, settings), soft_rasterize_reference(fv, tex, settings), 1e-9)
        (kernel_fv, kernel_tex), (ref_fv, ref_tex) = kernel_and_reference_grads(fv, tex, settings)
        scale = ref_fv.abs().max().clamp_min(1.0)
        torch.testing.assert_close(kernel_fv / scale, ref_fv / scale, atol=1e-9, rtol=0)
        torch.testing.assert_close(kernel_tex, ref_tex, atol=1e-9, rtol=0)


@pytest.mark.parametrize("vectorize", [True, False])  # SIMD lanes / the per-pixel (CUDA) math
def test_forward_options_match_reference(vectorize, device):
    fv = random_faces(2, 30, seed=3)
    fv, tex = on(device, vectorize, fv, random_textures(fv, "surface", seed=4, res=6))
    for settings in (
        RasterSettings(image_size=33, double_side=False, **SOFT),  # odd size, front faces only
        RasterSettings(image_size=24, near=3.0, far=6.0, **SOFT),  # near/far cut faces
        RasterSettings(image_size=24, eps=1e-2, return_p2f=True, p2f_align_corners=False, **SOFT),
        RasterSettings(image_size=1, return_p2f=True, **SOFT),
        RasterSettings(image_size=24, dist_eps=1e-4),  # SoftRas defaults
    ):
        settings = replace(settings, vectorize=vectorize)
        assert_outputs_close(soft_rasterize(fv, tex, settings), soft_rasterize_reference(fv, tex, settings), 1e-9)


def test_empty_image_is_background():
    fv = random_faces(2, 10, seed=5, special=False)
    fv[..., 0] += 5.0  # everything off-screen
    settings = RasterSettings(image_size=16, background_color=(0.1, 0.2, 0.3), return_p2f=True, **UMR)
    out = soft_rasterize(fv, None, settings)
    assert_outputs_close(out, soft_rasterize_reference(fv, None, settings), 1e-12)
    assert torch.all(out.face_index == -1) and torch.all(torch.isinf(out.depth))
    torch.testing.assert_close(out.image[:, :3], torch.tensor([0.1, 0.2, 0.3], dtype=fv.dtype)[None, :, None, None].expand(2, 3, 16, 16))
    assert torch.all(out.image[:, 3] == 0) and torch.all(out.p2f == 0)


def test_p2f_is_zero_in_hard_rgb_mode():
    # docs/rasterizer.md §4.2: only the softmax branch accumulates p2f
    fv = random_faces(1, 20, seed=6)
    out = soft_rasterize(fv, None, RasterSettings(image_size=32, aggr_func_rgb="hard", return_p2f=True, **SOFT))
    assert torch.all(out.p2f == 0)


def kernel_and_reference_grads(fv, tex, settings, seed=7):
    grad_out = torch.randn(fv.shape[0], 4, settings.image_size, settings.image_size, dtype=fv.dtype,
                           generator=torch.Generator().manual_seed(seed)).to(fv.device)
    grads = []
    for fn in (soft_rasterize, soft_rasterize_reference):
        fv_, tex_ = fv.clone().requires_grad_(), tex.clone().requires_grad_()
        (fn(fv_, tex_, settings).image * grad_out).sum().backward()
        grads.append((fv_.grad if fv_.grad is not None else torch.zeros_like(fv_), tex_.grad))
    return grads


@pytest.mark.parametrize("vectorize", [True, False])  # SIMD lanes / the per-pixel (CUDA) math
@pytest.mark.parametrize("texture_type", ["surface", "vertex"])
@pytest.mark.parametrize("dist,rgb,alpha", MODES)
def test_backward_matches_reference(texture_type, dist, rgb, alpha, vectorize, device):
    fv = random_faces(2, 40, seed=8)
    fv, tex = on(device, vectorize, fv, random_textures(fv, texture_type, seed=9))
    for params in (SOFT, UMR):
        settings = RasterSettings(
            image_size=32, dist_func=dist, aggr_func_rgb=rgb, aggr_func_alpha=alpha, texture_type=texture_type,
            vectorize=vectorize, **params,
        )
        (kernel_fv, kernel_tex), (ref_fv, ref_tex) = kernel_and_reference_grads(fv, tex, settings)
        scale = ref_fv.abs().max().clamp_min(1.0)
        torch.testing.assert_close(kernel_fv / scale, ref_fv / scale, atol=1e-9, rtol=0)
        torch.testing.assert_close(kernel_tex, ref_tex, atol=1e-9, rtol=0)
        if dist != "hard" and alpha != "hard":
            assert ref_fv.abs().max() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("vectorize", [True, False])  # SIMD lanes / the per-pixel (CUDA) math
@pytest.mark.parametrize("dist", ["euclidean", "barycentric"])
def test_rgb_without_geometry_gradient(dist, vectorize, device):
    # rgb_geometry_grad=False: RGB gradients reach the textures only, alpha's reach the geometry
    fv = random_faces(2, 30, seed=22)
    fv, tex = on(device, vectorize, fv, random_textures(fv, "surface", seed=23))
    settings = RasterSettings(image_size=24, dist_func=dist, rgb_geometry_grad=False, vectorize=vectorize, **SOFT)
    (kernel_fv, kernel_tex), (ref_fv, ref_tex) = kernel_and_reference_grads(fv, tex, settings)
    scale = ref_fv.abs().max()
    torch.testing.assert_close(kernel_fv / scale, ref_fv / scale, atol=1e-9, rtol=0)
    torch.testing.assert_close(kernel_tex, ref_tex, atol=1e-9, rtol=0)
    fv_ = fv.clone().requires_grad_()
    tex_ = tex.clone().requires_grad_()
    image = soft_rasterize(fv_, tex_, settings).image
    image[:, :3].sum().backward()
    assert torch.all(fv_.grad == 0) and tex_.grad.abs().sum() > 0
    full = RasterSettings(image_size=24, dist_func=dist, **SOFT)
    fv_a = fv.clone().requires_grad_()
    fv_b = fv.clone().requires_grad_()
    soft_rasterize(fv_a, tex, settings).image[:, 3].sum().backward()
    soft_rasterize(fv_b, tex, full).image[:, 3].sum().backward()
    torch.testing.assert_close(fv_a.grad, fv_b.grad)  # alpha's gradient is unchanged


@pytest.mark.parametrize("vectorize", [True, False])  # SIMD lanes / the per-pixel (CUDA) math
def test_backward_float32_matches_reference(vectorize, device):
    fv = random_faces(2, 40, seed=10, dtype=torch.float32)
    fv, tex = on(device, vectorize, fv, random_textures(fv, "surface", seed=11))
    settings = RasterSettings(image_size=32, vectorize=vectorize, **SOFT)
    (kernel_fv, kernel_tex), (ref_fv, ref_tex) = kernel_and_reference_grads(fv, tex, settings)
    scale, tex_scale = ref_fv.abs().max(), ref_tex.abs().max()
    torch.testing.assert_close(kernel_fv / scale, ref_fv / scale, atol=1e-5, rtol=0)
    torch.testing.assert_close(kernel_tex / tex_scale, ref_tex / tex_scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dist", ["euclidean", "barycentric"])
@pytest.mark.parametrize("alpha", ["prod", "sum"])
@pytest.mark.parametrize("texture_type", ["surface", "vertex"])
def test_gradcheck(dist, alpha, texture_type):
    # docs/rasterizer.md §5.5: float64, a small raster, few non-degenerate faces, unsaturated sigmoid and
    # softmax, equal vertex depths per face and per-face-constant colours so the terms the
    # analytic gradient leaves out (docs/rasterizer.md §5.3) vanish.
    fv = torch.tensor(
        [[[[-0.6, -0.5, 3.0], [0.4, -0.6, 3.0], [-0.1, 0.5, 3.0]],
          [[0.0, -0.2, 4.0], [0.7, 0.3, 4.0], [-0.2, 0.6, 4.0]],
          [[-0.9, 0.2, 2.5], [-0.3, 0.9, 2.5], [-0.8, 0.8, 2.5]]]],
        dtype=torch.float64,
    )
    # off the pixel grid, so no pixel centre sits on a median or edge line (region switches)
    fv[..., :2] += 0.03 * torch.rand(1, 3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    colours = torch.rand(1, 3, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    tex = colours if texture_type == "surface" else colours.expand(1, 3, 3, 3).contiguous()
    settings = RasterSettings(
        image_size=10, sigma_val=2e-2, gamma_val=5e-2, dist_eps=1e-10, dist_func=dist, aggr_func_alpha=alpha,
        texture_type=texture_type, background_color=(0.3, 0.2, 0.1),
    )
    fv.requires_grad_()
    tex.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, t: soft_rasterize(v, t, settings).image, (fv, tex), eps=1e-6, atol=1e-5)


def test_gradcheck_surface_texels():
    # texture gradients with R x R texels: one-hot on the texel the forward reads (docs/rasterizer.md §5.3.6)
    fv = random_faces(1, 6, seed=13, special=False)
    tex = random_textures(fv, "surface", seed=14, res=3).requires_grad_()
    settings = RasterSettings(image_size=12, **SOFT)
    assert torch.autograd.gradcheck(lambda t: soft_rasterize(fv, t, settings).image, (tex,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binned_equals_unbinned(dtype, device):
    fv = random_faces(3, 300, seed=15, dtype=dtype)
    fv, tex = on(device, True, fv, random_textures(fv, "surface", seed=16))
    grad_out = torch.randn(3, 4, 80, 80, dtype=dtype, generator=torch.Generator().manual_seed(17)).to(device)
    results = []
    for binning in (True, False):
        settings = RasterSettings(image_size=80, binning=binning, return_p2f=True, **UMR)
        fv_, tex_ = fv.clone().requires_grad_(), tex.clone().requires_grad_()
        out = soft_rasterize(fv_, tex_, settings)
        (out.image * grad_out).sum().backward()
        results.append((out, fv_.grad, tex_.grad))
    (binned, g_fv, g_tex), (dense, d_fv, d_tex) = results
    assert_outputs_close(binned, dense, 1e-6)
    # gradients are sums over many pixels (atomic adds in any order): compare relative to their size
    scale, tex_scale = d_fv.abs().max(), d_tex.abs().max()
    torch.testing.assert_close(g_fv / scale, d_fv / scale, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_tex / tex_scale, d_tex / tex_scale, atol=1e-6, rtol=0)


def reference_bins(ranges, num_tiles):
    """Per tile (b, ty, tx) the ascending faces whose pixel range (c_lo, c_hi, r_lo, r_hi) reaches it."""
    B, F = ranges.shape[:2]
    T = _C.tile_size
    ty = torch.arange(num_tiles)[:, None]
    tx = torch.arange(num_tiles)[None, :]
    lists = []
    for b in range(B):
        c_lo, c_hi, r_lo, r_hi = (ranges[b, :, k, None, None] for k in range(4))
        reaches = (c_lo <= c_hi) & (r_lo <= r_hi) & (c_hi >= tx * T) & (c_lo < (tx + 1) * T) \
            & (r_hi >= ty * T) & (r_lo < (ty + 1) * T)  # (F, nt, nt)
        for t in range(num_tiles * num_tiles):
            lists.append(torch.nonzero(reaches.reshape(F, -1)[:, t]).flatten().to(torch.int32))
    return lists


@pytest.mark.parametrize("dist", ["euclidean", "barycentric", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_binning_and_cull_visit_every_kept_pair(dist, dtype, device):
    """The tile lists and cull spans of rasterize_tiles.h, which both kernels use: bins equal a
    Python re-computation from the face ranges (whichever device built them), and the pairs the
    spans let through include every pair the dense reference's coverage test keeps."""
    S = 70  # not a multiple of the tile size: partial tiles at the edges
    fv = random_faces(2, 200, seed=21, dtype=dtype)
    fv[0, 6, 0, 0] = float("nan")  # never rasterized: empty range
    fv[1, 7, :, :2] += 5.0  # off the raster
    settings = RasterSettings(image_size=S, dist_func=dist, **SOFT)
    kept = kept_pairs_reference(fv, settings)
    (fv_dev, tex) = on(device, True, fv, random_textures(fv, "surface", seed=22))
    out = _C.forward(fv_dev, tex, settings.kernel_config())
    bins = {name: out[name].cpu() for name in ("face_info", "face_ranges", "bin_offsets", "bin_faces")}
    info, ranges, offsets, faces = bins.values()
    nt = -(-S // _C.tile_size)
    assert offsets.shape == (2 * nt * nt + 1,) and offsets[0] == 0
    expected = reference_bins(ranges, nt)
    for tile, faces_expected in enumerate(expected):
        assert torch.equal(faces[offsets[tile]:offsets[tile + 1]], faces_expected), f"tile {tile}"
    assert (ranges[0, 6, 0] > ranges[0, 6, 1]) and (ranges[1, 7, 0] > ranges[1, 7, 1])
    visited = _C.visited_pairs(bins, settings.kernel_config())
    assert kept.any() and not (kept & ~visited).any(), "a kept pair is culled by the binning"
    in_ranges = sum(int((r[1] - r[0] + 1).clamp_min(0) * (r[3] - r[2] + 1).clamp_min(0)) for r in ranges.reshape(-1, 4))
    # tight: the spans skip a quarter or more of the faces' pixel ranges, and pass at most twice
    # the pairs that the coverage test keeps (they are widened by a column against rounding)
    assert int(visited.sum()) < 0.75 * in_ranges and int(visited.sum()) < 2 * int(kept.sum())


def test_simd_lanes_built_where_the_machine_has_avx2():
    # setup.py adds -mavx2 on such machines unless UMR_CPU_SIMD=0: a build that lost the flag
    # would silently run the slower per-pixel path
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "avx2" not in flags or os.environ.get("UMR_CPU_SIMD") == "0":
        pytest.skip("this machine or build has no AVX2")
    assert _C.cpu_simd


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
@pytest.mark.parametrize("texture_type", ["surface", "vertex"])
@pytest.mark.skipif(not _C.cpu_simd, reason="built without AVX2: the CPU kernel has no SIMD lanes")
def test_vectorized_equals_per_pixel(dtype, atol, texture_type):
    # the SIMD lanes against the per-pixel math on a crowded scene at UMR's sharpness: same
    # z-buffer winners and depths, and images and gradients within a few ulp (only exp differs)
    fv = random_faces(2, 400, seed=24, dtype=dtype)
    tex = random_textures(fv, texture_type, seed=25, res=6)
    grad_out = torch.randn(2, 4, 96, 96, dtype=dtype, generator=torch.Generator().manual_seed(26))
    results = []
    for vectorize in (True, False):
        settings = RasterSettings(image_size=96, texture_type=texture_type, return_p2f=True, vectorize=vectorize, **UMR)
        fv_, tex_ = fv.clone().requires_grad_(), tex.clone().requires_grad_()
        out = soft_rasterize(fv_, tex_, settings)
        (out.image * grad_out).sum().backward()
        results.append((out, fv_.grad, tex_.grad))
    (lanes, l_fv, l_tex), (scalar, s_fv, s_tex) = results
    assert torch.equal(lanes.face_index, scalar.face_index) and torch.equal(lanes.depth, scalar.depth)
    assert (scalar.face_index >= 0).sum() > 1000  # a covered scene, not a vacuous comparison
    torch.testing.assert_close(lanes.image, scalar.image, atol=atol, rtol=0)
    torch.testing.assert_close(lanes.p2f, scalar.p2f, atol=atol * 10, rtol=0)
    scale, tex_scale = s_fv.abs().max(), s_tex.abs().max()
    torch.testing.assert_close(l_fv / scale, s_fv / scale, atol=atol * 10, rtol=0)
    torch.testing.assert_close(l_tex / tex_scale, s_tex / tex_scale, atol=atol * 10, rtol=0)


@pytest.mark.parametrize("dtype,lo,hi", [(torch.float32, -120.0, 100.0), (torch.float64, -800.0, 720.0)])
def test_lanes_exp_matches_libm(dtype, lo, hi):
    # the SIMD lanes' exp (the one operation that does not round as the scalar math): within
    # 2 eps relative in the normal range, one subnormal step below it, 0 / inf / NaN as libm
    x = torch.linspace(lo, hi, 200001, dtype=torch.float64).to(dtype)
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")], dtype=dtype)])
    y = _C.lanes_exp(x)
    ref, exact = torch.exp(x), torch.exp(x.double())
    info = torch.finfo(dtype)
    normal = torch.isfinite(ref) & (ref >= info.smallest_normal)
    assert ((y.double() - exact) / exact)[normal].abs().max() <= 2 * info.eps
    subnormal = (ref < info.smallest_normal) & ~torch.isnan(x)
    assert (y.double() - exact)[subnormal].abs().max() <= info.smallest_normal * info.eps
    assert torch.equal(torch.isinf(y), torch.isinf(ref)) and torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(y[-5:-1], ref[-5:-1])  # exp(±0) = 1, exp(inf) = inf, exp(-inf) = 0


def test_float32_matches_float64():
    fv = random_faces(2, 200, seed=18, special=False)
    tex = random_textures(fv, "surface", seed=19, res=1)
    settings = RasterSettings(image_size=64, sigma_val=1e-4, gamma_val=1e-2, dist_eps=1e-10, return_p2f=True)
    out64 = soft_rasterize(fv, tex, settings)
    out32 = soft_rasterize(fv.float(), tex.float(), settings)
    torch.testing.assert_close(out32.image.double(), out64.image, atol=1e-5, rtol=0)
    torch.testing.assert_close(out32.p2f.double(), out64.p2f, atol=1e-5, rtol=0)
    assert (out32.face_index != out64.face_index).float().mean() < 1e-3  # only exact-edge pixels may differ


def test_input_errors():
    fv = random_faces(1, 4, seed=20, special=False)
    tex = random_textures(fv, "surface", seed=21)
    settings = RasterSettings(image_size=8)
    with pytest.raises(RuntimeError, match=r"face_vertices must be \(B, F, 3, 3\)"):
        soft_rasterize(fv[..., :2], tex, settings)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        soft_rasterize(fv.half(), tex.half(), settings)
    with pytest.raises(RuntimeError, match="textures has dtype"):
        soft_rasterize(fv, tex.float(), settings)
    with pytest.raises(RuntimeError, match="R\\*R texels"):
        soft_rasterize(fv, tex[:, :, :5], settings)
    with pytest.raises(RuntimeError, match="vertex colours need 3"):
        soft_rasterize(fv, tex, RasterSettings(image_size=8, texture_type="vertex"))
    with pytest.raises(RuntimeError, match="textures must be"):
        soft_rasterize(fv, tex[:, :3], settings)
    with pytest.raises(RuntimeError, match="is on meta"):
        soft_rasterize(fv, torch.empty_like(tex, device="meta"), settings)
    with pytest.raises(RuntimeError, match="dist_eps"):
        soft_rasterize(fv, tex, RasterSettings(image_size=8, dist_eps=0.7))
    with pytest.raises(RuntimeError, match="far"):
        soft_rasterize(fv, tex, RasterSettings(image_size=8, near=5.0, far=2.0))
    with pytest.raises(ValueError, match="dist_func"):
        RasterSettings(dist_func="manhattan")
    # the raw kernel refuses non-contiguous input (soft_rasterize makes its inputs contiguous)
    strided = torch.cat([fv, fv], dim=-1)[..., :3]
    assert not strided.is_contiguous()
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.forward(strided, tex, settings.kernel_config())
    torch.testing.assert_close(soft_rasterize(strided, tex, settings).image, soft_rasterize(fv, tex, settings).image)


def test_kernel_boundary_is_by_name():
    """The kernels take a RasterConfig filled by field name and return and take tensors by
    name, so no reordering can swap two values silently."""
    settings = RasterSettings(image_size=8, sigma_val=3e-5, gamma_val=2e-4, near=0.5, far=20.0, eps=2e-3,
                              dist_eps=1e-3, dist_func="barycentric", aggr_func_alpha="sum", double_side=False,
                              return_p2f=True, binning=False, vectorize=False, rgb_geometry_grad=False,
                              background_color=(0.1, 0.2, 0.3))
    config = settings.kernel_config()
    fields = {name for name in dir(config) if not name.startswith("_")}
    assert fields == set(settings._kernel_fields()), "RasterConfig and RasterSettings name different fields"
    for name, value in settings._kernel_fields().items():
        assert getattr(config, name) == pytest.approx(value), name  # float fields round-trip through double
    with pytest.raises(AttributeError):
        config.sigma_val = 1.0  # RasterSettings' name, not the kernel's: refused, not added
    fv = random_faces(1, 4, seed=20, special=False)
    tex = random_textures(fv, "surface", seed=21)
    out = _C.forward(face_vertices=fv, textures=tex, config=config)
    assert set(out) == {"image", "face_index", "depth", "softmax_sum", "softmax_max", "p2f", "face_info",
                        "face_ranges", "bin_offsets", "bin_faces"}
    assert out["image"].shape == (1, 4, 8, 8) and out["face_index"].dtype == torch.int64
    saved = {**out, "textures": tex}
    grads = _C.backward(grad_image=torch.ones_like(out["image"]), saved=saved, config=config)
    assert set(grads) == {"grad_face_vertices", "grad_textures"} and grads["grad_textures"].shape == tex.shape
    del saved["softmax_max"]
    with pytest.raises(RuntimeError, match="missing tensor 'softmax_max'"):
        _C.backward(grad_image=torch.ones_like(out["image"]), saved=saved, config=config)
    config.dist_eps = 0.7
    with pytest.raises(RuntimeError, match="dist_eps"):
        _C.forward(face_vertices=fv, textures=tex, config=config)


def test_face_index_and_depth_are_the_nearest_containing_face():
    # two overlapping squares' triangles at different depths: the nearer one wins everywhere
    far = torch.tensor([[[-0.5, -0.5, 6.0], [0.5, -0.5, 6.0], [0.0, 0.5, 6.0]]], dtype=torch.float64)
    near = far.clone()
    near[..., 2] = 3.0
    fv = torch.stack([far, near], dim=1).reshape(1, 2, 3, 3)
    out = soft_rasterize(fv, None, RasterSettings(image_size=16))
    covered = out.face_index >= 0
    assert covered.sum() > 20
    assert torch.all(out.face_index[covered] == 1)
    torch.testing.assert_close(out.depth[covered], torch.full_like(out.depth[covered], 3.0))
