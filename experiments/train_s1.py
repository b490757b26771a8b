r"""Stage 1: learn the category template from a sphere, with one camera per image and no
semantic losses (docs/method.md §10).

    python -m experiments.train_s1 --name cub_s1 --batch_size 64 \
        --cub_dir CUB_200_2011/ --cub_cache_dir cachedir/cub/
    torchrun --nproc_per_node 4 -m experiments.train_s1 --name cub_s1 ...   # several GPUs

Outputs: <checkpoint_dir>/<name>/pred_net_latest.pth (+ pred_net_<epoch>.pth), loss_log.jsonl,
and PNG visuals in <vis_dir>/<name>/.
"""
from absl import app

from experiments import flags as F
from experiments.common import build_dataset, build_model, build_validator, check_sizes, run_training, user_errors_exit
from umr import distributed as D
from umr.objectives import ObjectiveConfig, Stage1Objective, TemplateUpdate
from umr.quirks import Quirks
from umr.trainer import Trainer, TrainSettings, seed_everything

F.define_train_flags(stage=1)
FLAGS = F.FLAGS


@user_errors_exit
def main(_):
    check_sizes(FLAGS)
    ctx = D.setup(FLAGS.device)
    seed_everything(FLAGS.seed)
    dataset = build_dataset(FLAGS, FLAGS.split, use_scops=False)
    model = build_model(FLAGS, stage=1)
    config = ObjectiveConfig.from_flags(FLAGS, stage=1)
    objective = Stage1Objective(model, config)
    try:
        template_update = TemplateUpdate(config.update_template_freq, Quirks.from_flags(FLAGS).template_jump,
                                         config.template_update)
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    trainer = Trainer(TrainSettings.from_flags(FLAGS, 1), model, objective, dataset, ctx,
                      extra_state={"stage": 1, "flags": FLAGS.flag_values_dict()},
                      end_of_epoch=template_update,
                      validate=build_validator(FLAGS, ctx.device))
    run_training("train_s1", trainer, dataset, ctx)


if __name__ == "__main__":
    app.run(main)
