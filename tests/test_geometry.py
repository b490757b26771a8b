import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from umr import geometry as G

torch.set_default_dtype(torch.float32)


def scipy_rot(q: np.ndarray) -> Rotation:
    """scipy uses scalar-last quaternions."""
    return Rotation.from_quat(np.concatenate([q[..., 1:], q[..., :1]], axis=-1))


def random_unit_quats(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=dtype), dim=-1)


quat_strategy = st.lists(st.floats(-1, 1, allow_nan=False, width=64), min_size=4, max_size=4).filter(
    lambda v: np.linalg.norm(v) > 0.1
)


@settings(max_examples=50, deadline=None)
@given(quat_strategy, quat_strategy)
def test_hamilton_product_composes_rotations(qa, qb):
    qa = torch.nn.functional.normalize(torch.tensor(qa, dtype=torch.float64), dim=0)
    qb = torch.nn.functional.normalize(torch.tensor(qb, dtype=torch.float64), dim=0)
    composed = G.quat_to_matrix(G.hamilton_product(qa, qb))
    torch.testing.assert_close(composed, G.quat_to_matrix(qa) @ G.quat_to_matrix(qb), atol=1e-12, rtol=0)
    # |qa ⊗ qb| = |qa| |qb| and the conjugate inverts
    identity = G.hamilton_product(qa, G.quat_conjugate(qa))
    torch.testing.assert_close(identity, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_hamilton_product_known_values():
    i, j, k = torch.eye(4)[1:]
    torch.testing.assert_close(G.hamilton_product(i, j), k)
    torch.testing.assert_close(G.hamilton_product(j, i), -k)
    torch.testing.assert_close(G.hamilton_product(i, i), torch.tensor([-1.0, 0, 0, 0]))


@settings(max_examples=50, deadline=None)
@given(quat_strategy)
def test_quat_rotate_matches_scipy_and_matrix(q):
    q = np.array(q) / np.linalg.norm(q)
    points = np.random.default_rng(0).normal(size=(1, 7, 3))
    qt, pt = torch.tensor(q)[None], torch.tensor(points)
    rotated = G.quat_rotate(pt, qt)
    np.testing.assert_allclose(rotated[0].numpy(), scipy_rot(q).apply(points[0]), atol=1e-12)
    np.testing.assert_allclose(rotated[0].numpy(), (G.quat_to_matrix(qt)[0] @ pt[0].T).T.numpy(), atol=1e-12)


def test_quat_rotate_not_renormalised():
    # docs/conventions.md §1: the quaternion is not renormalised inside the rotation -> |q|² scaling
    q = torch.tensor([[2.0, 0, 0, 0]])
    pts = torch.tensor([[[1.0, 2.0, 3.0]]])
    torch.testing.assert_close(G.quat_rotate(pts, q), 4 * pts)
    torch.testing.assert_close(G.quat_to_matrix(q)[0] @ pts[0, 0], 4 * pts[0, 0])


def test_matrix_to_quat_round_trip_including_half_turns():
    quats = random_unit_quats(200)
    half_turns = torch.tensor(
        [[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1 / math.sqrt(2), 1 / math.sqrt(2), 0], [1.0, 0, 0, 0]],
        dtype=torch.float64,
    )
    quats = torch.cat([quats, half_turns])
    back = G.matrix_to_quat(G.quat_to_matrix(quats))
    assert torch.all(back[:, 0] >= 0)
    # equal up to sign
    sign = torch.where(quats[:, :1] < 0, -1.0, 1.0).to(quats)
    sign[-5:-1] = torch.sign((back[-5:-1] * quats[-5:-1]).sum(-1, keepdim=True))
    torch.testing.assert_close(back, quats * sign, atol=1e-10, rtol=0)
    torch.testing.assert_close(G.quat_to_matrix(back), G.quat_to_matrix(quats), atol=1e-10, rtol=0)


def test_matrix_to_quat_matches_scipy():
    mats = Rotation.random(50, random_state=1).as_matrix()
    q = G.matrix_to_quat(torch.tensor(mats)).numpy()
    ref = Rotation.from_matrix(mats).as_quat()  # x, y, z, w
    ref = np.concatenate([ref[:, 3:], ref[:, :3]], axis=1)
    ref *= np.where(ref[:, :1] < 0, -1, 1)
    np.testing.assert_allclose(q, ref, atol=1e-10)


def test_axis_angle_to_quat_matches_scipy():
    rng = np.random.default_rng(2)
    axes = rng.normal(size=(20, 3))
    angles = rng.uniform(-math.pi, math.pi, size=20)
    q = G.axis_angle_to_quat(torch.tensor(axes), torch.tensor(angles)).numpy()
    rotvec = axes / np.linalg.norm(axes, axis=1, keepdims=True) * angles[:, None]
    np.testing.assert_allclose(G.quat_to_matrix(torch.tensor(q)).numpy(), Rotation.from_rotvec(rotvec).as_matrix(), atol=1e-12)
    # docs/method.md §2: (cos(a/2), axis sin(a/2)) for a unit axis
    torch.testing.assert_close(
        G.axis_angle_to_quat(torch.tensor([0.0, 1.0, 0.0]), torch.tensor(math.pi / 3)),
        torch.tensor([math.cos(math.pi / 6), 0.0, math.sin(math.pi / 6), 0.0]),
    )


def test_geodesic_angle_known_values():
    q1 = random_unit_quats(30, seed=3)
    angles = torch.linspace(0, math.pi, 30, dtype=torch.float64)
    axis = torch.nn.functional.normalize(torch.randn(30, 3, dtype=torch.float64), dim=-1)
    q2 = G.hamilton_product(G.axis_angle_to_quat(axis, angles), q1)
    torch.testing.assert_close(G.quat_geodesic_angle(q1, q2), angles, atol=1e-7, rtol=0)
    torch.testing.assert_close(G.quat_geodesic_angle(q1, -q2), angles, atol=1e-7, rtol=0)  # sign invariant
    torch.testing.assert_close(G.quat_geodesic_angle(q2, q1), angles, atol=1e-7, rtol=0)  # symmetric
    tiny = G.axis_angle_to_quat(torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor(1e-9, dtype=torch.float64))
    assert abs(G.quat_geodesic_angle(tiny, torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)).item() - 1e-9) < 1e-15


