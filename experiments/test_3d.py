r"""3-D evaluation on the synthetic birds, which have true meshes and cameras.

    python -m experiments.test_3d --model_path cachedir/snapshots/synth_s2/pred_net_latest.pth \
        --split test --cub_dir cachedir/synth_birds/CUB_200_2011 --cub_cache_dir cachedir/synth_birds/cachedir/cub

Reports, over a split:

* camera rotation error (geodesic degrees, median and mean). The model fixes its own canonical
  frame, so its rotations are first aligned to the true ones by the single rotation that fits
  the whole set best (orthogonal Procrustes); per-image errors are measured after it.
* mask IoU (as test_iou).
* Chamfer-L2 and F-score between predicted and true surfaces, compared in each image's view
  frame: both meshes are placed by their own cameras (x, y in normalised image units, which the
  image fixes, so scale and rotation are aligned by the reconstruction itself) and depth-centred
  (orthographic projection cannot observe a depth offset) by the mean of 2048 points sampled
  uniformly on each surface; F-score at ``--fscore_tau`` normalised units.

Writes ``test_3d.json`` next to the checkpoint.
"""
import numpy as np
import torch
from absl import app, flags
from tqdm import tqdm

from umr.data.cub import make_loader
from experiments import flags as F
from experiments.common import Predictor, setup_evaluation, truth_camera, truth_path, user_errors_exit, write_results
from umr.evaluation import align_rotations, mask_iou, rotation_of, sample_surfaces, surface_distances

F.define_test_flags()
flags.DEFINE_float("fscore_tau", 0.05, "F-score distance threshold (normalised image units; 0.05 = 2.5 % of the width).")
FLAGS = F.FLAGS


@user_errors_exit
def main(_):
    ctx, dataset, checkpoint = setup_evaluation(FLAGS)
    gt = np.load(truth_path(FLAGS, FLAGS.split))
    surfaces = torch.from_numpy(gt["surface_points"]).float()
    dataset.pipeline.mirror = False  # the truth is unmirrored, whatever the loader quirk says
    predict = Predictor(FLAGS, ctx.device, FLAGS.split, checkpoint)
    loader = make_loader(dataset, FLAGS.batch_size, shuffle=False, drop_last=False, num_workers=FLAGS.n_data_workers)
    rot_pred, rot_true, ious, chamfers, fscores = [], [], [], [], []
    for i, batch in enumerate(tqdm(loader, desc="test_3d")):
        if FLAGS.max_eval_iter and i >= FLAGS.max_eval_iter:
            break
        out = predict(batch)
        true_cam = truth_camera(FLAGS, batch["sfm_pose"]).to(ctx.device)
        rot_pred.append(rotation_of(out["cam"]).cpu())
        rot_true.append(rotation_of(true_cam).cpu())
        ious.append(mask_iou(out["alpha"], batch["mask"].to(ctx.device)).cpu())
        truth = surfaces[batch["inds"]].to(ctx.device)
        if FLAGS.oracle:  # the truth's own surface (its mesh is a union with hidden inner parts)
            points = truth
        else:
            points = sample_surfaces(out["verts"], predict.faces, truth.shape[1], batch["inds"].tolist())
        batch_chamfers, batch_fscores = surface_distances(points, out["cam"], truth, true_cam, FLAGS.fscore_tau)
        chamfers += batch_chamfers
        fscores += batch_fscores
    errors, _ = align_rotations(torch.cat(rot_pred), torch.cat(rot_true))
    errors = errors.numpy()
    results = {
        "rotation_error_deg_median": float(np.median(errors)),
        "rotation_error_deg_mean": float(errors.mean()),
        "mask_iou": float(torch.cat(ious).mean()),
        "chamfer_l2": float(np.mean(chamfers)),
        "fscore": float(np.mean(fscores)),
        "fscore_tau": FLAGS.fscore_tau,
        "num_images": int(len(errors)),
        "split": FLAGS.split,
    }
    write_results(FLAGS, "test_3d", results,
                  f"test_3d: rotation error {results['rotation_error_deg_median']:.2f} deg (median), "
                  f"{results['rotation_error_deg_mean']:.2f} (mean); mask IoU {results['mask_iou']:.4f}; "
                  f"Chamfer-L2 {results['chamfer_l2']:.5f}; F-score@{FLAGS.fscore_tau} {results['fscore']:.3f} over "
                  f"{len(errors)} of the split's {len(dataset)} images")


if __name__ == "__main__":
    app.run(main)
