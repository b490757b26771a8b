r"""Mask IoU of the rendered prediction against the ground-truth mask (docs/method.md §14.2).

    python -m experiments.test_iou --model_path cachedir/snapshots/cub_s2/pred_net_latest.pth \
        --split test --batch_size 32 --cub_dir CUB_200_2011/ --cub_cache_dir cachedir/cub/

Per image ``Σ(M·Â) / Σ(M + Â − M·Â)`` with the soft silhouette Â at the predicted camera and the
fractional ground-truth mask; prints the mean and writes ``test_iou.json`` next to the
checkpoint. By default every test image counts once, unmirrored, at the most probable camera;
``--compat`` restores the original's shuffled, mirrored loader that drops the last partial batch
and its sampled camera (quirks Q12, Q13).
"""
import torch
from absl import app
from tqdm import tqdm

from umr.data.cub import make_loader
from experiments import flags as F
from experiments.common import Predictor, setup_evaluation, user_errors_exit, write_results
from umr.evaluation import mask_iou
from umr.quirks import Quirks

F.define_test_flags()
FLAGS = F.FLAGS


@user_errors_exit
def main(_):
    ctx, dataset, checkpoint = setup_evaluation(FLAGS)
    predict = Predictor(FLAGS, ctx.device, FLAGS.split, checkpoint)
    original_loader = Quirks.from_flags(FLAGS).q13_shuffled_test_loaders
    loader = make_loader(dataset, FLAGS.batch_size, shuffle=original_loader, drop_last=original_loader,
                         num_workers=FLAGS.n_data_workers)
    ious = []
    for i, batch in enumerate(tqdm(loader, desc="test_iou")):
        if FLAGS.max_eval_iter and i >= FLAGS.max_eval_iter:
            break
        out = predict(batch)
        ious.append(mask_iou(out["alpha"], batch["mask"].to(ctx.device)).cpu())
    ious = torch.cat(ious).numpy()
    results = {"mask_iou": float(ious.mean()), "num_images": int(len(ious)), "split_images": len(dataset),
               "split": FLAGS.split}
    write_results(FLAGS, "test_iou", results, f"test_iou: average mask IoU {results['mask_iou']:.4f} over "
                                              f"{len(ious)} of the split's {len(dataset)} images")


if __name__ == "__main__":
    app.run(main)
