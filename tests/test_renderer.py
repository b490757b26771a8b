"""UMR's renderer wrapper: conventions, lighting, face_pixel_centers and silhouette fitting."""

import numpy as np
import pytest
import torch

from conftest import stage2_batch
from umr import mesh as M
from umr.geometry import axis_angle_to_quat, sample_textures
from umr.renderer import SoftRenderer, face_pixel_centers, make_renderer, project_points

IDENTITY_CAM = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]])


def random_cams(batch, seed):
    g = torch.Generator().manual_seed(seed)
    quat = torch.nn.functional.normalize(torch.randn(batch, 4, generator=g), dim=-1)
    scale = 0.5 + 0.3 * torch.rand(batch, 1, generator=g)
    trans = 0.4 * (torch.rand(batch, 2, generator=g) - 0.5)
    return torch.cat([scale, trans, quat], dim=1)


def test_project_points_is_where_the_renderer_draws(device):
    # docs/conventions.md §3 and the issue: a small triangle's rendered centroid lies within half a pixel of
    # its projected centroid, for random cameras (y down, no flip, pixel-centre convention)
    size = 64
    renderer = SoftRenderer(image_size=size)
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        centre = torch.rand(1, 1, 3, generator=g) - 0.5
        tri = centre + 0.2 * torch.tensor([[[1.0, 0.0, 0.0], [-0.5, 0.87, 0.0], [-0.5, -0.87, 0.0]]])
        cam = random_cams(1, seed=trial)
        # face the triangle towards the camera so it is not seen edge-on
        cam[:, 3:] = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1 * trial, -0.05 * trial, 0.02]]), dim=-1)
        tri, cam = tri.to(device), cam.to(device)
        alpha = renderer(tri, torch.tensor([[0, 1, 2]], device=device), cam).image[0, 3].cpu()
        rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
        mass = alpha.sum()
        assert mass > 3  # a few pixels
        drawn = torch.stack([(alpha * cols).sum() / mass, (alpha * rows).sum() / mass])
        projected = project_points(tri, cam)[0].mean(0).cpu()
        expected_pixel = (projected + 1) * size / 2 - 0.5
        assert torch.all((drawn - expected_pixel).abs() < 0.5), (drawn, expected_pixel)


def test_origin_renders_at_translation_pixel(device):
    # docs/conventions.md §3: the origin with [1, tx, ty, identity] projects to (tx, ty) and renders at
    # column (tx + 1)·W/2 − ½ (rasterizer pixel-centre convention)
    size = 32
    verts, faces = M.icosphere(2)
    verts = torch.from_numpy(verts).float()[None].to(device) * 0.1
    for tx, ty in [(0.0, 0.0), (0.25, -0.5), (-0.6, 0.3)]:
        cam = torch.tensor([[1.0, tx, ty, 1.0, 0.0, 0.0, 0.0]], device=device)
        origin = project_points(torch.zeros(1, 1, 3, device=device), cam)[0, 0]
        torch.testing.assert_close(origin.cpu(), torch.tensor([tx, ty]))
        alpha = SoftRenderer(image_size=size)(verts, torch.from_numpy(faces).to(device), cam).image[0, 3].cpu()
        rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
        centroid = torch.stack([(alpha * cols).sum(), (alpha * rows).sum()]) / alpha.sum()
        torch.testing.assert_close(centroid, (torch.tensor([tx, ty]) + 1) * size / 2 - 0.5, atol=0.05, rtol=0)


def test_mirrored_mesh_renders_mirrored_image(device):
    verts, faces = M.icosphere(3)
    g = torch.Generator().manual_seed(1)
    # float64: in float32 the softmax (gamma 1e-4) amplifies rounding to ~2e-5
    verts = (torch.from_numpy(verts) * (1 + 0.3 * torch.rand(len(verts), 1, generator=g, dtype=torch.float64))).to(device)
    faces = torch.from_numpy(faces).to(device)
    cam = torch.tensor([[0.6, 0.1, -0.05, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64, device=device)
    mirrored_cam = cam * torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64, device=device)
    renderer = SoftRenderer(image_size=48)  # default lighting: shading must mirror too
    image = renderer(verts[None], faces, cam).image
    # mirror x and reverse each face's winding, so normals mirror as well
    flip_x = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64, device=device)
    mirrored = renderer((verts * flip_x)[None], faces[:, [0, 2, 1]], mirrored_cam).image
    torch.testing.assert_close(mirrored, image.flip(-1), atol=1e-9, rtol=0)


