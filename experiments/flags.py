"""Every command-line flag of the experiments, in one place (absl). Names and defaults follow
the original (spec model_training_eval.md §15) unless a note says otherwise; flags the original
defined but never used are left out, and ``--multi_gpu`` / ``--gpu_num`` remain as aliases
that explain how multi-GPU training works now.

Each experiment calls the ``define_*`` functions it needs at import time.
"""
from __future__ import annotations

import os

from absl import flags

from umr.quirks import QUIRK_NAMES

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, "cachedir")


def _once(fn):
    """A define_* function may be called by several modules; define the flags only once."""
    done = []

    def wrapper(*args, **kwargs):
        if not done:
            fn(*args, **kwargs)
            done.append(True)

    wrapper.__doc__ = fn.__doc__
    return wrapper


def _known_quirks(names) -> bool:
    return all(name in QUIRK_NAMES for name in names)


@_once
def define_data_flags():
    """Data (data/base.py, data/cub.py in the original)."""
    flags.DEFINE_integer("img_size", 256, "Image size (pixels) the loaders crop and resize to; a multiple of 64.")
    flags.DEFINE_float("padding_frac", 0.05, "Bounding box padding, as a fraction of its size.")
    flags.DEFINE_float("jitter_frac", 0.05, "Bounding box jitter on the train split, as a fraction of its size.")
    flags.DEFINE_enum("split", "train", ["train", "val", "test", "all"], "Data split.")
    flags.DEFINE_integer("n_data_workers", 4, "DataLoader worker processes (0 loads in the main process).",
                         lower_bound=0)
    flags.DEFINE_string("cub_dir", "CUB_200_2011/", "CUB-200-2011 folder (contains images/).")
    flags.DEFINE_string("cub_cache_dir", "unsup-mesh/cachedir/cub/", "CMR annotation cache (contains data/ and sfm/).")
    flags.DEFINE_string("scops_path", "SCOPS/results/cub/ITER_60000/train/dcrf_prob", "SCOPS part probability maps.")
    flags.DEFINE_integer("data_seed", 0, "Seed of the data augmentation (new flag).")


@_once
def define_model_flags():
    """Networks (nnutils/cub_mesh*.py in the original)."""
    flags.DEFINE_integer("nz_feat", 200, "Encoder feature size.")
    flags.DEFINE_integer("z_dim", 350, "Latent code size.")
    flags.DEFINE_integer("num_hypo_cams", 8, "Camera hypotheses (stage 2).", lower_bound=1)
    flags.DEFINE_integer("tex_size", 6, "Texture samples per face side.", lower_bound=2)
    flags.DEFINE_integer("subdivide", 3, "Icosphere subdivisions of the template (3: 642 vertices, 1280 faces).")
    flags.DEFINE_integer("axis", 1, "Symmetry axis of the template.")
    flags.DEFINE_integer("uv_height", 0,
                         "Rows of the predicted UV flow image (a power of two; its width is twice that). 0: from the "
                         "face count and --tex_size, 128 for the default mesh, as the original. 32 suffices for 64-px "
                         "images and makes the texture-flow network several times cheaper.")
    flags.DEFINE_integer("uv_channels", 256,
                         "Channels of the texture-flow decoder's first 4 x 8 feature map (the two fully connected "
                         "layers before it have 32 times as many units); 256 as the original.")
    flags.DEFINE_boolean("pretrained_encoder", True,
                         "Start the ResNet-18 encoder from ImageNet weights (torchvision's, from the local torch hub "
                         "cache); --nopretrained_encoder trains it from scratch (new flag).")
    flags.DEFINE_boolean("compat", False,
                         "Reproduce the original code wherever it departs from the paper: turns every quirk of "
                         "--quirks on (see README: 'The original's quirks'). By default the paper's intent is "
                         "followed. A checkpoint's own model quirks win when a model is rebuilt from it.")
    flags.DEFINE_list("quirks", [],
                      "Quirks of the original code to reproduce, one by one (comma-separated): "
                      + ", ".join(QUIRK_NAMES) + ". See README: 'The original's quirks'.")
    flags.register_validator("quirks", _known_quirks,
                             message="unknown quirk name; the quirks are: " + ", ".join(QUIRK_NAMES))


