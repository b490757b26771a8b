"""The whole pipeline on built-in synthetic birds, sized for a CPU:

    python -m experiments.quickstart                   # ~7-10 minutes on 2 cores
    python -m experiments.quickstart --recipe long     # the long CPU recipe (about an hour; run it again to resume)

1. generate a synthetic bird set (CUB + CMR-cache + SCOPS layout, with 3-D truth),
2. train_s1 (template from a sphere), 3. avg_uv (semantic template), 4. train_s2 (full model),
5. test_iou, test_kp (flow and cam), test_3d, 6. demo on a test photo,

each as the command a user would type (printed before it runs), then where every output went
and the numbers. A step whose output is complete is skipped and an interrupted training run is
resumed, so running the same command again continues where it stopped.

The recipes differ from the original's CUB settings (which stay the scripts' defaults) where a
CPU budget needs it: 64-px images; the encoder from scratch and an L1 texture loss (no
ImageNet weights offline); stage 1's learning rate 1e-3 instead of 1e-4 (the original ran ~180k
iterations per stage, a CPU run a few hundred to a few thousand; stage 2, which starts from
stage 1, keeps 1e-4: at 1e-3 its meshes tear and its IoU falls below stage 1's); a 32 x 64 UV flow image from
a slimmer decoder (plenty for 64-px images, ~2.5x faster stage-1 steps); a 20x texture-cycle
weight, so the texture flow learns where faces are in minutes (the original relied on the
perceptual loss over days); the latent noise starting small (``--logvar_init``); the stage-1
camera starting at the side view of the first stage-2 hypothesis (``--side_view_init``) and,
in the quick recipe, trained through it or its mirror image, whichever fits
(``--mirror_cameras``: a regressed camera does not turn a bird round, and the birds facing
the other way otherwise average the template's head and tail into a lump),
with the orientation prior on for all of stage 1 (the original: 3 of ~100 epochs; with it on
for one epoch the quick template came out a wide, flat disc, and in the long recipe, after a
thousand iterations without it, stage 2 collapsed to front views); a tenth of
the stage-1 deformation prior's weight (0.5: at 5, once it switches on, it pulls every shape
back to the template, and validation IoU fell from 0.72 to 0.59); template updates every few
epochs of a few hundred images; the semantic template read through stage 1's meshes and
cameras (``avg_uv --uv_source render``), since its texture flow is still rough after minutes;
and stage 2 starting its encoder and texture-flow network from stage 1 (``--init_from``)
instead of from scratch.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from absl import app, flags
from PIL import Image

from umr.data.cub import CUBDataset

# name: (data, stage 1, stage 2, evaluation) sizes
RECIPES = {
    "quick": dict(num_train=640, num_val=50, num_test=100, s1_epochs=12, template_every=2, s1_batch=16,
                  s2_iters=400, s2_batch=8, number_pairs=200, mirror_cameras=True),
    # mirror cameras made the long stage 1 a blade (README: "Stage 1's lumps")
    "long": dict(num_train=3000, num_val=100, num_test=200, s1_epochs=4, template_every=2, s1_batch=16,
                 s2_iters=3000, s2_batch=8, number_pairs=1000, mirror_cameras=False),
}

flags.DEFINE_enum("recipe", "quick", list(RECIPES), "quick: ~7-10 minutes on a 2-core CPU; long: about an hour (3,000 photos, bird-shaped results), resumable.")
flags.DEFINE_string("out", None, "Everything goes under this directory (default cachedir/<recipe>).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data set.")
flags.DEFINE_integer("img_size", 64, "Image and render size (a multiple of 64).")
flags.DEFINE_integer("num_train", None, "Synthetic training photos (default: the recipe's).")
flags.DEFINE_integer("s1_epochs", None, "Stage-1 epochs (default: the recipe's).")
flags.DEFINE_integer("s2_iters", None, "Stage-2 iterations (default: the recipe's).")
flags.DEFINE_integer("number_pairs", None, "Keypoint-transfer pairs of the evaluation (default: the recipe's).")
flags.DEFINE_enum("vertex_loss", "umr", ["umr", "visible"], "Stage 2's vertex correspondence loss (train_s2 --vertex_loss).")
flags.DEFINE_enum("template_update", "mean", ["mean", "median"], "What stage 1's template absorbs at each update (train_s1 --template_update): the mean or the median predicted deformation.")
flags.DEFINE_bool("mirror_cameras", None, "Stage 1 trains through its camera or the camera's mirror image, whichever "
                  "silhouette fits (train_s1 and avg_uv --mirror_cameras); default: the recipe's (quick: on, long: off).")
flags.DEFINE_bool("amp", False, "Train with bfloat16 autocast for the networks (train_s1/s2 --amp).")
flags.DEFINE_string("device", "auto", "auto, cpu or cuda.")
flags.DEFINE_integer("n_data_workers", 1, "DataLoader workers of every step.")
FLAGS = flags.FLAGS


def run(step: str, module: str, *args) -> float:
    command = [sys.executable, "-m", module, *map(str, args)]
    print(f"\n=== {step}: python -m {module} {' '.join(map(str, args))}", flush=True)
    start = time.time()
    result = subprocess.run(command)
    if result.returncode != 0:
        print(f"quickstart: step '{step}' failed (exit status {result.returncode}); see its output above",
              file=sys.stderr)
        sys.exit(result.returncode)
    return time.time() - start


def training_state(run_dir: Path):
    """'done' if the run's checkpoint says it finished, 'partial' if it can be resumed, None."""
    path = run_dir / "pred_net_latest.pth"
    if not path.is_file():
        return None
    from umr.checkpoints import load_file

    return "done" if load_file(path, "the quick-start's checkpoint").get("finished") else "partial"


