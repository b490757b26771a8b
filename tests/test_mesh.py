import math

import numpy as np
import pytest
import torch

from umr import mesh as M


@pytest.fixture(scope="module")
def template():
    return M.symmetric_template(3, axis=1)


@pytest.mark.parametrize("level", [0, 1, 2, 3, 4])
def test_icosphere_is_a_closed_unit_sphere(level):
    verts, faces = M.icosphere(level)
    assert verts.shape == (10 * 4**level + 2, 3)
    assert faces.shape == (20 * 4**level, 3)
    np.testing.assert_allclose(np.linalg.norm(verts, axis=1), 1.0, atol=1e-15)
    edges = M.unique_edges(faces)
    assert len(verts) - len(edges) + len(faces) == 2  # Euler characteristic of a sphere
    # every edge in exactly two faces
    pairs = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    assert np.all(counts == 2)


def test_icosphere_first_subdivision_order():
    # First refinement of face 0 = [0, 11, 5]: its edges' midpoints are new nodes 12, 13, 14
    # (slot order (11,5), (5,0), (0,11)); the centre face comes first, then the corners.
    verts, faces = M.icosphere(1)
    np.testing.assert_array_equal(faces[0], [12, 13, 14])
    np.testing.assert_array_equal(faces[1], [0, 13, 14])
    base = M._ICOSAHEDRON_VERTS
    expected = 0.5 * (base[11] + base[5])
    np.testing.assert_allclose(verts[12], expected / np.linalg.norm(expected), atol=1e-15)


def test_symmetric_template_spec_values(template):
    # the symmetric template's counts (docs/method.md §1.2)
    assert (template.num_indept, template.num_sym, template.num_output) == (32, 305, 337)
    assert (template.num_indept_faces, template.num_sym_faces, template.num_half_faces) == (32, 624, 656)
    np.testing.assert_allclose(template.verts[0], [0.850651, 0, -0.525731], atol=1e-6)
    np.testing.assert_allclose(template.verts[32], [-0.525731, 0.850651, 0], atol=1e-6)
    np.testing.assert_allclose(template.verts[337], [-0.525731, -0.850651, 0], atol=1e-6)
    np.testing.assert_array_equal(template.faces[:3], [[562, 20, 257], [10, 562, 257], [20, 258, 563]])
    np.testing.assert_array_equal(template.faces[32], [105, 106, 107])
    np.testing.assert_array_equal(template.faces[656], [410, 411, 412])


def test_mirroring_reproduces_the_other_side_exactly(template):
    v, i, s = template.verts, template.num_indept, template.num_sym
    assert np.all(v[:i, 1] == 0)
    assert np.all(v[i : i + s, 1] > 0) and np.all(v[i + s :, 1] < 0)
    mirrored = v[i : i + s] * np.array([1.0, -1.0, 1.0])
    assert np.array_equal(mirrored, v[i + s :])  # bitwise
    full = template.symmetrize(torch.from_numpy(v[: i + s]))
    assert torch.equal(full, torch.from_numpy(v))


def test_face_blocks_are_mirror_images(template):
    sigma = template.vertex_mirror_index
    right = template.faces[32:656]
    left = template.faces[656:]
    np.testing.assert_array_equal(sigma[right], left)
    independent = template.faces[:32]
    for face in independent:
        assert set(sigma[face]) == set(face)
    # "+305 on non-centre ids" holds for 606 rows; the 18 mis-sided rows are the original's quirk
    plus = np.where(right >= 32, right + 305, right)
    assert np.all(plus == left, axis=1).sum() == 606
    # the same set of triangles as the sphere (only the order changed)
    verts, faces = M.icosphere(3)
    remap = {tuple(np.round(p, 12)): k for k, p in enumerate(template.verts)}
    as_new = np.array([[remap[tuple(np.round(verts[x], 12))] for x in f] for f in faces])
    assert {frozenset(f) for f in as_new.tolist()} == {frozenset(f) for f in template.faces.tolist()}