def test_orthographic_projection_known_points():
    # docs/conventions.md §3: the origin with [1, tx, ty, identity] projects to (tx, ty)
    cam = torch.tensor([[1.0, 0.3, -0.2, 1, 0, 0, 0], [2.0, 0.1, 0.5, math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)]])
    pts = torch.tensor([[[0.0, 0, 0], [1, 2, 3]], [[1.0, 0, 0], [0, 0, 1]]])
    proj = G.orthographic_proj_withz(pts, cam, offset_z=5.0)
    expected = torch.tensor(
        [
            [[0.3, -0.2, 5.0], [1.3, 1.8, 8.0]],
            # 90° about z maps x to y: (1,0,0) -> (0,1,0), scaled by 2
            [[0.1, 2.5, 5.0], [0.1, 0.5, 7.0]],
        ]
    )
    torch.testing.assert_close(proj, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(G.orthographic_proj(pts, cam), expected[..., :2], atol=1e-6, rtol=0)


def test_rotate_cam_vectorised_matches_loop():
    cams = torch.cat([torch.rand(6, 3, dtype=torch.float64) + 0.5, random_unit_quats(6, seed=4)], dim=1)
    angles = torch.tensor([0, 30, 90, 120, 179, -45], dtype=torch.float64)
    out = G.rotate_cam(cams, angles)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out[:, :3], cams[:, :3])
    for b in range(6):
        expected = Rotation.from_rotvec([0, math.radians(angles[b]), 0]).as_matrix() @ scipy_rot(cams[b, 3:].numpy()).as_matrix()
        np.testing.assert_allclose(G.quat_to_matrix(out[b, 3:]).numpy(), expected, atol=1e-12)
    # a scalar angle and another axis broadcast too
    out_x = G.rotate_cam(cams, 90.0, axis=(1.0, 0.0, 0.0))
    expected = Rotation.from_rotvec([math.pi / 2, 0, 0]).as_matrix() @ scipy_rot(cams[0, 3:].numpy()).as_matrix()
    np.testing.assert_allclose(G.quat_to_matrix(out_x[0, 3:]).numpy(), expected, atol=1e-12)