def test_lighting_and_texture_colours(device):
    # a triangle in the object frame, identity camera: its screen normal decides the shade
    tri = torch.tensor([[[-0.5, -0.3, 0.2], [0.5, -0.3, 0.2], [0.0, 0.4, -0.3]]])
    faces = torch.tensor([[0, 1, 2]])
    colour = torch.tensor([0.2, 0.5, 0.6])
    textures = colour.expand(1, 1, 1, 1, 3)
    screen = tri.numpy()[0] * np.array([1, -1, 1])  # the renderer's y flip
    normal = np.cross(screen[1] - screen[0], screen[2] - screen[0])
    normal /= np.linalg.norm(normal)
    expected = colour * (0.8 + 0.5 * max(0.0, normal[1]))
    tri, faces, cam, textures = tri.to(device), faces.to(device), IDENTITY_CAM.to(device), textures.to(device)
    image = SoftRenderer(image_size=32)(tri, faces, cam, textures).image.cpu()
    centre = image[0, :3, 16, 16]  # inside the triangle
    torch.testing.assert_close(centre, expected, atol=1e-5, rtol=0)
    ambient = make_renderer(32)(tri, faces, cam, textures).image.cpu()
    torch.testing.assert_close(ambient[0, :3, 16, 16], colour, atol=1e-5, rtol=0)
    assert ambient[0, 3, 0, 0] == 0 and torch.all(ambient[0, :3, 0, 0] == 0)  # black background
    tinted = make_renderer(32, light_color_ambient=(1.0, 0.5, 0.25))
    tinted.light_intensity_ambient = 0.8
    image = tinted(tri, faces, cam, textures).image.cpu()
    torch.testing.assert_close(image[0, :3, 16, 16], colour * torch.tensor([0.8, 0.4, 0.2]), atol=1e-5, rtol=0)


def test_textures_from_a_texture_flow_plug_in(device):
    mesh = M.symmetric_template(3)
    verts = torch.from_numpy(mesh.verts).float()[None].repeat(2, 1, 1).to(device)
    faces = torch.from_numpy(mesh.faces).to(device)
    flow = (torch.rand(2, 1280, 6, 6, 2) * 2 - 1).to(device)
    image = torch.rand(2, 3, 32, 32).to(device)
    textures = sample_textures(flow, image)  # (B, F, T, T, 3) as the networks produce them
    assert textures.shape == (2, 1280, 6, 6, 3)
    renderer = make_renderer(32)
    cams = random_cams(2, seed=2).to(device)
    a = renderer(verts, faces, cams, textures).image
    b = renderer(verts, faces, cams, textures.reshape(2, 1280, 36, 3)).image
    assert torch.equal(a, b)
    # per-sample faces (B, F, 3) give the same result as shared faces
    c = renderer(verts, faces[None].expand(2, -1, -1), cams, textures).image
    torch.testing.assert_close(a, c)


def test_vertex_colours_render(device):
    verts, faces = M.icosphere(2)
    verts, faces = torch.from_numpy(verts).float()[None].to(device), torch.from_numpy(faces).to(device)
    colours = torch.full((1, len(verts[0]), 3), 0.5, device=device)
    renderer = make_renderer(32, texture_type="vertex")
    image = renderer(verts, faces, torch.tensor([[0.5, 0, 0, 1.0, 0, 0, 0]], device=device), colours).image
    torch.testing.assert_close(image[0, :3, 16, 16].cpu(), torch.full((3,), 0.5), atol=1e-5, rtol=0)


