"""Evaluation code on known answers, oracle checks on synthetic birds, and the demo."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umr import evaluation as E
from umr.geometry import axis_angle_to_quat, quat_to_matrix
from umr.obj_io import load_obj

REPO = Path(__file__).resolve().parents[1]


def run(module, *args, check=True):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode:
        raise AssertionError(f"{module} failed:\n{result.stderr[-3000:]}")
    return result


def test_pck_hand_worked_example():
    acc = E.PCKAccumulator(num_kps=3, alphas=(0.1, 0.15), padding_frac=0.05)  # error scale 0.55
    gt = torch.tensor([[[0.0, 0.0, 1], [0.5, 0.5, 1], [0.2, 0.2, 0]],
                       [[0.0, 0.0, 1], [0.5, 0.5, 1], [0.2, 0.2, 1]]])
    pred = torch.tensor([[[0.1, 0.0], [0.5, 0.8], [0.2, 0.2]],   # errors 0.1, 0.3, (invisible)
                         [[0.0, 0.25], [0.5, 0.5], [0.2, 0.1]]])  # errors 0.25, 0, 0.1
    vis_src = torch.tensor([[1, 1, 1], [1, 0, 1]])
    acc.add(pred, gt, vis_src)
    # scaled errors: kp0 0.055 (hit, hit), 0.1375 (miss, hit); kp1 0.165 (miss, miss), second pair not
    # visible in the source; kp2 only the second pair counts: 0.055 (hit, hit)
    result = acc.result()
    assert acc.counts.tolist() == [2, 1, 1]
    assert result["per_keypoint"]["0.1"] == [0.5, 0.0, 1.0]
    assert result["per_keypoint"]["0.15"] == [1.0, 0.0, 1.0]
    assert result["PCK.1"] == pytest.approx(0.5) and result["PCK.15"] == pytest.approx(2 / 3)
    empty = E.PCKAccumulator(num_kps=2)
    empty.add(pred[:, :2], gt[:, :2], torch.tensor([[1, 0], [1, 0]]))
    assert empty.result()["per_keypoint"]["0.1"][1] is None  # never visible in both: not averaged


def test_keypoint_heatmaps():
    heat = E.keypoint_heatmaps(torch.tensor([[[0.0, 0.0], [-0.99, 0.99]]]), 64, sigma=3)
    # (0, 0) -> pixel 32: patch corner int(32 - 9) = 23, peak at 32
    assert heat[0, 0].argmax() == 32 * 64 + 32 and heat[0, 0, 32, 32] == 1
    assert heat[0, 0, 32, 41] == pytest.approx(math.exp(-81 / 18), rel=1e-5) and heat[0, 0, 32, 42] == 0
    # a keypoint at the corner is clipped to the image
    assert heat[0, 1].max() > 0 and heat[0, 1, :, 40:].sum() == 0


def _paste_heatmap(px: float, py: float, size: int, sigma: float) -> np.ndarray:
    """The original's paste, written out: a (6σ+1)² Gaussian patch from int(p - 3σ) to
    int(p + 3σ + 1) per axis (each truncated on its own), clipped to the image."""
    r = int(3 * sigma)
    n = 2 * r + 1
    g = np.exp(-((np.arange(n)[:, None] - r) ** 2 + (np.arange(n)[None, :] - r) ** 2) / (2 * sigma**2))
    canvas = np.zeros((size, size))
    x0, y0, x1, y1 = int(px - r), int(py - r), int(px + r + 1), int(py + r + 1)
    gx, gy = (max(0, -x0), min(x1, size) - x0), (max(0, -y0), min(y1, size) - y0)
    ix, iy = (max(0, x0), min(x1, size)), (max(0, y0), min(y1, size))
    canvas[iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
    return canvas


def test_keypoint_heatmaps_match_the_original_paste_at_the_borders():
    size, sigma = 64, 3.0
    rng = np.random.default_rng(0)
    pix = np.concatenate([rng.uniform(-3, 12, (40, 2)), rng.uniform(0, size, (20, 2)), [[2.5, 4.5], [5.5, 60.2]]])
    kp = torch.from_numpy(pix * 2 / size - 1)[None]
    heat = E.keypoint_heatmaps(kp, size, sigma).numpy()[0]
    for k, (px, py) in enumerate((kp[0].numpy() + 1) / 2 * size):
        np.testing.assert_allclose(heat[k], _paste_heatmap(px, py, size, sigma), atol=1e-12)
    # x = 2.5: corner int(-6.5) = -6, end int(12.5) = 12: peak in column 3, column 12 (d = 9) unpainted;
    # y = 4.5: corner -4, end 14: peak in row 5, row 14 (d = 9) unpainted
    assert heat[60, 5, 3] == 1
    assert heat[60, 5, 11] > 0 and heat[60, 5, 12] == 0
    assert heat[60, 13, 3] > 0 and heat[60, 14, 3] == 0


def test_transfers_on_hand_examples():
    # two faces: A samples the left of the source, B the right; their targets are swapped
    flow_src = torch.tensor([-0.5, 0.0]).expand(1, 1, 2, 2, 2).clone()
    flow_src = torch.cat([flow_src, torch.tensor([0.5, 0.0]).expand(1, 1, 2, 2, 2)], dim=1)  # (1, 2, 2, 2, 2)
    flow_tgt = flow_src.flip(1)
    kp = torch.tensor([[[-0.5, 0.0], [0.5, 0.0]]])
    pred = E.transfer_by_flow(flow_src, flow_tgt, kp, 64)
    torch.testing.assert_close(pred, torch.tensor([[[0.5, 0.0], [-0.5, 0.0]]]), atol=0.04, rtol=0)
    # with face A hidden in the source, the left keypoint can only go through face B
    pred = E.transfer_by_flow(flow_src, flow_tgt, kp, 64, visible_src=torch.tensor([[False, True]]))
    torch.testing.assert_close(pred[0, 0], torch.tensor([-0.5, 0.0]), atol=0.04, rtol=0)
    # camera transfer: identity source, target turned 180° in the image plane
    verts = torch.tensor([[[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    cam_src = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0]])
    cam_tgt = torch.tensor([[1.0, 0, 0, 0, 0, 0, 1]])
    mask = torch.ones(1, 32, 32)
    pred = E.transfer_by_camera(verts, cam_src, verts, cam_tgt, mask, torch.tensor([[[-0.45, 0.02]]]))
    torch.testing.assert_close(pred[0, 0], torch.tensor([0.5, 0.0]), atol=1 / 31 + 1e-6, rtol=0)
    # batched: the nearest pixel of each image's own mask; an empty mask gives (0, 0)
    right_half = torch.zeros(32, 32)
    right_half[:, 24:] = 1
    masks = torch.stack([mask, right_half[None], torch.zeros(1, 32, 32)])[:, 0]
    kp = torch.tensor([[[-0.45, 0.02]], [[0.45, 0.0]], [[-0.45, 0.0]]])
    pred = E.transfer_by_camera(verts.expand(3, -1, -1), cam_src.expand(3, -1), verts.expand(3, -1, -1),
                                torch.cat([cam_tgt, cam_src, cam_src]), masks, kp)
    torch.testing.assert_close(pred[0, 0], torch.tensor([0.5, 0.0]), atol=1 / 31 + 1e-6, rtol=0)
    assert float(pred[1, 0, 0]) == pytest.approx(-1 + 2 * 24 / 31, abs=1e-6)  # vertex (0.5, 0) -> the mask's left edge, column 24
    assert abs(pred[1, 0, 1]) <= 1 / 31 + 1e-6
    assert torch.equal(pred[2], torch.zeros(1, 2))


def test_align_rotations_recovers_a_global_offset():
    g = torch.Generator().manual_seed(0)
    true = quat_to_matrix(torch.nn.functional.normalize(torch.randn(50, 4, generator=g, dtype=torch.float64), dim=-1))
    offset = quat_to_matrix(axis_angle_to_quat(torch.tensor([0.3, 1.0, 0.2], dtype=torch.float64), torch.tensor(1.1, dtype=torch.float64)))
    pred = true @ offset.T  # R_pred · offset = R_true
    errors, found = E.align_rotations(pred, true)
    assert errors.max() < 1e-6
    torch.testing.assert_close(found, offset, atol=1e-8, rtol=0)
    # each image perturbed by 0.1 rad (5.73°) about a random axis: the errors show it
    axes = torch.randn(50, 3, generator=g, dtype=torch.float64)
    noise = quat_to_matrix(axis_angle_to_quat(axes, torch.full((50,), 0.1, dtype=torch.float64)))
    errors, _ = E.align_rotations(noise @ pred, true)
    assert 4.5 < errors.median() < 7.0 and errors.max() < 9.0


def test_chamfer_and_fscore():
    a = torch.rand(500, 3, generator=torch.Generator().manual_seed(1))
    chamfer, fscore = E.chamfer_fscore(a, a, 0.01)
    assert chamfer == 0 and fscore == 1
    chamfer, fscore = E.chamfer_fscore(a, a + torch.tensor([0.2, 0.0, 0.0]), 0.05)
    assert chamfer > 0.001 and fscore < 0.5


def test_sample_surface_is_on_the_mesh():
    from umr.mesh import icosphere

    verts, faces = icosphere(3)
    points = E.sample_surface(torch.from_numpy(verts), torch.from_numpy(faces), 1000)
    radius = points.norm(dim=-1)
    assert radius.max() <= 1 + 1e-9 and radius.min() > 0.98  # on the faces, inside the unit sphere
    assert points.mean(0).norm() < 0.06  # uniform over the surface
    again, face = E.sample_surface(torch.from_numpy(verts), torch.from_numpy(faces), 1000, return_faces=True)
    assert torch.equal(again, points)  # seeded
    # each point lies in the plane of the face it names
    tri = torch.from_numpy(verts)[torch.from_numpy(faces)[face]]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    assert (((points - tri[:, 0]) * normal).sum(-1).abs() / normal.norm(dim=-1)).max() < 1e-9


@pytest.fixture(scope="module")
def synth(synth_set):
    return synth_set(seed=0, num_train=2, num_val=0, num_test=12, photo_size=256)


def eval_flags(root, size=128):
    return ["--dataset=synth_birds", f"--cub_dir={root / 'CUB_200_2011'}", f"--cub_cache_dir={root / 'cachedir' / 'cub'}",
            "--split=test", f"--img_size={size}", f"--image_size={size}", "--n_data_workers=0", "--batch_size=4"]


def test_oracle_scores_near_perfect_and_a_random_model_far_lower(synth, tmp_path):
    oracle = [*eval_flags(synth), "--oracle", f"--results_eval_dir={tmp_path}", "--name=oracle"]
    run("experiments.test_iou", *oracle)
    run("experiments.test_3d", *oracle)
    run("experiments.test_kp", *oracle, "--mode=cam", "--number_pairs=40")
    run("experiments.test_kp", *oracle, "--mode=flow", "--number_pairs=40")
    res = {n: json.loads((tmp_path / "oracle" / f"{n}.json").read_text())
           for n in ("test_iou", "test_3d", "test_kp_cam", "test_kp_flow")}
    assert res["test_iou"]["mask_iou"] >= 0.95 and res["test_iou"]["num_images"] == 12
    assert res["test_3d"]["rotation_error_deg_median"] < 1 and res["test_3d"]["rotation_error_deg_mean"] < 1
    assert res["test_3d"]["chamfer_l2"] < 1e-6 and res["test_3d"]["fscore"] > 0.99
    assert res["test_kp_cam"]["PCK.1"] >= 0.95 and res["test_kp_flow"]["PCK.1"] >= 0.95

    from umr.nets import MeshNet

    torch.manual_seed(0)
    checkpoint = tmp_path / "random" / "pred_net_latest.pth"
    checkpoint.parent.mkdir()
    torch.save({"model": MeshNet(stage=2, img_size=128, pretrained_encoder=False).state_dict()}, checkpoint)
    model = [*eval_flags(synth), f"--model_path={checkpoint}"]
    run("experiments.test_iou", *model)
    run("experiments.test_kp", *model, "--mode=cam", "--number_pairs=40")
    run("experiments.test_3d", *model)
    rand = {n: json.loads((checkpoint.parent / f"{n}.json").read_text()) for n in ("test_iou", "test_kp_cam", "test_3d")}
    assert rand["test_iou"]["mask_iou"] < res["test_iou"]["mask_iou"] - 0.3
    assert rand["test_kp_cam"]["PCK.1"] < res["test_kp_cam"]["PCK.1"] - 0.3
    assert rand["test_3d"]["chamfer_l2"] > 100 * max(res["test_3d"]["chamfer_l2"], 1e-6)
    # a data set without 3-D truth is refused by name, with the flag that fixes it
    result = run("experiments.test_3d", *model, "--dataset=cub", check=False)
    assert result.returncode == 2 and "--dataset cub has no 3-D truth" in result.stderr
    assert "--dataset synth_birds" in result.stderr


def test_demo_writes_every_file(synth, tmp_path):
    from umr.nets import MeshNet

    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pth"
    torch.save(MeshNet(stage=2, img_size=64, pretrained_encoder=False).state_dict(), checkpoint)
    photo = sorted((synth / "CUB_200_2011" / "images").glob("*/*test*.jpg"))[0]
    # any size, grayscale and RGBA work
    gray = tmp_path / "gray.png"
    Image.open(photo).convert("L").resize((300, 170)).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.open(photo).convert("RGBA").save(rgba)
    for i, image in enumerate((photo, gray, rgba)):
        out = tmp_path / f"demo{i}"
        result = run("experiments.demo", f"--model_path={checkpoint}", f"--img_path={image}", f"--out_path={out}",
                     "--img_size=64", "--image_size=64", "--turntable_frames=12")
        assert "demo: wrote" in result.stdout
        for name in ("mesh.obj", "mesh.mtl", "mesh.png", "render.png", "overlay.png", "turntable.gif", "camera.json",
                     "pred_tex.png"):
            assert (out / name).is_file(), name
    mesh = load_obj(tmp_path / "demo0" / "mesh.obj")
    assert mesh["verts"].shape == (642, 3) and mesh["faces"].shape == (1280, 3)
    assert mesh["face_textures"].shape == (1280, 6, 6, 3)
    assert Image.open(tmp_path / "demo0" / "turntable.gif").n_frames == 12
    assert Image.open(tmp_path / "demo0" / "pred_tex.png").size == (3 * 64, 2 * 64)
    camera = json.loads((tmp_path / "demo0" / "camera.json").read_text())
    assert len(camera["cam"]) == 7 and len(camera["hypotheses"]) == 8
    # clear messages for a missing model or image
    result = run("experiments.demo", f"--model_path={tmp_path / 'none.pth'}", f"--img_path={photo}",
                 f"--out_path={tmp_path}", "--img_size=64", "--image_size=64", check=False)
    assert result.returncode == 2 and "--model_path" in result.stderr
    result = run("experiments.demo", f"--model_path={checkpoint}", f"--img_path={tmp_path / 'none.jpg'}",
                 f"--out_path={tmp_path}", "--img_size=64", "--image_size=64", check=False)
    assert result.returncode == 2 and "--img_path" in result.stderr


def test_reconstruction_rows_and_template_views():
    from umr.nets import MeshNet
    from umr.renderer import make_renderer
    from umr.visuals import reconstruction_rows, template_views, to_uint8

    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=64, pretrained_encoder=False).train()
    images = torch.rand(2, 3, 64, 64)
    renderer = make_renderer(64, "picture")
    rows = reconstruction_rows(model, images, renderer)
    assert rows.shape == (128, 6 * 64, 3) and rows.dtype == np.uint8
    np.testing.assert_array_equal(rows[64:, :64], to_uint8(images[1]))  # first tile: the input
    assert model.training  # its mode is restored
    verts, faces = model.get_mean_shape().detach(), model.faces
    belly = template_views(verts, faces, np.full(len(faces), 4), renderer).astype(int)
    assert belly.shape == (64, 4 * 64, 3)
    drawn = (belly != 255).any(-1)
    assert drawn.mean() > 0.2  # every view shows the mesh
    r, g, b = (belly[..., k][drawn] for k in range(3))
    assert ((g > r) & (g > b)).mean() > 0.9  # belly green (BIRDS.part_colours[4])
