r"""Where a stage-2 model's pose error comes from, on a synthetic split; prints one JSON line.

Keys: ``rot_err_median`` / ``rot_err_mean`` (the most probable hypothesis, after the one global
rotation between the model's frame and the truth's, as test_3d), ``oracle_rot_err_median`` (the
best of the K hypotheses for every photo: what a perfect choice would reach), ``chosen`` (how
many photos each hypothesis wins), ``top_prob_mean``, ``spread_deg`` (per hypothesis, the
median angle between its rotations over the photos and their mean: near 0 means one fixed
view), ``err_by_view`` (median error of side, front and back views by the true azimuth) and
``flips`` (share of errors above 135°).

    python -m benchmarks.pose_diagnosis --model_path <stage-2 pred_net_latest.pth> \
        --data <synthetic set> [--split test]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from umr.data.cub import CUBDataset
from umr.data.synth_birds import canonical_camera
from experiments.common import load_model
from umr.evaluation import align_rotations, rotation_of
from umr.geometry import matrix_to_quat, quat_geodesic_angle


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angles (N,) between rotation matrices (N, 3, 3)."""
    return torch.rad2deg(quat_geodesic_angle(matrix_to_quat(a), matrix_to_quat(b)))


def mean_rotation(rots: torch.Tensor) -> torch.Tensor:
    """The chordal mean (3, 3) of rotations (N, 3, 3)."""
    u, _, vt = torch.linalg.svd(rots.sum(0).double())
    d = torch.sign(torch.det(u @ vt))
    return (u @ torch.diag(torch.tensor([1.0, 1.0, float(d)], dtype=u.dtype)) @ vt).to(rots.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--data", required=True, help="a synthetic set (python -m umr.data.synth_birds --out ...)")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    model = load_model(args.model_path, torch.device("cpu"))
    if model.stage != 2:
        parser.error("--model_path: a stage-2 model is needed (camera hypotheses)")
    size = model.arch["img_size"]
    dataset = CUBDataset(f"{args.data}/CUB_200_2011", f"{args.data}/cachedir/cub", split=args.split, img_size=size,
                         mirror=False)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.from_numpy(np.stack([it["img"] for it in items]))
    true = rotation_of(canonical_camera(torch.from_numpy(np.stack([it["sfm_pose"] for it in items]))).float())
    with torch.no_grad():
        outs = [model(images[i : i + 32]) for i in range(0, len(images), 32)]
    hyps = torch.cat([o["cam_hypotheses"] for o in outs])
    probs = torch.cat([o["cam_probs"] for o in outs])
    chosen = torch.cat([o["cam"] for o in outs])
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
        "num_images": len(items),
    }))


if __name__ == "__main__":
    main()
