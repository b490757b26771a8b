r"""Semantic template from a stage-1 model (docs/method.md §11).

    python -m experiments.avg_uv --model_path cachedir/snapshots/cub_s1/pred_net_latest.pth \
        --out_dir cachedir/snapshots/cub_s1/ --batch_size 16 \
        --cub_dir CUB_200_2011/ --cub_cache_dir cachedir/cub/ --scops_path <SCOPS maps>

Pass 1 picks an exemplar: the training image whose render best matches it (texture distance
plus a λ-weighted deformation term). Pass 2 averages, in UV space, the SCOPS part maps of the
images closest to the exemplar's (the 5 nearest of each batch). Writes to ``--out_dir``, which
is what ``train_s2 --stemp_path`` reads:

* ``semantic_prob.npy`` (128 x 256 x 5 float32), ``semantic_seg.png`` (its argmax, 0..4);
* ``vertices_idx/{head,neck,back,belly}_vertices.npy`` (template vertex indices per part);
* ``mean_v.pth`` (the stage-1 half template, 337 x 3);
* ``mean_template.obj``, ``vertex_label.obj`` (coloured meshes) and ``template.png`` (the template
  coloured by part, from the side, at 45 degrees, from the front and from above) to look at.

The part maps reach UV space through the predicted texture flow (the original), or with
``--uv_source render`` through the predicted mesh and camera: each texture sample of the
template is projected and reads the part map where its face (or its mirror twin) is visible;
this needs only the shape and camera, which stage 1 learns long before a sharp texture flow.
A template with an empty or implausibly small part (``--min_part_share``) is refused: its
pictures and ``semantic_prob.npy`` are written, ``vertices_idx/`` and ``mean_v.pth`` are not.

By default the model runs in eval mode, the exemplar is scored against the image as it is, and
λ = mean distance / mean deformation over the whole set. The quirk ``q8_flipped_exemplar``
(``--compat``) restores the original:
train-mode batch norm, a "flipped" camera compared with the mirrored image (which only
mirrors a mesh symmetric about x, not UMR's y: quirk Q8) and a λ per batch.
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from PIL import Image
from tqdm import tqdm

from umr.data.cub import DataError, make_loader
from experiments import flags as umr_flags
from experiments.common import (build_dataset, check_sizes, check_writable, load_trained_model, resolve_checkpoint,
                                user_errors_exit)
from umr import distributed as D
from umr.conventions import ALIGN_CORNERS
from umr.losses import check_part_vertices, make_texture_distance
from umr.mesh import uv_image_size
from umr.obj_io import save_obj
from umr.quirks import Quirks
from umr.evaluation import oracle_texture_flow
from umr.geometry import sample_textures
from umr.objectives import facing_cameras
from umr.renderer import face_pixel_centers, make_renderer
from umr.visuals import template_views

umr_flags.define_test_flags()
umr_flags.define_min_part_share()
flags.DEFINE_string("out_dir", "cachedir/snapshots/cub_net/", "Where to write the semantic template.")
flags.DEFINE_enum("texture_loss", "perceptual", ["perceptual", "l1"],
                  "Distance of the exemplar search: UMR's perceptual one (needs AlexNet's ImageNet weights) or l1.")
flags.DEFINE_enum("uv_source", "flow", ["flow", "render"],
                  "How a training image's part map reaches the template: through the predicted texture flow (flow, "
                  "the original), or through the predicted mesh and camera (render: each texture sample is "
                  "projected and reads the part map where its face, or its mirror twin, is visible). render needs "
                  "no trained texture flow, only the shape and camera, which stage 1 learns first.")
flags.DEFINE_bool("mirror_cameras", False, "Use, per image, the predicted camera or its mirror image (the bird facing "
                  "the other way), whichever silhouette fits the image's mask better: for a stage 1 trained with "
                  "train_s1 --mirror_cameras, whose camera alone does not say which way the bird faces.")
FLAGS = flags.FLAGS



def uv_part_maps(part_prob: torch.Tensor, uv_image: torch.Tensor) -> torch.Tensor:
    """Part maps (B, 5, S, S) pulled into UV space through the UV flow images (B, 2, H, W)."""
    return F.grid_sample(part_prob, uv_image.permute(0, 2, 3, 1), align_corners=ALIGN_CORNERS)


def sample_part_maps(part_prob: torch.Tensor, verts: torch.Tensor, cam: torch.Tensor, faces: torch.Tensor, mesh,
                     renderer, tex_size: int) -> tuple:
    """Part maps read at the template's texture samples through the predicted mesh and camera.

    Each sample of each half-template face (the UV sampler's points) is projected with the camera
    and reads the part map (B, 5, S, S) there when its face is visible in the render's z-buffer;
    a right face's mirror twin (same labels: the template is symmetric) adds its own reading. A
    visible surface point is bird, so a reading counts with the weight of the bird's probability
    there (1 − background) and carries only the four parts.
    Returns the summed readings (B, 5, F_half, T*T) (channel 0 zero) and their summed weights
    (B, 1, F_half, T*T).
    """
    flow = oracle_texture_flow(verts, faces, cam, tex_size)  # (B, F, T, T, 2): the samples' projections
    readings = sample_textures(flow, part_prob).flatten(2, 3)  # (B, F, T*T, 5)
    visible = face_pixel_centers(renderer(verts, faces, cam).face_index, len(faces))[1].to(readings.dtype)
    weight = visible[..., None] * (1 - readings[..., 0])  # (B, F, T*T)
    readings = torch.cat([torch.zeros_like(readings[..., :1]), readings[..., 1:]], -1) * visible[..., None, None]
    half, indept = mesh.num_half_faces, mesh.num_indept_faces
    total, weights = readings[:, :half].clone(), weight[:, :half].clone()
    total[:, indept:] += readings[:, half:]  # left row i mirrors right row indept + i
    weights[:, indept:] += weight[:, half:]
    return total.permute(0, 3, 1, 2), weights[:, None]


def samples_to_uv_image(values: torch.Tensor, sampler: torch.Tensor, size: tuple) -> torch.Tensor:
    """Per-sample values (C, F_half, T*T) as a UV image (C, H, W): each texel takes the value of
    the sample nearest to it in UV coordinates (the sampler (F_half, T*T, 2), grid x/y)."""
    from scipy.spatial import cKDTree

    height, width = size
    xs, ys = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))
    nearest = cKDTree(sampler.reshape(-1, 2).cpu().numpy()).query(np.stack([xs.ravel(), ys.ravel()], 1))[1]
    return values.flatten(1)[:, torch.from_numpy(nearest)].view(values.shape[0], height, width)


def flip_camera(cam: torch.Tensor) -> torch.Tensor:
    """The original's "flipped" camera [s, −tx, ty, qw, qx, −qy, −qz]: rotation F R F with
    F = diag(−1, 1, 1), i.e. the x-mirrored mesh seen mirrored in the image."""
    return cam * cam.new_tensor([1, -1, 1, 1, 1, -1, -1])


def exemplar_view(cam: torch.Tensor, target: torch.Tensor, flipped: bool) -> tuple:
    """The camera (B, 7) to render at and the masked photo (B, 3, S, S) to compare with in the
    exemplar search: as predicted and as photographed, or (``flipped``, quirk
    ``q8_flipped_exemplar``) the original's "flipped" camera against the mirrored photo, which
    mirrors the render only for a mesh symmetric about x (UMR's is symmetric about y)."""
    if flipped:
        return flip_camera(cam), target.flip(-1)
    return cam, target


def majority(labels: np.ndarray, num_labels: int) -> int:
    return int(np.bincount(labels, minlength=num_labels).argmax())  # ties → smaller label


def labels_from_uv(prob: torch.Tensor, model) -> tuple:
    """Per-face and per-vertex part labels of the template from the UV part distribution."""
    mesh = model.mesh
    sampler = model.texture_predictor.uv_sampler.cpu()  # (F_half, T*T, 2)
    per_sample = F.grid_sample(prob[None], sampler[None], align_corners=ALIGN_CORNERS)[0].argmax(0)  # (F_half, T*T)
    per_sample = mesh.symmetrize_faces(per_sample[None])[0].numpy()
    num_labels = prob.shape[0]
    face_labels = np.array([majority(row, num_labels) for row in per_sample])
    vertex_faces = [[] for _ in range(len(mesh.verts))]
    for f, face in enumerate(mesh.faces):
        for v in face:
            vertex_faces[v].append(face_labels[f])
    vertex_labels = np.array([majority(np.array(fl), num_labels) for fl in vertex_faces])
    return per_sample, face_labels, vertex_labels


@user_errors_exit
def main(_):
    checkpoint = resolve_checkpoint(FLAGS)
    if checkpoint.stage != 1:
        raise DataError(f"--model_path {FLAGS.model_path} is a stage-{checkpoint.stage} model; avg_uv needs the stage-1 model")
    check_sizes(FLAGS)
    check_writable(FLAGS.out_dir, "--out_dir", "semantic template")
    ctx = D.setup(FLAGS.device)
    torch.manual_seed(0)
    out_dir = Path(FLAGS.out_dir)
    original = Quirks.from_flags(FLAGS).q8_flipped_exemplar
    model = load_trained_model(FLAGS, ctx.device, checkpoint)
    model.train(original)  # the original left batch norm in train mode
    dataset = build_dataset(FLAGS, "train", use_scops=True, train=True)
    batch_size = FLAGS.batch_size
    distance = make_texture_distance(FLAGS.texture_loss).to(ctx.device)
    renderer = make_renderer(FLAGS.image_size, "shaded")  # white texture, default lighting
    template = model.get_mean_shape()
    faces = model.faces
    prob_size = uv_image_size(model.mesh.num_half_faces, FLAGS.tex_size)

    def batches(epoch, desc):
        dataset.set_epoch(epoch)
        loader = make_loader(dataset, batch_size, shuffle=False, drop_last=False, num_workers=FLAGS.n_data_workers)
        for i, batch in enumerate(tqdm(loader, desc=desc)):
            if FLAGS.max_eval_iter and i >= FLAGS.max_eval_iter:
                break
            yield {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    reader = make_renderer(FLAGS.image_size)  # z-buffer only

    def predict(img, mask):
        out = model(img)
        if FLAGS.mirror_cameras:
            out["cam"] = facing_cameras(reader, out["verts"], faces, out["cam"], mask, model.axis)[0]
        return out

    def part_readings(part_prob, out):
        """A batch's part maps in the template's UV space: summed readings (B, 5, H', W') and
        their weights (B, 1, H', W') (flow: every texel once; render: per texture sample)."""
        if FLAGS.uv_source == "flow":
            maps = uv_part_maps(part_prob, out["uvimage_pred"])
            return maps, torch.ones_like(maps[:, :1])
        return sample_part_maps(part_prob, out["verts"], out["cam"], faces, model.mesh, reader, FLAGS.tex_size)

    def mean_reading(total, weight):
        return total / weight.clamp_min(1e-12), (weight > 0).to(total.dtype)

    # Pass 1: the exemplar.
    scores, best, best_score = [], None, np.inf
    with torch.no_grad():
        for batch in batches(0, "avg_uv pass 1 (exemplar)"):
            out = predict(batch["img"], batch["mask"])
            img, mask = batch["img"], batch["mask"][:, None]
            cam, target = exemplar_view(out["cam"], img * mask, original)
            render = renderer(out["verts"], faces, cam).image
            dist = distance(render[:, :3] * render[:, 3:], target)
            reg = ((out["verts"] - template) ** 2).sum((1, 2))
            if original:  # λ of this batch, keep the running best
                score = dist + dist.mean() / reg.mean() * reg
                b = int(score.argmin())
                if score[b] < best_score:
                    best_score = float(score[b])
                    one = {k: v[b : b + 1] for k, v in out.items()}
                    best = mean_reading(*part_readings(batch["part_prob"][b : b + 1], one))
            for i in range(len(dist)):
                scores.append((float(dist[i]), float(reg[i]), int(batch["inds"][i])))
    if not scores:
        print("error: avg_uv found no training images", file=sys.stderr)
        sys.exit(2)
    if not original:  # one λ for the whole set, then the exemplar's UV part map
        dist, reg, inds = map(np.array, zip(*scores))
        lam = dist.mean() / max(reg.mean(), 1e-12)
        exemplar = int(inds[np.argmin(dist + lam * reg)])
        dataset.set_epoch(0)
        item = dataset[exemplar]
        with torch.no_grad():
            out = predict(torch.from_numpy(item["img"])[None].to(ctx.device),
                          torch.from_numpy(item["mask"])[None].to(ctx.device))
            best = mean_reading(*part_readings(torch.from_numpy(item["part_prob"])[None].to(ctx.device), out))
    best_map, best_seen = best

    # Pass 2: average the UV part maps closest to the exemplar's (where both are seen).
    total, weight = 0, 0
    with torch.no_grad():
        for batch in batches(1, "avg_uv pass 2 (average)"):
            out = predict(batch["img"], batch["mask"])
            readings, weights = part_readings(batch["part_prob"], out)
            maps, seen = mean_reading(readings, weights)
            both = seen * best_seen
            dist = (both * (maps - best_map) ** 2).sum((1, 2, 3)) / both.sum((1, 2, 3)).clamp_min(1)
            nearest = dist.argsort()[: min(5, len(maps))]
            total = total + readings[nearest].sum(0)
            weight = weight + weights[nearest].sum(0)
    # (5, H', W'); parts of the template no chosen image showed get the average distribution
    prob = torch.where(weight > 0, total / weight.clamp_min(1e-12), total.sum((1, 2), keepdim=True) / weight.sum()).cpu()
    if FLAGS.uv_source == "render":
        prob = samples_to_uv_image(prob, model.texture_predictor.uv_sampler, prob_size)

    # the file format's 128 x 256 UV image, whatever the size of the model's UV flow image
    prob = F.interpolate(prob[None], size=prob_size, mode="bilinear", align_corners=True)[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "semantic_prob.npy", prob.permute(1, 2, 0).numpy().astype(np.float32))
    Image.fromarray(prob.argmax(0).numpy().astype(np.uint8)).save(out_dir / "semantic_seg.png")
    per_sample, face_labels, vertex_labels = labels_from_uv(prob, model)
    verts = template.cpu()
    category = dataset.category
    tex = category.part_colour_array[per_sample].reshape(len(face_labels), FLAGS.tex_size, FLAGS.tex_size, 3)
    save_obj(out_dir / "mean_template.obj", verts, model.mesh.faces, face_textures=tex)
    save_obj(out_dir / "vertex_label.obj", verts, model.mesh.faces, vertex_colors=category.part_colour_array[vertex_labels])
    views = make_renderer(4 * FLAGS.img_size, "picture")
    Image.fromarray(template_views(verts, model.faces.cpu(), face_labels, views, category=category)).save(out_dir / "template.png")
    parts = {p: np.flatnonzero(vertex_labels == i) for i, p in enumerate(category.part_names, start=1)}
    # a template the semantic losses cannot use is refused before stage 2 could read it
    counts = check_part_vertices(parts, len(vertex_labels), FLAGS.min_part_share,
                                 f"of {out_dir} (its pictures and semantic_prob.npy are there to look at)")
    (out_dir / "vertices_idx").mkdir(exist_ok=True)
    for part, index in parts.items():
        np.save(out_dir / "vertices_idx" / f"{part}_vertices.npy", index.astype(np.int64))
    torch.save(model.mean_v.detach().cpu().float().clone(), out_dir / "mean_v.pth")
    print(f"avg_uv: semantic template written to {out_dir} (vertices per part: {counts}); "
          f"use it with train_s2 --stemp_path {out_dir}")


if __name__ == "__main__":
    app.run(main)
