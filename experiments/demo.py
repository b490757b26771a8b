r"""Reconstruct one photo: mesh, texture and camera (docs/method.md §14.3).

    python -m experiments.demo --model_path cachedir/snapshots/cub_s2/pred_net_latest.pth \
        --img_path bird.jpg --out_path cachedir/demo/

The photo (any size; grayscale and RGBA are made RGB) is resized so its longer side is
``--img_size`` and the centred ``img_size`` x ``img_size`` square is cropped (white outside;
the original cropped 257 x 257, half a pixel off). Writes to ``--out_path``:

* ``mesh.obj`` + ``mesh.mtl`` + ``mesh.png`` — the textured mesh (per-face texture atlas);
* ``render.png`` — the textured mesh at the predicted camera (white background, shaded);
* ``overlay.png`` — that render over the input crop;
* ``turntable.gif`` — 360° about the vertical axis of the image;
* ``camera.json`` — the predicted camera ``[s, tx, ty, qw, qx, qy, qz]`` (and all hypotheses);
* ``pred_tex.png`` — the original demo's 2 x 3 grid: input, plain render, textured render, and
  the textured mesh turned by 60°, 120°, 180°.
"""
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from absl import app, flags
from PIL import Image

from umr.data.cub import image_has_alpha, read_image
from experiments import flags as F
from experiments.common import check_sizes, check_writable, load_trained_model, resolve_checkpoint, user_errors_exit
from umr import distributed as D
from umr.geometry import rotate_cam, sample_textures
from umr.obj_io import save_obj
from umr.renderer import make_renderer
from umr.visuals import to_uint8

F.define_test_flags()
flags.DEFINE_string("img_path", "demo_imgs/bird.png", "Input photo.")
flags.DEFINE_string("out_path", "cachedir/demo/", "Output directory.")
flags.DEFINE_integer("turntable_frames", 36, "Frames of the 360° GIF.")
FLAGS = F.FLAGS


def load_photo(path: Path, size: int) -> np.ndarray:
    """(size, size, 3) float32 crop: longer side resized to ``size``, centred, white padding.
    Any photo :func:`umr.data.cub.read_image` reads (16-bit too; transparent pixels over white)."""
    photo = read_image(path, "check --img_path")
    if path.is_file():
        with Image.open(path) as im:
            if image_has_alpha(im):
                print(f"demo: {path} has transparent pixels; they are composited over white")
    h, w = photo.shape[:2]
    scale = size / max(h, w)
    photo = cv2.resize(photo, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_LINEAR)
    h, w = photo.shape[:2]
    out = np.ones((size, size, 3), dtype=np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = photo
    return out


@user_errors_exit
def main(_):
    checkpoint = resolve_checkpoint(FLAGS)
    check_sizes(FLAGS)
    check_writable(FLAGS.out_path, "--out_path")
    ctx = D.setup(FLAGS.device)
    size = FLAGS.img_size
    crop = load_photo(Path(FLAGS.img_path), size)
    model = load_trained_model(FLAGS, ctx.device, checkpoint)
    img = torch.from_numpy(crop).permute(2, 0, 1)[None].to(ctx.device)
    with torch.no_grad():
        out = model(img)
        verts, cam, faces = out["verts"], out["cam"], model.faces
        textures = sample_textures(out["tex_flow"], img)  # (1, F, T, T, 3)
        # shading of the original's visualisation: ambient 0.8 + 0.4 from (0, 1, -1), white background
        renderer = make_renderer(size, "picture", light_intensity_directional=0.4, light_direction=(0.0, 1.0, -1.0))
        render = renderer(verts, faces, cam, textures).image[0]
        blue = torch.tensor([156, 199, 234], device=ctx.device, dtype=torch.float32) / 255
        plain = renderer(verts, faces, cam, blue.expand(1, faces.shape[0], 1, 3)).image[0]
        turntable = [renderer(verts, faces, rotate_cam(cam, torch.tensor([angle], device=ctx.device)), textures).image[0]
                     for angle in np.linspace(0, 360, FLAGS.turntable_frames, endpoint=False)]
    out_dir = Path(FLAGS.out_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_obj(out_dir / "mesh.obj", verts[0], faces, textures[0])
    Image.fromarray(to_uint8(render[:3])).save(out_dir / "render.png")
    alpha = render[3:].clamp(0, 1)
    overlay = render[:3] * alpha + img[0] * (1 - alpha)
    Image.fromarray(to_uint8(overlay)).save(out_dir / "overlay.png")
    frames = [Image.fromarray(to_uint8(frame[:3])) for frame in turntable]
    frames[0].save(out_dir / "turntable.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    camera = {"cam": cam[0].tolist(), "format": "[s, tx, ty, qw, qx, qy, qz]"}
    if "cam_hypotheses" in out:
        camera.update(hypotheses=out["cam_hypotheses"][0].tolist(), probabilities=out["cam_probs"][0].tolist())
    (out_dir / "camera.json").write_text(json.dumps(camera, indent=2) + "\n")
    step = len(turntable) // 6
    grid = [[to_uint8(img[0]), to_uint8(plain[:3]), to_uint8(render[:3])],
            [to_uint8(turntable[k * step][:3]) for k in (1, 2, 3)]]
    Image.fromarray(np.concatenate([np.concatenate(row, 1) for row in grid], 0)).save(out_dir / "pred_tex.png")
    print(f"demo: wrote mesh.obj/.mtl/.png, render.png, overlay.png, turntable.gif, camera.json, pred_tex.png "
          f"to {out_dir}")


if __name__ == "__main__":
    app.run(main)
