r"""Keypoint transfer between image pairs (docs/method.md §14.1).

    python -m experiments.test_kp --model_path cachedir/snapshots/cub_s2/pred_net_latest.pth \
        --mode flow --number_pairs 10000 --split test --cub_dir CUB_200_2011/ --cub_cache_dir cachedir/cub/

``--mode flow`` transfers through the texture flows, ``--mode cam`` through the cameras and the
template. Only faces (flow) or vertices (cam) visible in the source image can carry a keypoint
(the original considered hidden ones too, which can win where they project onto the keypoint;
``--compat`` restores that). Both directions of every pair count; PCK at 0.1 and 0.15 of the tight bounding box's
longer side, per keypoint and averaged. Writes ``test_kp_<mode>.json`` next to the checkpoint;
``--visualize`` writes source / target / prediction images to <results_vis_dir>/<name>/.
Pairs are the same for a given ``--pair_seed`` (default: the data set size, as the original) and
``--number_pairs``. ``--compat`` restores the original's mirrored test images, sampled cameras
and one extra pair (quirks Q12, Q13, Q27).
"""
from pathlib import Path

import cv2
import numpy as np
import torch
from absl import app, flags
from tqdm import tqdm

from umr.data.cub import KeypointPairs, make_loader
from experiments import flags as F
from experiments.common import Predictor, setup_evaluation, user_errors_exit, write_results
from umr.evaluation import PCKAccumulator, transfer_keypoints
from umr.conventions import to_pixels
from umr.quirks import Quirks
from umr.visuals import to_uint8

F.define_test_flags()
flags.DEFINE_enum("mode", "flow", ["flow", "cam"], "Transfer through texture flows (flow) or cameras (cam).")
flags.DEFINE_integer("number_pairs", 1000, "Image pairs (the README of the original used 10000).", lower_bound=1)
flags.DEFINE_integer("pair_seed", None, "Seed of the pair draw (default: the data set size, as the original).")
flags.DEFINE_float("sigma", 3.0, "Heat-map sigma (pixels) of the flow mode.")
flags.DEFINE_boolean("visualize", False, "Write source/target/prediction images.")
FLAGS = F.FLAGS


def draw(image, kps, colour):
    size = image.shape[0]
    for x, y in kps:
        cv2.circle(image, (int(to_pixels(x, size, "edge")), int(to_pixels(y, size, "edge"))), 5, colour, 1)
    return image


@user_errors_exit
def main(_):
    ctx, dataset, checkpoint = setup_evaluation(FLAGS)
    quirks = Quirks.from_flags(FLAGS)
    count = FLAGS.number_pairs + (1 if quirks.q27_extra_pair else 0)  # the original's loop ran one pair over
    pairs = KeypointPairs(dataset, count, seed=FLAGS.pair_seed)
    predict = Predictor(FLAGS, ctx.device, FLAGS.split, checkpoint)
    loader = make_loader(pairs, max(1, FLAGS.batch_size // 2), shuffle=False, drop_last=False,
                         num_workers=FLAGS.n_data_workers)
    keypoint_names = dataset.category.keypoint_names
    pck = PCKAccumulator(len(keypoint_names), padding_frac=FLAGS.padding_frac)
    vis_dir = Path(FLAGS.results_vis_dir) / FLAGS.name
    evaluated = 0
    for i, batch in enumerate(tqdm(loader, desc=f"test_kp ({FLAGS.mode})")):
        if FLAGS.max_eval_iter and i >= FLAGS.max_eval_iter:
            break
        n = batch["img"].shape[0]
        evaluated += n
        flat = {k: v.flatten(0, 1) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        flat["inds"] = torch.stack([torch.as_tensor(batch["inds"][0]), torch.as_tensor(batch["inds"][1])], 1).flatten()
        out = {k: v.view(n, 2, *v.shape[1:]) for k, v in predict(flat).items()}
        kp = batch["kp"].to(ctx.device)  # (n, 2, 15, 3)
        for src, tgt in ((0, 1), (1, 0)):
            pred = transfer_keypoints({k: v[:, src] for k, v in out.items()}, {k: v[:, tgt] for k, v in out.items()},
                                      kp[:, src, :, :2], FLAGS.mode, FLAGS.img_size, FLAGS.sigma,
                                      visible_only=not quirks.hidden_keypoints)
            pck.add(pred, kp[:, tgt], kp[:, src, :, 2])
            if FLAGS.visualize and src == 0:
                vis_dir.mkdir(parents=True, exist_ok=True)
                for j in range(n):
                    vis = (kp[j, :, :, 2] > 0).cpu().numpy()
                    source = draw(to_uint8(batch["img"][j, 0]).copy(), kp[j, 0, vis[0], :2].cpu().numpy(), (255, 0, 0))
                    target = draw(to_uint8(batch["img"][j, 1]).copy(), kp[j, 1, vis[1], :2].cpu().numpy(), (0, 255, 0))
                    target = draw(target, pred[j, vis[0] & vis[1]].cpu().numpy(), (255, 0, 0))
                    cv2.imwrite(str(vis_dir / f"pair_{i * n + j:05d}.png"), np.concatenate([source, target], 1)[..., ::-1])
    results = pck.result()
    results.update(mode=FLAGS.mode, number_pairs=evaluated, number_pairs_requested=len(pairs), pair_seed=FLAGS.pair_seed,
                   split=FLAGS.split, split_images=len(dataset), keypoints=list(keypoint_names))
    per_kp = results["per_keypoint"]["0.1"]
    write_results(FLAGS, f"test_kp_{FLAGS.mode}", results,
                  f"test_kp ({FLAGS.mode}): PCK.1 {results['PCK.1']:.4f}  PCK.15 {results['PCK.15']:.4f} over {evaluated} "
                  f"pairs{'' if evaluated == len(pairs) else f' (of {len(pairs)}: --max_eval_iter)'}\n  "
                  + "  ".join(f"{name} {v:.2f}" if v is not None else f"{name} -" for name, v in zip(keypoint_names, per_kp)))


if __name__ == "__main__":
    app.run(main)