def test_face_pixel_centers_matches_loop(device):
    g = torch.Generator().manual_seed(3)
    face_index = torch.randint(-1, 5, (2, 7, 9), generator=g)
    for align_corners in (True, False):
        centers, visible = face_pixel_centers(face_index.to(device), 6, align_corners=align_corners)
        centers, visible = centers.cpu(), visible.cpu()
        assert centers.shape == (2, 6, 2) and visible.shape == (2, 6)
        for b in range(2):
            for f in range(6):
                rows, cols = np.nonzero(face_index[b].numpy() == f)
                assert visible[b, f] == (len(rows) > 0)
                if len(rows) == 0:
                    assert torch.all(centers[b, f] == 0)
                    continue
                if align_corners:
                    x, y = -1 + 2 * cols / 8, -1 + 2 * rows / 6
                else:
                    x, y = (2 * cols + 1) / 9 - 1, (2 * rows + 1) / 7 - 1
                np.testing.assert_allclose(centers[b, f].numpy(), [x.mean(), y.mean()], atol=1e-6)


def test_face_pixel_centers_agrees_with_projection(device):
    # the visible faces' pixel centres are near their projected centroids
    mesh = M.symmetric_template(3)
    verts = torch.from_numpy(mesh.verts).float()[None].to(device)
    faces = torch.from_numpy(mesh.faces).to(device)
    cam = random_cams(1, seed=4).to(device)
    out = SoftRenderer(image_size=64)(verts, faces, cam)
    centers, visible = face_pixel_centers(out.face_index, 1280, align_corners=False)
    projected = project_points(verts, cam)[0][faces].mean(1)
    err = (centers[0, visible[0]] - projected[visible[0]]).norm(dim=-1)
    assert visible.sum() > 300
    assert err.median() < 2 / 128  # within a raster pixel or so (partly hidden faces differ more)


def iou(a, b):
    return (a & b).sum().float() / (a | b).sum().float()


def test_optimising_a_sphere_to_a_silhouette(device):
    torch.manual_seed(0)
    mesh = M.symmetric_template(3)
    faces = torch.from_numpy(mesh.faces).to(device)
    sphere = torch.from_numpy(mesh.verts).float().to(device)
    # target: an ellipsoid with a bump, seen from two known views
    target = sphere * torch.tensor([1.3, 0.6, 0.8], device=device)
    target = target + 0.35 * torch.relu(target[:, :1]) * torch.tensor([1.0, 0.0, 0.0], device=device)
    angle = torch.tensor([0.4, -0.7])
    quats = axis_angle_to_quat(torch.tensor([[0.3, 1.0, 0.1], [1.0, 0.2, 0.0]]), angle)
    cams = torch.cat([torch.full((2, 1), 0.55), torch.zeros(2, 2), quats], dim=1).to(device)
    renderer = SoftRenderer(image_size=64, sigma_val=1e-4)
    with torch.no_grad():
        target_alpha = renderer(target[None].repeat(2, 1, 1), faces, cams).image[:, 3]
    offsets = torch.zeros_like(sphere, requires_grad=True)
    optimiser = torch.optim.Adam([offsets], lr=0.01)
    laplacian = M.LaplacianLoss(mesh.faces, len(sphere)).to(device)
    for _ in range(150):
        verts = (sphere + offsets)[None].repeat(2, 1, 1)
        alpha = renderer(verts, faces, cams).image[:, 3]
        inter = (alpha * target_alpha).sum((1, 2))
        union = (alpha + target_alpha - alpha * target_alpha).sum((1, 2))
        loss = (1 - inter / union).mean() + 0.01 * laplacian(verts).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        final = renderer((sphere + offsets)[None].repeat(2, 1, 1), faces, cams).image[:, 3]
    start = renderer(sphere[None].repeat(2, 1, 1), faces, cams).image[:, 3]
    assert iou(start > 0.5, target_alpha > 0.5) < 0.85  # the task is not trivial
    assert iou(final > 0.5, target_alpha > 0.5) >= 0.9


