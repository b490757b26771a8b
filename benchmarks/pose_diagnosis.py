r"""Where a stage-1 or stage-2 model's pose error comes from, on a synthetic split; prints one JSON line.

Keys: ``rot_err_median`` / ``rot_err_mean`` (the most probable hypothesis, after the one global
rotation between the model's frame and the truth's, as test_3d), ``oracle_rot_err_median`` (the
best of the K hypotheses for every photo: what a perfect choice would reach), ``chosen`` (how
many photos each hypothesis wins), ``top_prob_mean``, ``spread_deg`` (per hypothesis, the
median angle between its rotations over the photos and their mean: near 0 means one fixed
view), ``err_by_view`` (median error of side, front and back views by the true azimuth) and
``flips`` (share of errors above 135°), ``facing`` (the views within 60° of a side: the share
whose predicted camera faces the bird the way the photo does, ``agree``, and the shares facing
right, predicted and true; a camera that never turns the bird round agrees on about half).
A stage-1 model (one camera) gets the same keys. With ``--stemp_path`` (the run's semantic template) also
``chosen_by_losses``: the error when each photo's hypothesis is the one with the lowest stage-2
camera loss on that photo (silhouette IoU of the predicted mesh, plus UMR's or the visible vertex
loss, at stage 2's weights, the latter ``train_s2 --hypothesis_choice best``'s target; and each
of these plus 25 times the hypothesis' part matching loss, ``train_s2 --part_choice_wt 25``'s). It needs
the photo's mask and part points, so it is a diagnosis of the probabilities, not a way to predict.

    python -m benchmarks.pose_diagnosis --model_path <stage-1 or stage-2 pred_net_latest.pth> \
        --data <synthetic set> [--split test] [--stemp_path <semantic template>]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.utils.data import default_collate

from umr import losses as L
from umr.category import BIRDS
from umr.data.cub import CUBDataset
from umr.data.synth_birds import canonical_camera
from experiments.common import load_model
from umr.evaluation import align_rotations, rotation_of
from umr.geometry import matrix_to_quat, quat_geodesic_angle
from umr.objectives import ObjectiveConfig, Stage2Objective, hypothesis_choice_scores
from umr.renderer import point_visibility


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angles (N,) between rotation matrices (N, 3, 3)."""
    return torch.rad2deg(quat_geodesic_angle(matrix_to_quat(a), matrix_to_quat(b)))


def mean_rotation(rots: torch.Tensor) -> torch.Tensor:
    """The chordal mean (3, 3) of rotations (N, 3, 3)."""
    u, _, vt = torch.linalg.svd(rots.sum(0).double())
    d = torch.sign(torch.det(u @ vt))
    return (u @ torch.diag(torch.tensor([1.0, 1.0, float(d)], dtype=u.dtype)) @ vt).to(rots.dtype)


CHOICE_RULES = ("mask", "mask_and_umr_vertex", "mask_and_visible_vertex", "mask_umr_vertex_and_parts",
                "mask_visible_vertex_and_parts")