def draw_reconstructions(model_path: Path, dataset, size: int, path: Path, count: int = 8) -> None:
    """The first ``count`` test photos, one row each: input, render at the predicted camera,
    overlay, and the textured mesh turned by 90, 180 and 270 degrees."""
    from experiments.common import load_model
    from umr.renderer import make_renderer
    from umr.visuals import reconstruction_rows

    model = load_model(model_path, torch.device("cpu"))
    images = torch.stack([torch.from_numpy(dataset[i]["img"]) for i in range(min(count, len(dataset)))])
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    renderer = make_renderer(size, "picture")
    Image.fromarray(reconstruction_rows(model, images, renderer)).resize((6 * 128, len(images) * 128)).save(path)


def main(_):
    start = time.time()
    recipe = dict(RECIPES[FLAGS.recipe])
    for key in ("num_train", "s1_epochs", "s2_iters", "number_pairs", "mirror_cameras"):
        if getattr(FLAGS, key) is not None:
            recipe[key] = getattr(FLAGS, key)
    out = Path(FLAGS.out or f"cachedir/{FLAGS.recipe}").resolve()
    data = out / "synth_birds"
    snapshots, visuals = out / "snapshots", out / "visualization"
    size = FLAGS.img_size
    data_flags = ["--dataset=synth_birds", f"--cub_dir={data / 'CUB_200_2011'}", f"--cub_cache_dir={data / 'cachedir' / 'cub'}",
                  f"--img_size={size}", f"--image_size={size}", f"--device={FLAGS.device}",
                  f"--n_data_workers={FLAGS.n_data_workers}"]
    net_flags = ["--uv_height=32", "--uv_channels=64"]
    long = FLAGS.recipe == "long"
    train_flags = [*data_flags, *net_flags, f"--checkpoint_dir={snapshots}", f"--vis_dir={visuals}",
                   "--nopretrained_encoder", "--texture_loss=l1", "--tex_cycle_loss_wt=10",
                   "--logvar_init=-6", f"--save_latest_freq={250 if long else 0}",
                   f"--display_freq={500 if long else 50}", f"--val_freq={250 if long else 100}",
                   *(["--amp"] if FLAGS.amp else [])]
    times = {}
    if (data / "README.txt").is_file():
        print(f"quickstart: reusing the synthetic set in {data}")
    else:
        times["data"] = run("synthetic birds", "umr.data.synth_birds", f"--out={data}", f"--num_train={recipe['num_train']}",
                            f"--num_val={recipe['num_val']}", f"--num_test={recipe['num_test']}", "--photo_size=200",
                            f"--seed={FLAGS.seed}", "--preview")

    def train(step, module, name, *args):
        state = training_state(snapshots / name)
        if state == "done":
            print(f"\n=== {step}: {snapshots / name} is complete; skipped")
            return
        # nothing to resume (e.g. killed before its first checkpoint): start the run over
        times[name] = run(step, module, *train_flags, f"--name={name}", *args,
                          "--resume" if state == "partial" else "--overwrite")

    s1_name, s2_name = f"{FLAGS.recipe}_s1", f"{FLAGS.recipe}_s2"
    mirror_flag = f"--{'' if recipe['mirror_cameras'] else 'no'}mirror_cameras"
    train("stage 1", "experiments.train_s1", s1_name, f"--batch_size={recipe['s1_batch']}",
          f"--num_epochs={recipe['s1_epochs']}", f"--update_template_freq={recipe['template_every']}",
          f"--stop_ori_epoch={recipe['s1_epochs']}", "--side_view_init", "--deform_reg_wt=0.5", "--learning_rate=1e-3",
          f"--template_update={FLAGS.template_update}", mirror_flag)
    s1 = snapshots / s1_name
    stemp = s1 / "semantic_template"
    if (stemp / "mean_v.pth").is_file() and (stemp / "vertices_idx" / "back_vertices.npy").is_file():
        print(f"\n=== semantic template: {stemp} exists; skipped")
    else:
        times["avg_uv"] = run("semantic template", "experiments.avg_uv", *data_flags, *net_flags,
                              f"--scops_path={data / 'scops'}", f"--model_path={s1 / 'pred_net_latest.pth'}",
                              f"--out_dir={stemp}", "--batch_size=16", "--texture_loss=l1", "--uv_source=render",
                              mirror_flag)
    train("stage 2", "experiments.train_s2", s2_name, f"--scops_path={data / 'scops'}", f"--stemp_path={stemp}",
          f"--batch_size={recipe['s2_batch']}", "--num_epochs=100000", f"--num_iter={recipe['s2_iters']}",
          f"--init_from={s1 / 'pred_net_latest.pth'}", "--learning_rate=1e-4", f"--vertex_loss={FLAGS.vertex_loss}")
    model = snapshots / s2_name / "pred_net_latest.pth"
    eval_flags = [*data_flags, f"--model_path={model}", "--split=test", "--batch_size=16"]
    times["test_iou"] = run("mask IoU", "experiments.test_iou", *eval_flags)
    for mode in ("flow", "cam"):
        times[f"test_kp_{mode}"] = run(f"keypoint transfer ({mode})", "experiments.test_kp", *eval_flags,
                                       f"--mode={mode}", f"--number_pairs={recipe['number_pairs']}")
    times["test_3d"] = run("3-D evaluation", "experiments.test_3d", *eval_flags)
    # the demo expects the bird roughly centred and filling the photo, as a user's crop would
    test_set = CUBDataset(data / "CUB_200_2011", data / "cachedir" / "cub", split="test", img_size=4 * size)
    photo = out / "demo_input.png"
    Image.fromarray((test_set[0]["img"].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(photo)
    times["demo"] = run("demo", "experiments.demo", *data_flags, f"--model_path={model}", f"--img_path={photo}",
                        f"--out_path={out / 'demo'}")

    results = {name: json.loads((model.parent / f"{name}.json").read_text())
               for name in ("test_iou", "test_kp_flow", "test_kp_cam", "test_3d")}
    pictures = out / "reconstructions.png"
    draw_reconstructions(model, test_set, size, pictures)
    print(f"\n=== quickstart ({FLAGS.recipe}) done in {(time.time() - start) / 60:.1f} minutes "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})")
    print(f"synthetic data:       {data} (preview: {data / 'preview.png'})")
    print(f"stage 1:              {s1} (curves.png; training visuals: {visuals / s1_name})")
    print(f"semantic template:    {stemp}")
    print(f"stage 2:              {model.parent} (curves.png; training visuals: {visuals / s2_name})")
    print(f"evaluation (JSON):    {model.parent}/test_*.json")
    print(f"  mask IoU {results['test_iou']['mask_iou']:.3f}; PCK.1 flow {results['test_kp_flow']['PCK.1']:.3f}, "
          f"cam {results['test_kp_cam']['PCK.1']:.3f}; rotation error {results['test_3d']['rotation_error_deg_median']:.1f}° "
          f"(median); Chamfer-L2 {results['test_3d']['chamfer_l2']:.4f}, F-score {results['test_3d']['fscore']:.3f}")
    print(f"demo:                 {out / 'demo'} (mesh.obj, render.png, overlay.png, turntable.gif, camera.json)")
    print(f"pictures:             {pictures} (test photos: input, render, overlay, turned by 90/180/270 degrees); "
          f"{stemp / 'template.png'} (the template's parts)")
    print(f"live view:            tensorboard --logdir {snapshots}")


if __name__ == "__main__":
    app.run(main)
