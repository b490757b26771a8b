"""Soft-rasterizer speed on the CPU or a CUDA device; prints one JSON line.

R1: 8 bird-like meshes of 1280 faces (icosphere level 3, deformed), UMR camera filling ~70 %
of the frame, 256 x 256 raster (no supersampling), euclidean + softmax + prod, UMR's sigma /
gamma / dist_eps, 6 x 6 texels per face, float32; forward, then backward of image.sum().
R2: 4 such meshes at 128 x 128, ours vs the dense PyTorch reference (forward + backward).
scaling_image: R1 forward + backward ms at 64..512 px; scaling_faces: at 320/1280/5120 faces.
r1_per_pixel_ms: R1 forward + backward with the SIMD lanes off (RasterSettings.vectorize=False,
the per-pixel math of the CUDA kernel), for comparison with scaling_image["256"].

    python -m benchmarks.bench_rasterizer [--repeats 7] [--device cpu|cuda]

On CUDA the timings wait for the device (``torch.cuda.synchronize``) and the JSON adds
``peak_gpu_mem_gib``; ``r1_per_pixel_ms`` equals the plain path there (one CUDA kernel).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from umr import mesh as M
from umr.geometry import axis_angle_to_quat, orthographic_proj_withz
from umr.renderer import DEPTH_OFFSET, RasterSettings, gather_face_vertices, soft_rasterize
from umr.rasterizer_reference import soft_rasterize_reference


def bird_blobs(batch: int, subdivisions: int, seed: int = 0):
    """Screen-space face vertices (B, F, 3, 3) of deformed spheres seen as UMR sees birds."""
    g = torch.Generator().manual_seed(seed)
    verts, faces = M.icosphere(subdivisions)
    verts = torch.from_numpy(verts).float()
    body = verts * torch.tensor([1.0, 0.55, 0.6])
    head = 0.35 * torch.relu(verts[:, :1] - 0.5) * torch.tensor([1.0, 0.0, -0.8])  # a head bump
    shapes = (body + head)[None] * (1 + 0.1 * torch.rand(batch, 1, 3, generator=g))
    azimuth = (torch.rand(batch, generator=g) - 0.5) * 1.2  # mostly side views
    quats = axis_angle_to_quat(torch.tensor([0.0, 1.0, 0.2]).expand(batch, 3), azimuth)
    cams = torch.cat([torch.full((batch, 1), 0.62), 0.1 * (torch.rand(batch, 2, generator=g) - 0.5), quats], 1)
    screen = orthographic_proj_withz(shapes, cams, offset_z=DEPTH_OFFSET) * torch.tensor([1.0, -1.0, 1.0])
    return gather_face_vertices(screen, torch.from_numpy(faces)).contiguous().to(DEVICE)


def textures_for(face_vertices, texels=36, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*face_vertices.shape[:2], texels, 3, generator=g).to(face_vertices.device)


def settings(size: int, vectorize: bool = True) -> RasterSettings:
    return RasterSettings(image_size=size, sigma_val=1e-5, gamma_val=1e-4, dist_eps=1e-10, vectorize=vectorize)


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def forward_backward(rasterize, face_vertices, textures, s):
    fv = face_vertices.clone().requires_grad_()
    tex = textures.clone().requires_grad_()
    image = rasterize(fv, tex, s).image
    image.sum().backward()


def pairs_in_radius(face_vertices, s: RasterSettings) -> int:
    """(pixel, face) pairs inside the faces' bounding boxes grown by the culling radius: the
    work of a binned kernel before its finer per-row and per-pixel culls."""
    fv = face_vertices
    S = s.image_size
    threshold = torch.log(torch.tensor(1 / s.dist_eps - 1)) * s.sigma_val
    margin = float(threshold.sqrt())
    xs = (2 * torch.arange(S, device=fv.device) + 1 - S).float() / S
    x, y = fv[..., 0], fv[..., 1]
    lo_x, hi_x = x.min(-1).values - margin, x.max(-1).values + margin
    lo_y, hi_y = y.min(-1).values - margin, y.max(-1).values + margin
    cols = ((xs[None, None, :] >= lo_x[..., None]) & (xs[None, None, :] <= hi_x[..., None])).sum(-1)
    rows = ((xs[None, None, :] >= lo_y[..., None]) & (xs[None, None, :] <= hi_y[..., None])).sum(-1)
    return int((cols * rows).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        torch.cuda.reset_peak_memory_stats(DEVICE)
    torch.manual_seed(0)

    r1 = bird_blobs(8, 3)
    tex1 = textures_for(r1)
    s256 = settings(256)

    def r1_forward():
        with torch.no_grad():
            soft_rasterize(r1, tex1, s256)

    fv = r1.clone().requires_grad_()
    tex = tex1.clone().requires_grad_()

    def r1_backward():
        image = soft_rasterize(fv, tex, s256).image
        sync()
        start = time.perf_counter()
        image.sum().backward()
        sync()
        return (time.perf_counter() - start) * 1000

    forward_ms = time_ms(r1_forward, args.repeats)
    r1_backward()
    backward_ms = statistics.median(r1_backward() for _ in range(args.repeats))

    r2 = bird_blobs(4, 3, seed=2)
    tex2 = textures_for(r2)
    s128 = settings(128)
    ours_ms = time_ms(lambda: forward_backward(soft_rasterize, r2, tex2, s128), args.repeats)
    dense_ms = time_ms(lambda: forward_backward(soft_rasterize_reference, r2, tex2, s128), 1)

    scaling_image = {
        str(size): round(time_ms(lambda: forward_backward(soft_rasterize, r1, tex1, settings(size)), args.repeats), 2)
        for size in (64, 128, 256, 512)
    }
    per_pixel_ms = time_ms(lambda: forward_backward(soft_rasterize, r1, tex1, settings(256, vectorize=False)), args.repeats)
    scaling_faces = {}
    for level in (2, 3, 4):
        fvs = bird_blobs(8, level)
        texs = textures_for(fvs)
        scaling_faces[str(fvs.shape[1])] = round(
            time_ms(lambda: forward_backward(soft_rasterize, fvs, texs, s256), args.repeats), 2
        )

    print(
        json.dumps(
            {
                "r1_forward_ms": round(forward_ms, 2),
                "r1_backward_ms": round(backward_ms, 2),
                "r1_bbox_pairs": pairs_in_radius(r1, s256),
                "r2_ours_ms": round(ours_ms, 2),
                "r2_dense_ms": round(dense_ms, 1),
                "r2_speedup_vs_dense": round(dense_ms / ours_ms, 1),
                "scaling_image": scaling_image,
                "scaling_faces": scaling_faces,
                "r1_per_pixel_ms": round(per_pixel_ms, 2),
                "threads": torch.get_num_threads(),
                "device": str(DEVICE) if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE),
                **({"peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(DEVICE) / 2**30, 3)}
                   if DEVICE.type == "cuda" else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