def test_level4_is_symmetric_too():
    mesh = M.symmetric_template(4)
    assert len(mesh.verts) == 2562 and len(mesh.faces) == 5120
    assert mesh.num_indept + 2 * mesh.num_sym == 2562
    assert mesh.num_indept_faces + 2 * mesh.num_sym_faces == 5120
    np.testing.assert_array_equal(mesh.vertex_mirror_index[mesh.faces[mesh.num_half_faces - mesh.num_sym_faces : mesh.num_half_faces]],
                                  mesh.faces[mesh.num_half_faces :])


def test_make_symmetric_rejects_asymmetric_mesh():
    verts, faces = M.icosphere(1)
    verts = verts.copy()
    verts[0, 1] += 1e-3
    with pytest.raises(ValueError, match="mirror"):
        M.make_symmetric(verts, faces, axis=1)


def test_symmetrize_batched_and_faces(template):
    half = torch.randn(3, template.num_output, 3)
    full = template.symmetrize(half)
    assert full.shape == (3, 642, 3)
    assert torch.equal(full[:, :337], half)
    sigma = torch.from_numpy(template.vertex_mirror_index)
    # centre vertices are free (as in the original); every other vertex has an exact mirror
    torch.testing.assert_close(full[:, sigma][:, 32:], (full * torch.tensor([1.0, -1.0, 1.0]))[:, 32:], atol=0, rtol=0)
    per_face = torch.randn(2, 656, 6, 6, 2)
    sym = template.symmetrize_faces(per_face)
    assert sym.shape == (2, 1280, 6, 6, 2)
    assert torch.equal(sym[:, 656:], per_face[:, 32:])


def test_uv_sampler(template):
    faces = template.faces[: template.num_half_faces]
    uv = M.compute_uv_sampler(template.verts, faces, tex_size=6)
    assert uv.shape == (656, 6, 6, 2)
    assert uv.min() >= -1 and uv.max() <= 1
    # sample s = 6i + j uses weights (i/5, j/5, 1 - i/5 - j/5); recompute a few independently
    for f, i, j in [(0, 0, 0), (100, 2, 3), (655, 5, 5), (300, 5, 0)]:
        a, b = i / 5, j / 5
        x = a * template.verts[faces[f, 0]] + b * template.verts[faces[f, 1]] + (1 - a - b) * template.verts[faces[f, 2]]
        theta = math.acos(x[2] / np.linalg.norm(x))
        phi = math.atan2(x[1], x[0])
        np.testing.assert_allclose(uv.reshape(656, 36, 2)[f, 6 * i + j], [phi / math.pi, 2 * theta / math.pi - 1], atol=1e-12)
    # docs/method.md §1.3: with axis 1 right faces mostly map to u > 0; 3.7 % of their samples do not
    assert abs((uv[32:, ..., 0] < 0).mean() - 0.037) < 0.001
    assert M.uv_image_size(656, 6) == (128, 256)


def test_uv_sampler_puts_the_seam_at_u_plus_one(template):
    """Samples exactly on the seam (y = 0, x < 0) read the last UV column (u = +1, φ ∈ (−π, π]),
    as the original's (α (v0 − v2) + β (v1 − v2)) + v2 gives; the equal α v0 + β v1 + (1 − α − β) v2
    rounds y to −6e-18 at face 0 sample 13 and faces 325 / 341 sample 25 (u = −1)."""
    faces = template.faces[: template.num_half_faces]
    uv = M.compute_uv_sampler(template.verts, faces, tex_size=6).reshape(656, 36, 2)
    for f, s in [(0, 13), (325, 25), (341, 25)]:
        assert uv[f, s, 0] == 1.0
    i, j = np.divmod(np.arange(36), 6)
    a, b = i / 5, j / 5
    v0, v1, v2 = (template.verts[faces[:, k]][:, None, :] for k in range(3))
    points = a[None, :, None] * v0 + b[None, :, None] * v1 + (1 - a - b)[None, :, None] * v2
    on_seam = (np.abs(points[..., 1]) < 1e-12) & (points[..., 0] < 0)
    assert on_seam.sum() > 100 and (uv[on_seam][:, 0] == 1.0).all()