def test_renderer_follows_dtype_and_device(device):
    verts, faces = M.icosphere(1)
    verts = torch.from_numpy(verts)[None].to(device)
    cam = (IDENTITY_CAM.double() * torch.tensor([0.5, 1, 1, 1, 1, 1, 1])).to(device)
    out = SoftRenderer(image_size=16)(verts, torch.from_numpy(faces).to(device), cam)
    assert out.image.dtype == torch.float64 and out.depth.dtype == torch.float64
    assert out.image.device == device and out.face_index.device == device
    assert out.image.shape == (1, 4, 16, 16) and out.face_index.shape == (1, 32, 32)


def test_every_preset_meets_the_renderer_contract(device):
    """Renderer's documented outputs: shapes at image_size and raster_size, device and dtype of
    the input, background codes, and a z-buffer holding the camera depth plus depth_offset."""
    from umr.geometry import orthographic_proj_withz
    from umr.renderer import RENDERER_PRESETS, Renderer

    verts, faces = M.icosphere(2)
    verts = torch.from_numpy(verts).float()[None].to(device)
    faces = torch.from_numpy(faces).to(device)
    cam = random_cams(1, seed=3).to(device)
    for preset in RENDERER_PRESETS:
        renderer = make_renderer(24, preset)
        assert isinstance(renderer, Renderer) and renderer.image_size == 24 and renderer.raster_size == 48
        colours = torch.rand(1, len(verts[0]), 3, device=device) if preset == "labels" else None
        out = renderer(verts, faces, cam, colours)
        assert out.image.shape == (1, 4, 24, 24) and out.image.device == verts.device and out.image.dtype == verts.dtype
        assert out.face_index.shape == out.depth.shape == (1, 48, 48) and out.face_index.dtype == torch.int64
        background = out.face_index < 0
        assert background.any() and (~background).any()
        assert torch.isinf(out.depth[background]).all()
        # a sphere's nearest depth is the most negative camera depth of its vertices
        nearest = orthographic_proj_withz(verts, cam)[..., 2].min()
        assert float(out.depth[~background].min() - renderer.depth_offset) == pytest.approx(float(nearest), abs=0.02)


def test_make_renderer_refuses_unknown_names():
    for kwargs, word in ((dict(preset="glossy"), "preset"), (dict(backend="opengl"), "backend")):
        with pytest.raises(ValueError, match=word):
            make_renderer(32, **kwargs)


def test_a_training_step_runs_on_the_reference_renderer_behind_the_same_contract():
    """The objectives rely on umr.renderer.Renderer only: the dense PyTorch reference in place of
    the kernels gives the same stage-2 loss terms and parameter gradients."""
    from umr.category import BIRDS
    from umr.nets import MeshNet
    from umr.objectives import ObjectiveConfig, Stage2Objective

    size, batch = 64, 1
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=size, pretrained_encoder=False, uv_height=16, uv_channels=32, subdivide=2,
                    num_hypo_cams=2).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = stage2_batch(size, batch)
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (len(model.faces), 36), generator=g)
    parts = {p: torch.arange(i * 10, i * 10 + 10) for i, p in enumerate(BIRDS.part_names)}
    results = []
    for backend in ("kernel", "reference"):
        model.load_state_dict(state)
        config = ObjectiveConfig.for_stage(2, image_size=size, texture_loss="l1", use_gan=False, renderer=backend)
        objective = Stage2Objective(model, config, labels, parts)
        out = model(data["img"], data["eps_z"], data["u_cam"])
        total, terms = objective(out, data, 0)
        model.zero_grad()
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append(({k: float(v.detach()) for k, v in terms.items()}, grads))
    (kernel_terms, kernel_grads), (reference_terms, reference_grads) = results
    assert kernel_terms.keys() == reference_terms.keys()
    for name in kernel_terms:
        assert reference_terms[name] == pytest.approx(kernel_terms[name], rel=1e-4, abs=1e-6), name
    assert torch.nn.functional.cosine_similarity(kernel_grads, reference_grads, dim=0) > 0.999
