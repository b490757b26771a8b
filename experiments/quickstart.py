"""The whole pipeline on built-in synthetic birds, small enough for a CPU (under 10 minutes on 2 cores):

    python -m experiments.quickstart [--out cachedir/quickstart]

1. generate a synthetic bird set (CUB + CMR-cache + SCOPS layout, with 3-D truth),
2. train_s1 (template from a sphere), 3. avg_uv (semantic template), 4. train_s2 (full model),
5. test_iou, test_kp (flow and cam), test_3d, 6. demo on a test photo,

each as the command a user would type (printed before it runs), then where every output went.
The encoder starts from scratch and the texture loss is L1, so no download is needed. Use
the flags below to scale it up (a GPU, ``--img_size 128``, more epochs) once it works.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

from data.cub import CUBDataset

flags.DEFINE_string("out", "cachedir/quickstart", "Everything goes under this directory.")
flags.DEFINE_integer("img_size", 64, "Image and render size (a multiple of 64).")
flags.DEFINE_integer("num_train", 320, "Synthetic training photos.")
flags.DEFINE_integer("num_test", 48, "Synthetic test photos.")
flags.DEFINE_integer("batch_size", 16, "Training batch size.")
flags.DEFINE_integer("s1_epochs", 6, "Stage-1 epochs (template updates every 2).")
flags.DEFINE_integer("s2_iters", 60, "Stage-2 iterations.")
flags.DEFINE_integer("number_pairs", 200, "Keypoint-transfer pairs.")
flags.DEFINE_string("device", "auto", "auto, cpu or cuda.")
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


def main(_):
    start = time.time()
    out = Path(FLAGS.out).resolve()
    data = out / "synth_birds"
    snapshots, visuals = out / "snapshots", out / "visualization"
    size = FLAGS.img_size
    data_flags = [f"--cub_dir={data / 'CUB_200_2011'}", f"--cub_cache_dir={data / 'cachedir' / 'cub'}",
                  f"--img_size={size}", f"--image_size={size}", f"--device={FLAGS.device}"]
    train_flags = [*data_flags, f"--checkpoint_dir={snapshots}", f"--vis_dir={visuals}",
                   f"--batch_size={FLAGS.batch_size}", "--nopretrained_encoder", "--texture_loss=l1",
                   "--save_latest_freq=0", "--display_freq=40", "--n_data_workers=2"]
    times = {}
    if (data / "README.txt").is_file():
        print(f"quickstart: reusing the synthetic set in {data}")
    else:
        times["data"] = run("synthetic birds", "data.synth_birds", f"--out={data}", f"--num_train={FLAGS.num_train}",
                            "--num_val=0", f"--num_test={FLAGS.num_test}", "--photo_size=200", "--preview")
    times["train_s1"] = run("stage 1", "experiments.train_s1", *train_flags, "--name=quickstart_s1",
                            f"--num_epochs={FLAGS.s1_epochs}", "--update_template_freq=2", "--stop_ori_epoch=2")
    s1 = snapshots / "quickstart_s1"
    stemp = s1 / "semantic_template"
    times["avg_uv"] = run("semantic template", "experiments.avg_uv", *data_flags, f"--scops_path={data / 'scops'}",
                          f"--model_path={s1 / 'pred_net_latest.pth'}", f"--out_dir={stemp}", "--batch_size=16",
                          "--texture_loss=l1", "--n_data_workers=2")
    times["train_s2"] = run("stage 2", "experiments.train_s2", *train_flags, f"--scops_path={data / 'scops'}",
                            f"--stemp_path={stemp}", "--name=quickstart_s2", "--num_epochs=1000",
                            f"--num_iter={FLAGS.s2_iters}")
    model = snapshots / "quickstart_s2" / "pred_net_latest.pth"
    eval_flags = [*data_flags, f"--model_path={model}", "--split=test", "--batch_size=8", "--n_data_workers=2"]
    times["test_iou"] = run("mask IoU", "experiments.test_iou", *eval_flags)
    for mode in ("flow", "cam"):
        times[f"test_kp_{mode}"] = run(f"keypoint transfer ({mode})", "experiments.test_kp", *eval_flags,
                                       f"--mode={mode}", f"--number_pairs={FLAGS.number_pairs}")
    times["test_3d"] = run("3-D evaluation", "experiments.test_3d", *eval_flags)
    # the demo expects the bird roughly centred and filling the photo, as a user's crop would
    test_set = CUBDataset(data / "CUB_200_2011", data / "cachedir" / "cub", split="test", img_size=4 * size)
    photo = out / "demo_input.png"
    Image.fromarray((test_set[0]["img"].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(photo)
    times["demo"] = run("demo", "experiments.demo", *data_flags, f"--model_path={model}", f"--img_path={photo}",
                        f"--out_path={out / 'demo'}")

    results = {name: json.loads((model.parent / f"{name}.json").read_text())
               for name in ("test_iou", "test_kp_flow", "test_kp_cam", "test_3d")}
    print(f"\n=== quickstart done in {(time.time() - start) / 60:.1f} minutes "
          f"({', '.join(f'{k} {v:.0f}s' for k, v in times.items())})")
    print(f"synthetic data:       {data} (preview: {data / 'preview.png'})")
    print(f"stage 1:              {s1} (training visuals: {visuals / 'quickstart_s1'})")
    print(f"semantic template:    {stemp}")
    print(f"stage 2:              {model.parent} (training visuals: {visuals / 'quickstart_s2'})")
    print(f"evaluation (JSON):    {model.parent}/test_*.json")
    print(f"  mask IoU {results['test_iou']['mask_iou']:.3f}; PCK.1 flow {results['test_kp_flow']['PCK.1']:.3f}, "
          f"cam {results['test_kp_cam']['PCK.1']:.3f}; rotation error {results['test_3d']['rotation_error_deg_median']:.1f}° "
          f"(median); Chamfer-L2 {results['test_3d']['chamfer_l2']:.4f}, F-score {results['test_3d']['fscore']:.3f}")
    print(f"demo:                 {out / 'demo'} (mesh.obj, render.png, overlay.png, turntable.gif, camera.json)")


if __name__ == "__main__":
    app.run(main)
