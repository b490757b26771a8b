"""How well do stage 2's camera losses determine the pose? Prints one JSON line.

No network: on the test photos of a synthetic set, every camera hypothesis is fitted to each
photo on its own (Adam on scale, translation and rotation, the hypotheses starting where stage
2's do: scale 1, centred, at the 8 side views of ``cam_biases``) with the losses that train
stage 2's cameras: the silhouette IoU of the template's render and the vertex correspondence
loss (``--vertex_loss umr|visible``, as ``train_s2``). The template is the truth's semantic
template (``umr.data.synth_birds.truth_template`` of the set's training split) unless
``--stemp_path`` names another (e.g. what ``avg_uv`` wrote). The lowest loss picks the
hypothesis, as the probabilities would at best. A network trained with these losses can at best
find these minima, so their errors bound what it can learn.

Keys: ``rot_err_median`` / ``rot_err_mean`` (degrees, the picked hypothesis against the truth);
``rot_err_mirror_median`` (against the nearer of the truth and its mirror image through the image
plane, which projects a symmetric template's vertices to the same places); ``rot_err_aligned_median``
(after the one global rotation between the template's frame and the truth's, as ``test_3d``: a
learned template need not face the truth's way); ``oracle_rot_err_median``
(the best of the fitted hypotheses); ``drift_from_truth_median`` (fitting started at the true
camera: how far the losses' own minimum lies from the truth); ``mask_iou`` of the picked fit.

    python -m benchmarks.pose_identifiability --data cachedir/quick/synth_birds [--vertex_loss visible]
        [--num_images 48] [--img_size 64] [--iters 150] [--stemp_path <dir>]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.data import default_collate

from umr import losses as L
from umr.category import BIRDS
from umr.data import dataset_spec
from umr.data.cub import CUBDataset
from umr.data.synth_birds import truth_template
from umr.evaluation import align_rotations, rotation_of
from umr.geometry import hamilton_product, quat_geodesic_angle, matrix_to_quat
from umr.mesh import symmetric_template
from umr.nets import camera_biases
from umr.objectives import ObjectiveConfig
from umr.renderer import make_renderer, point_visibility


def fit(quat0, scale0, trans0, bias, loss_fn, iters: int, lr: float):
    """Adam on cameras [s, tx, ty, q ⊗ bias] (N, 7) from the given start; returns the cameras and
    their final losses (N,)."""
    params = [x.clone().requires_grad_() for x in (scale0, trans0, quat0)]
    optimiser = torch.optim.Adam(params, lr=lr)

    def cameras():
        quat = torch.nn.functional.normalize(params[2], dim=-1)
        if bias is not None:
            quat = hamilton_product(quat, bias)
        return torch.cat([params[0], params[1], quat], dim=-1)

    for _ in range(iters):
        optimiser.zero_grad()
        loss_fn(cameras())[0].sum().backward()
        optimiser.step()
    with torch.no_grad():
        cams = cameras()
        return cams, *loss_fn(cams)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a synthetic set (python -m umr.data.synth_birds --out ...)")
    parser.add_argument("--stemp_path", default=None, help="semantic template (default: the truth's)")
    parser.add_argument("--vertex_loss", default="umr", choices=("umr", "visible"))
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--num_hypo_cams", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = Path(args.data)
    config = ObjectiveConfig.for_stage(2)
    with tempfile.TemporaryDirectory() as tmp:
        stemp = Path(args.stemp_path or tmp)
        if args.stemp_path is None:
            truth_template(data / "gt" / "train.npz", stemp)
        template_files = L.SemanticTemplate(stemp)
    mesh = symmetric_template()
    template = mesh.symmetrize(template_files.mean_v.float())
    parts = template_files.vertices
    weights = {p: 1.0 for p in parts} if args.vertex_loss == "visible" else BIRDS.vertex_loss_weights
    dataset = CUBDataset(data / "CUB_200_2011", data / "cachedir" / "cub", split="test", img_size=args.img_size,
                         scops_path=data / "scops", mirror=False, jitter_frac=0.0)
    batch = default_collate([dataset[i] for i in range(min(args.num_images, len(dataset)))])
    true = dataset_spec("synth_birds").truth_camera(batch["sfm_pose"]).float()
    mask = batch["mask"].float()
    N, K = len(mask), args.num_hypo_cams
    faces = torch.from_numpy(mesh.faces)
    renderer = make_renderer(args.img_size)

    def losses(cams):  # (N * k, 7), image-major → total and IoU, (N * k,) each
        k = len(cams) // N
        verts = template[None].expand(len(cams), -1, -1)
        render = renderer(verts, faces, cams)
        neg_iou = L.neg_iou(render.image[:, 3], mask.repeat_interleave(k, 0))
        visible = None
        if args.vertex_loss == "visible":
            visible = point_visibility(verts, cams.detach(), render.depth, renderer.depth_offset).view(N, k, -1)
        vertex = L.vertex_correspondence_terms(template, parts, cams.view(N, k, 7),
                                               {p: batch[f"{p}_points"].float() for p in parts}, weights, visible)
        return config.mask_loss_wt * neg_iou + config.vertex_loss_wt * vertex.reshape(-1), 1 - neg_iou

    start = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(N * K, 1)
    cams, total, iou = fit(start, torch.ones(N * K, 1), torch.zeros(N * K, 2), camera_biases(K).repeat(N, 1),
                           losses, args.iters, args.lr)
    best = total.view(N, K).argmin(1)
    rows = torch.arange(N)
    picked = cams.view(N, K, 7)[rows, best]

    def degrees(cam, rot):
        return torch.rad2deg(quat_geodesic_angle(torch.nn.functional.normalize(cam[:, 3:], dim=-1), rot))

    flip_depth = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    mirror = torch.eye(3, dtype=torch.float64)
    mirror[1, 1] = -1.0  # the template's symmetry axis (1)
    twin = matrix_to_quat(flip_depth @ rotation_of(true).double() @ mirror).float()
    errors = degrees(picked, true[:, 3:])
    aligned, _ = align_rotations(rotation_of(picked).float(), rotation_of(true).float())
    every = torch.stack([degrees(cams.view(N, K, 7)[:, k], true[:, 3:]) for k in range(K)], 1)
    refined, _, _ = fit(true[:, 3:], true[:, :1], true[:, 1:3], None, losses, args.iters // 2, args.lr / 2)
    result = {
        "vertex_loss": args.vertex_loss, "template": "truth" if args.stemp_path is None else str(stemp),
        "rot_err_median": round(float(errors.median()), 1), "rot_err_mean": round(float(errors.mean()), 1),
        "rot_err_aligned_median": round(float(aligned.median()), 1),
        "rot_err_mirror_median": round(float(torch.minimum(errors, degrees(picked, twin)).median()), 1),
        "oracle_rot_err_median": round(float(every.min(1).values.median()), 1),
        "drift_from_truth_median": round(float(degrees(refined, true[:, 3:]).median()), 1),
        "mask_iou": round(float(iou.view(N, K)[rows, best].mean()), 3),
        "num_images": N, "img_size": args.img_size, "iters": args.iters,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
