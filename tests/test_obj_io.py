import numpy as np
import pytest
import torch
from PIL import Image

from umr import mesh as M
from umr.obj_io import load_obj, save_obj


def test_round_trip_geometry(tmp_path):
    mesh = M.symmetric_template(3)
    save_obj(tmp_path / "sphere.obj", torch.from_numpy(mesh.verts).float(), torch.from_numpy(mesh.faces))
    back = load_obj(tmp_path / "sphere.obj")
    np.testing.assert_allclose(back["verts"], mesh.verts.astype(np.float32), atol=1e-7)
    np.testing.assert_array_equal(back["faces"], mesh.faces)
    assert "face_textures" not in back
    assert not (tmp_path / "sphere.mtl").exists()


def test_round_trip_textures(tmp_path):
    verts, faces = M.icosphere(2)
    rng = np.random.default_rng(0)
    tex = rng.uniform(size=(len(faces), 6, 6, 3))
    save_obj(tmp_path / "out" / "mesh.obj", verts, faces, tex)
    for name in ("mesh.obj", "mesh.mtl", "mesh.png"):
        assert (tmp_path / "out" / name).is_file()
    assert "map_Kd mesh.png" in (tmp_path / "out" / "mesh.mtl").read_text()
    back = load_obj(tmp_path / "out" / "mesh.obj")
    np.testing.assert_array_equal(back["faces"], faces)
    np.testing.assert_allclose(back["face_textures"], tex, atol=0.5 / 255 + 1e-9)


def test_texture_coordinates_put_samples_where_a_viewer_reads_them(tmp_path):
    # A viewer interpolates the atlas bilinearly at the uv of a surface point; at barycentric
    # weights (i/5, j/5, .) it must return sample (i, j) exactly (the NMR-style lookup).
    verts, faces = M.icosphere(0)
    tex = np.random.default_rng(1).uniform(size=(20, 6, 6, 3))
    save_obj(tmp_path / "m.obj", verts, faces, tex)
    atlas = np.asarray(Image.open(tmp_path / "m.png"), dtype=np.float64) / 255
    h, w = atlas.shape[:2]
    lines = (tmp_path / "m.obj").read_text().splitlines()
    vts = np.array([[float(x) for x in l.split()[1:]] for l in lines if l.startswith("vt ")])
    for f in (0, 7, 19):
        uv0, uv1, uv2 = vts[3 * f : 3 * f + 3]
        for i, j in [(0, 0), (5, 0), (0, 5), (2, 3), (1, 1)]:
            uv = uv2 + i / 5 * (uv0 - uv2) + j / 5 * (uv1 - uv2)
            x, y = uv[0] * w - 0.5, (1 - uv[1]) * h - 0.5  # texel-centre coordinates
            x0, y0 = int(np.floor(x)), int(np.floor(y))
            fx, fy = x - x0, y - y0
            value = (
                atlas[y0, x0] * (1 - fx) * (1 - fy)
                + atlas[y0, x0 + 1] * fx * (1 - fy)
                + atlas[y0 + 1, x0] * (1 - fx) * fy
                + atlas[y0 + 1, x0 + 1] * fx * fy
            )
            np.testing.assert_allclose(value, tex[f, i, j], atol=0.5 / 255 + 1e-6)


def test_save_obj_rejects_bad_input(tmp_path):
    verts, faces = M.icosphere(0)
    with pytest.raises(ValueError, match="verts"):
        save_obj(tmp_path / "a.obj", verts[:, :2], faces)
    with pytest.raises(ValueError, match="face indices"):
        save_obj(tmp_path / "a.obj", verts, faces + 100)
    with pytest.raises(ValueError, match="face_textures"):
        save_obj(tmp_path / "a.obj", verts, faces, np.zeros((3, 6, 6, 3)))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_obj(tmp_path / "missing.obj")