def choices_by_losses(model, batch: dict, hyps: torch.Tensor, stemp_path, part_choice_wt: float = 25.0) -> dict:
    """{rule: (N,) hypothesis index with the lowest stage-2 camera loss under that rule}."""
    N, K = hyps.shape[:2]
    config = ObjectiveConfig.for_stage(2, image_size=model.arch["img_size"], part_choice_wt=part_choice_wt,
                                       texture_loss="l1", use_gan=False)
    semantic = L.SemanticTemplate(stemp_path)
    labels = L.face_sample_labels(semantic.seg, model.texture_predictor.uv_sampler, model.mesh)
    objective = Stage2Objective(model, config, labels, semantic.vertices)
    template = model.get_mean_shape()
    renderer = objective.renderer  # the training renders' settings, at the model's size
    points = {p: batch[f"{p}_points"].float() for p in semantic.vertices}
    with torch.no_grad():
        verts = model(batch["img"].float())["verts"].repeat_interleave(K, 0)
        render = renderer(verts, model.faces, hyps.reshape(N * K, 7))
        neg_ious = L.neg_iou(render.image[:, 3], batch["mask"].float().repeat_interleave(K, 0)).view(N, K)
        umr = L.vertex_correspondence_terms(template, semantic.vertices, hyps, points, BIRDS.vertex_loss_weights)
        visible = point_visibility(verts, hyps.reshape(N * K, 7), render.depth, renderer.depth_offset).view(N, K, -1)
        best = hypothesis_choice_scores(config, neg_ious, template, semantic.vertices, hyps, points, visible)
        part_maps = L.normalise_part_maps(batch["part_prob"].float(), batch["mask"].float())
        parts = config.part_choice_wt * objective.hypothesis_part_losses(verts[::K], hyps, part_maps)
    mask_and_umr = config.mask_loss_wt * neg_ious + config.vertex_loss_wt * umr
    return {"mask": neg_ious.argmin(1),
            "mask_and_umr_vertex": mask_and_umr.argmin(1),
            "mask_and_visible_vertex": best.argmin(1),
            "mask_umr_vertex_and_parts": (mask_and_umr + parts).argmin(1),
            "mask_visible_vertex_and_parts": (best + parts).argmin(1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--data", required=True, help="a synthetic set (python -m umr.data.synth_birds --out ...)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--stemp_path", default=None, help="the run's semantic template: also choose by the losses")
    args = parser.parse_args()
    model = load_model(args.model_path, torch.device("cpu"))
    if model.stage != 2 and args.stemp_path:
        parser.error("--stemp_path: a stage-2 model is needed (camera hypotheses to choose among)")
    size = model.arch["img_size"]
    dataset = CUBDataset(f"{args.data}/CUB_200_2011", f"{args.data}/cachedir/cub", split=args.split, img_size=size,
                         mirror=False, scops_path=f"{args.data}/scops" if args.stemp_path else None)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.from_numpy(np.stack([it["img"] for it in items]))
    true = rotation_of(canonical_camera(torch.from_numpy(np.stack([it["sfm_pose"] for it in items]))).float())
    with torch.no_grad():
        outs = [model(images[i : i + 32]) for i in range(0, len(images), 32)]
    chosen = torch.cat([o["cam"] for o in outs])
    if model.stage == 2:
        hyps = torch.cat([o["cam_hypotheses"] for o in outs])
        probs = torch.cat([o["cam_probs"] for o in outs])
    else:  # stage 1: its one camera
        hyps, probs = chosen[:, None], torch.ones(len(chosen), 1)
    errors, g = align_rotations(rotation_of(chosen), true)
    K = hyps.shape[1]
    per_hyp = torch.stack([angle_deg(rotation_of(hyps[:, k]) @ g, true) for k in range(K)], 1)
    winner = probs.argmax(1)
    spreads = []
    for k in range(K):
        rots = rotation_of(hyps[:, k]) @ g
        spreads.append(round(float(angle_deg(rots, mean_rotation(rots).expand_as(rots)).median()), 1))
    forward = true[:, :, 0]  # the bird's forward axis in the camera frame
    azimuth = torch.rad2deg(torch.atan2(forward[:, 2], forward[:, 0]))
    views = {"side": (azimuth.abs() < 50) | (azimuth.abs() > 130),
             "front_or_back": (azimuth.abs() >= 50) & (azimuth.abs() <= 130)}
    # which way side views face: the sign of the bird's forward axis along the image's x
    facing_true, facing_pred = forward[:, 0] > 0, (rotation_of(chosen) @ g)[:, 0, 0] > 0
    side = forward[:, 0].abs() > 0.5
    by_losses = None
    if args.stemp_path:
        batch = default_collate(items)
        by_losses = {name: round(float(align_rotations(rotation_of(hyps[torch.arange(len(items)), pick]), true)[0].median()), 2)
                     for name, pick in choices_by_losses(model, batch, hyps, args.stemp_path).items()}
    print(json.dumps({
        "rot_err_median": round(float(errors.median()), 2),
        "rot_err_mean": round(float(errors.mean()), 2),
        "oracle_rot_err_median": round(float(per_hyp.min(1).values.median()), 2),
        "chosen": torch.bincount(winner, minlength=K).tolist(),
        "top_prob_mean": round(float(probs.max(1).values.mean()), 3),
        "spread_deg": spreads,
        "err_by_view": {name: {"n": int(sel.sum()), "median": round(float(errors[sel].median()), 1) if sel.any() else None}
                        for name, sel in views.items()},
        "flips": round(float((errors > 135).float().mean()), 3),
        "facing": {"n": int(side.sum()), "agree": round(float((facing_true == facing_pred)[side].float().mean()), 3),
                   "predicted_right": round(float(facing_pred[side].float().mean()), 3),
                   "true_right": round(float(facing_true[side].float().mean()), 3)},
        "num_images": len(items),
        **({"chosen_by_losses": by_losses} if by_losses else {}),
    }))


if __name__ == "__main__":
    main()