def test_sample_textures_align_corners_convention():
    height, width = 4, 5
    image = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width).repeat(1, 2, 1, 1)
    image[:, 1] *= -1
    # align_corners=True: x = -1 + 2c/(W-1) is the centre of column c
    cols = torch.tensor([0.0, 4.0, 1.5, 2.0])
    rows = torch.tensor([0.0, 3.0, 0.0, 2.5])
    flow = torch.stack([-1 + 2 * cols / (width - 1), -1 + 2 * rows / (height - 1)], dim=-1).reshape(1, 1, 2, 2, 2)
    tex = G.sample_textures(flow, image)
    assert tex.shape == (1, 1, 2, 2, 2)
    expected = (rows * width + cols).reshape(2, 2)  # bilinear of a linear ramp is exact
    torch.testing.assert_close(tex[0, 0, ..., 0], expected)
    torch.testing.assert_close(tex[0, 0, ..., 1], -expected)
    # align_corners=False: pixel centres at (2c+1)/W - 1
    flow_false = torch.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], dim=-1).reshape(1, 1, 2, 2, 2)
    torch.testing.assert_close(G.sample_textures(flow_false, image, align_corners=False)[0, 0, ..., 0], expected)
    # outside the image: zero padding
    outside = torch.full((1, 1, 2, 2, 2), 3.0)
    assert torch.all(G.sample_textures(outside, image) == 0)


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, q: G.quat_rotate(p, q),
        lambda p, q: G.orthographic_proj_withz(p, torch.cat([q[:, :3] + 1.0, q], dim=1)[:, :7], 5.0),
        lambda p, q: G.matrix_to_quat(G.quat_to_matrix(torch.nn.functional.normalize(q, dim=-1))),
        lambda p, q: G.quat_geodesic_angle(q, q.flip(-1)),
    ],
)
def test_gradcheck(fn):
    torch.manual_seed(0)
    points = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    quats = (random_unit_quats(2, seed=5) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(fn, (points, quats))


def test_device_and_dtype_follow_input():
    for dtype in (torch.float32, torch.float64):
        cams = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0]], dtype=dtype)
        pts = torch.zeros(1, 2, 3, dtype=dtype)
        assert G.orthographic_proj_withz(pts, cams).dtype == dtype
        assert G.rotate_cam(cams, torch.tensor([10.0])).dtype == dtype


def front_heavy_symmetric_shape():
    """A template symmetric under y → −y whose front (x > 0.3) is raised: its side view is not
    its own mirror image."""
    from umr.mesh import symmetric_template

    mesh = symmetric_template()
    verts = torch.from_numpy(mesh.verts).float() * torch.tensor([0.8, 0.45, 0.5])
    verts[:, 2] += 0.35 * (verts[:, 0] > 0.3).float()
    return verts, torch.from_numpy(mesh.faces)


def test_mirror_cam_draws_the_horizontal_mirror_image_with_the_same_depths():
    from umr.renderer import make_renderer

    verts, faces = front_heavy_symmetric_shape()
    quats = G.matrix_to_quat(torch.from_numpy(Rotation.from_euler("xyz", [[100, 10, 30], [70, -20, 160]],
                                                                  degrees=True).as_matrix()).float())
    cams = torch.cat([torch.tensor([[0.8, 0.1, -0.05], [0.7, -0.2, 0.1]]), quats], 1)
    renderer = make_renderer(64)
    plain = renderer(verts.expand(2, -1, -1), faces, cams)
    mirrored = renderer(verts.expand(2, -1, -1), faces, G.mirror_cam(cams))
    alpha, alpha_m = plain.image[:, 3], mirrored.image[:, 3]
    assert (alpha - alpha.flip(-1)).abs().mean() > 0.05  # the mirror image is a different picture
    assert (alpha_m - alpha.flip(-1)).abs().mean() < 0.01
    inside = (alpha.flip(-1) > 0.99) & (alpha_m > 0.99)
    inside = inside.repeat_interleave(2, -1).repeat_interleave(2, -2)  # depth is at the 2x raster
    assert (mirrored.depth - plain.depth.flip(-1))[inside].abs().max() < 0.05
    twice = G.mirror_cam(G.mirror_cam(cams))
    assert torch.allclose(twice[:, :3], cams[:, :3])
    assert torch.allclose(G.quat_to_matrix(twice[:, 3:]), G.quat_to_matrix(cams[:, 3:]), atol=1e-6)