def _grid_mesh(n=5):
    ys, xs = np.mgrid[0:n, 0:n]
    verts = np.stack([xs.ravel(), ys.ravel(), np.zeros(n * n)], axis=1).astype(np.float64)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            faces += [[a, b, e], [a, e, d]]
    return verts, np.array(faces)


def test_laplacian_matrix_and_flat_grid():
    verts, faces = _grid_mesh(5)
    lap = M.laplacian_matrix(faces, len(verts))
    np.testing.assert_allclose(lap.sum(axis=1), 0, atol=1e-15)
    np.testing.assert_array_equal(np.diag(lap), 1)
    interior = [r * 5 + c for r in range(1, 4) for c in range(1, 4)]
    np.testing.assert_allclose((lap @ verts)[interior], 0, atol=1e-14)
    assert np.abs(lap @ verts).sum() > 0  # the boundary is not zero


def test_laplacian_loss_matches_naive_loop(template):
    faces = template.faces
    loss = M.LaplacianLoss(faces, 642)
    verts = torch.from_numpy(template.verts)[None].repeat(3, 1, 1) + 0.05 * torch.randn(3, 642, 3, dtype=torch.float64)
    adjacency = M.vertex_adjacency(faces, 642)
    expected = []
    for b in range(3):
        v = verts[b].numpy()
        expected.append(sum(np.sum((v[i] - v[adjacency[i]].mean(0)) ** 2) for i in range(642)))
    torch.testing.assert_close(loss(verts), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    # scale-quadratic and translation invariant
    torch.testing.assert_close(loss(2 * verts), 4 * loss(verts), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss(verts + 3.0), loss(verts), rtol=1e-4, atol=1e-8)
    assert loss(verts[:1]).shape == (1,)


def test_flatten_loss_edges_and_known_value(template):
    assert M.FlattenLoss(template.faces).num_edges == 1607  # docs/method.md §8.3: 1607 of 1920
    # regular tetrahedron: every dihedral angle has cos = 1/3 -> (1/3 + 1)² per edge
    verts = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]])
    loss = M.FlattenLoss(faces)
    value = loss(torch.from_numpy(verts)[None])
    torch.testing.assert_close(value, torch.tensor([loss.num_edges * 16 / 9], dtype=torch.float64), rtol=1e-5, atol=0)
    # a finer sphere is flatter
    coarse = M.FlattenLoss(M.icosphere(2)[1])(torch.from_numpy(M.icosphere(2)[0])[None]) / (1.5 * 320)
    fine = M.FlattenLoss(M.icosphere(3)[1])(torch.from_numpy(M.icosphere(3)[0])[None]) / (1.5 * 1280)
    assert fine < coarse


def test_flatten_loss_rejects_open_mesh():
    with pytest.raises(ValueError, match="manifold"):
        M.FlattenLoss(np.array([[0, 1, 2], [0, 2, 3]]))


def test_regulariser_gradients_match_finite_differences():
    verts, faces = M.icosphere(1)
    x = (torch.from_numpy(verts) + 0.05 * torch.randn(2, 42, 3, dtype=torch.float64)).requires_grad_()
    lap, flat = M.LaplacianLoss(faces, 42).double(), M.FlattenLoss(faces)
    assert torch.autograd.gradcheck(lambda v: lap(v), (x,))
    assert torch.autograd.gradcheck(lambda v: flat(v), (x,))


def test_regularisers_follow_dtype():
    verts, faces = M.icosphere(1)
    x = torch.from_numpy(verts).float()[None]
    assert M.LaplacianLoss(faces, 42)(x).dtype == torch.float32
    assert M.LaplacianLoss(faces, 42)(x.double()).dtype == torch.float64
    assert M.FlattenLoss(faces)(x.double()).dtype == torch.float64