@_once
def define_train_flags(stage: int):
    """Training (nnutils/train_utils.py and experiments/train_s{1,2}.py in the original)."""
    define_data_flags()
    define_model_flags()
    s1 = stage == 1
    flags.DEFINE_string("name", "exp_name", "Experiment name: outputs go to <checkpoint_dir>/<name> and <vis_dir>/<name>.")
    flags.DEFINE_integer("num_epochs", 500, "Epochs to train.", lower_bound=1)
    flags.DEFINE_integer("num_pretrain_epochs", 0, "First epoch index (the original's way to continue a run).")
    flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate (decays as lr / (1 + 5e-4 · iteration)).",
                       lower_bound=0.0)
    flags.DEFINE_float("beta1", 0.9, "Adam beta1 (SGD momentum with --use_sgd).")
    flags.DEFINE_boolean("use_sgd", False, "SGD instead of Adam.")
    flags.DEFINE_integer("optim_bs", 1, "Optimiser step every this many iterations (gradients accumulate).",
                         lower_bound=1)
    flags.DEFINE_integer("num_iter", 0, "Stop after this many iterations (0: no cap).", lower_bound=0)
    flags.DEFINE_integer("batch_size", 64, "Global batch size, split over the processes of a torchrun job.",
                         lower_bound=1)
    flags.DEFINE_string("checkpoint_dir", os.path.join(CACHE, "snapshots"), "Checkpoints root.")
    flags.DEFINE_string("vis_dir", os.path.join(CACHE, "visualization"), "Training visuals root.")
    flags.DEFINE_integer("print_freq", 20, "Log scalars every this many iterations.")
    flags.DEFINE_integer("save_latest_freq", 3000, "Save pred_net_latest.pth every this many iterations.")
    flags.DEFINE_integer("save_epoch_freq", 301, "Also save pred_net_<epoch>.pth every this many epochs.",
                         lower_bound=1)
    flags.DEFINE_integer("display_freq", 100, "Write PNG visuals every this many iterations (0: never).")
    flags.DEFINE_boolean("display_visuals", False,
                         "Also show visuals and losses live in visdom (optional: pip install visdom, then start a server "
                         "with python -m visdom.server, which needs internet the first time). TensorBoard needs "
                         "nothing more: tensorboard --logdir <checkpoint_dir>.")
    flags.DEFINE_string("visdom_server", "http://localhost", "visdom server address.")
    flags.DEFINE_integer("visdom_port", 8097, "visdom server port.")
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "Device: CUDA if available (auto), or forced (new flag).")
    flags.DEFINE_boolean("resume", False, "Continue the run <checkpoint_dir>/<name> from its latest checkpoint.")
    flags.DEFINE_boolean("overwrite", False,
                         "Start the run <checkpoint_dir>/<name> over, deleting the checkpoints and logs of the run "
                         "already there (without it, or --resume, a folder that holds a run is refused).")
    flags.DEFINE_integer("seed", 0, "Seed of torch, numpy and python random (the original used 0).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "float64"],
                      "Training precision. float64 (about 2x slower) for gradient checks and debugging: it takes "
                      "float32 rounding, which batch norm over a few samples amplifies, out of comparisons.")
    flags.DEFINE_float("logvar_init", None,
                       "Initial bias of the latent code's log-variance head (default: PyTorch's init, as the "
                       "original: the injected noise then starts with unit variance and hides the image's code "
                       "from the shape predictor until training shrinks it; e.g. -6 starts nearly noise-free).")
    if s1:
        flags.DEFINE_boolean("side_view_init", False,
                             "Start the stage-1 camera at the side view of the first stage-2 camera hypothesis for "
                             "every image (default: PyTorch's init, as the original, a random rotation), so the "
                             "template is learnt in the frame that stage 2's hypotheses assume.")
    flags.DEFINE_integer("val_freq", 1000,
                         "Validate every this many iterations and at the end of the run (0: never): mask IoU, "
                         "PCK@0.1 by flow and by camera on --val_split, and with the synthetic set's 3-D truth the "
                         "rotation error, Chamfer-L2 and F-score; logged to loss_log.jsonl, TensorBoard and "
                         "<checkpoint_dir>/<name>/curves.png.")
    flags.DEFINE_string("val_split", "val", "Held-out split for validation.")
    flags.DEFINE_integer("val_images", 100, "Validation images (the first ones of --val_split).")
    flags.DEFINE_integer("val_pairs", 100, "Keypoint-transfer pairs among the validation images.", lower_bound=1)
    flags.DEFINE_boolean("multi_gpu", False,
                         "Kept for the original's commands: several GPUs are now used by launching with torchrun, "
                         "e.g. torchrun --nproc_per_node 4 -m experiments.train_s1 ...; this flag alone changes nothing.")
    flags.DEFINE_integer("gpu_num", 1, "Kept for the original's commands; the process count comes from torchrun.")
    flags.DEFINE_enum("texture_loss", "perceptual", ["perceptual", "l1"],
                      "Texture distance: UMR's perceptual one (needs AlexNet's ImageNet weights) or l1 (new flag).")
    flags.DEFINE_integer("image_size", 256, "Render size; must equal --img_size.")
    flags.DEFINE_float("mask_loss_wt", 3.0 if s1 else 2.5, "Silhouette loss weight.", lower_bound=0.0)
    flags.DEFINE_float("grl_wt", 0.2, "Gradient reversal weight of the discriminator.", lower_bound=0.0)
    flags.DEFINE_float("gan_loss_wt", 1.0, "GAN loss weight.", lower_bound=0.0)
    flags.DEFINE_boolean("use_gan", True, "Use the adversarial loss.")
    flags.DEFINE_float("triangle_reg_wt", 0.15, "Laplacian smoothness weight.", lower_bound=0.0)
    flags.DEFINE_float("flatten_reg_wt", 0.0004 if s1 else 0.0005, "Flatten smoothness weight.", lower_bound=0.0)
    flags.DEFINE_float("deform_reg_wt", 5.0 if s1 else 1.0, "Deformation regulariser weight.", lower_bound=0.0)
    flags.DEFINE_float("tex_loss_wt", 3.0, "Texture (perceptual) loss weight.", lower_bound=0.0)
    flags.DEFINE_float("tex_dt_loss_wt", 3.0, "Texture distance-transform loss weight.", lower_bound=0.0)
    flags.DEFINE_float("tex_cycle_loss_wt", 0.5 if s1 else 1.0, "Texture cycle loss weight.", lower_bound=0.0)
    if s1:
        flags.DEFINE_float("ori_reg_wt", 0.4, "Orientation prior weight (first --stop_ori_epoch epochs).", lower_bound=0.0)
        flags.DEFINE_float("stop_ori_epoch", 3.0, "Epoch at which the orientation prior stops.")
        flags.DEFINE_integer("update_template_freq", 5, "Update the template every this many epochs.")
    else:
        flags.DEFINE_float("ent_loss_wt", 0.05, "Camera-probability entropy weight (minimised).", lower_bound=0.0)
        flags.DEFINE_float("prob_loss_wt", 5.0, "Part matching loss weight.", lower_bound=0.0)
        flags.DEFINE_float("vertex_loss_wt", 10.0, "Vertex correspondence loss weight.", lower_bound=0.0)
        flags.DEFINE_string("stemp_path", "unsup-mesh/cachedir/cub/scops/",
                            "Semantic template written by avg_uv (mean_v.pth, semantic_seg.png, vertices_idx/).")
        define_min_part_share()
        flags.DEFINE_string("init_from", "",
                            "Start the encoder and the texture-flow predictor from this checkpoint (e.g. the stage-1 "
                            "model's pred_net_latest.pth) instead of ImageNet weights or scratch; the camera "
                            "hypotheses and the shape predictor start as usual.")


