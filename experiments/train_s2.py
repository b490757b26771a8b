r"""Stage 2: the full model with multiple camera hypotheses and semantic consistency, on the
template and semantic parts that avg_uv wrote (docs/method.md §12).

    python -m experiments.train_s2 --name cub_s2 --batch_size 16 \
        --cub_dir CUB_200_2011/ --cub_cache_dir cachedir/cub/ \
        --scops_path SCOPS/results/cub/ITER_60000/train/dcrf_prob --stemp_path cachedir/snapshots/cub_s1/

Outputs as train_s1.
"""
from absl import app

from experiments import flags as F
from experiments.common import (build_dataset, build_model, build_validator, check_sizes, init_from_checkpoint,
                                run_training, user_errors_exit)
from umr import distributed as D
from umr.losses import SemanticTemplate, check_part_vertices, face_sample_labels
from umr.objectives import ObjectiveConfig, Stage2Objective
from umr.quirks import Quirks
from umr.trainer import Trainer, TrainSettings, seed_everything

F.define_train_flags(stage=2)
FLAGS = F.FLAGS


@user_errors_exit
def main(_):
    check_sizes(FLAGS)
    ctx = D.setup(FLAGS.device)
    seed_everything(FLAGS.seed)
    dataset = build_dataset(FLAGS, FLAGS.split, use_scops=True)
    template = SemanticTemplate(FLAGS.stemp_path, dataset.category)
    model = build_model(FLAGS, stage=2, mean_shape=template.mean_v)
    check_part_vertices(template.vertices, len(model.mesh.verts), FLAGS.min_part_share, FLAGS.stemp_path)
    if FLAGS.init_from and not FLAGS.resume:
        parts = init_from_checkpoint(model, FLAGS.init_from)
        if ctx.is_main:
            print(f"train_s2: {', '.join(parts)} initialised from {FLAGS.init_from}")
    labels = face_sample_labels(template.seg, model.texture_predictor.uv_sampler, model.mesh,
                                Quirks.from_flags(FLAGS).q10_rounded_labels)
    config = ObjectiveConfig.from_flags(FLAGS, stage=2)
    objective = Stage2Objective(model, config, labels, template.vertices, category=dataset.category)
    trainer = Trainer(TrainSettings.from_flags(FLAGS, 2), model, objective, dataset, ctx,
                      extra_state={"stage": 2, "flags": FLAGS.flag_values_dict()},
                      validate=build_validator(FLAGS, ctx.device))
    run_training("train_s2", trainer, dataset, ctx)


if __name__ == "__main__":
    app.run(main)