@_once
def define_min_part_share():
    flags.DEFINE_float("min_part_share", 0.02,
                       "Smallest share of the template's vertices a part of the semantic template may have; a "
                       "template with a smaller (or empty) part is refused by avg_uv and train_s2.")


@_once
def define_test_flags():
    """Evaluation and demo (nnutils/test_utils.py in the original)."""
    define_data_flags()
    define_model_flags()
    flags.DEFINE_string("name", "exp_name", "Experiment name (outputs under <results_eval_dir>/<name>).")
    flags.DEFINE_integer("batch_size", 2, "Batch size.", lower_bound=1)
    flags.DEFINE_string("checkpoint_dir", os.path.join(CACHE, "snapshots"), "Checkpoints root.")
    flags.DEFINE_string("results_vis_dir", os.path.join(CACHE, "results_vis"), "Visual results root.")
    flags.DEFINE_string("results_eval_dir", os.path.join(CACHE, "evaluation"),
                        "Where --oracle evaluations write their JSON (under <results_eval_dir>/<name>).")
    flags.DEFINE_string("results_dir", "",
                        "Folder for the evaluation's JSON (default: the checkpoint's folder; needed when that is not "
                        "writable).")
    flags.DEFINE_string("model_path", os.path.join(CACHE, "snapshots", "cub_net", "pred_net_latest.pth"),
                        "Checkpoint to evaluate (ours or the original's released model).")
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "Device: CUDA if available (auto), or forced.")
    flags.DEFINE_integer("image_size", 256, "Render size; must equal --img_size.")
    flags.DEFINE_integer("max_eval_iter", 0, "Stop after this many batches (0: all).")
    flags.DEFINE_boolean("oracle", False,
                         "Synthetic data only: evaluate the true meshes and cameras instead of a model (checks the "
                         "evaluation code; new flag).")
    flags.DEFINE_string("gt_dir", "", "Synthetic data's 3-D truth (default: <cub_cache_dir>/../../gt).")
