"""The per-iteration training objectives of both stages (docs/method.md §10.2, docs/method.md §12.2).

Every objective is called as ``objective(out, batch, epoch) -> (total, terms)`` (``out`` the
model's outputs, ``terms`` the named, weighted loss terms). It owns its renderer and its
discriminator (both built from the configuration unless passed in), lists what the optimiser
trains besides the model (``trainable_parameters()``: the discriminator) and keeps its state in
``state_dict()`` (the discriminator, and stage 2's previous real batch), which the trainer saves
in every checkpoint.

Gradient routing (docs/method.md §8): the texture branch sees the geometry as
detached; by default the predicted silhouette that masks the rendered texture is detached too,
so texture losses never move shape or camera (the original let them through it: quirk
``q4_texture_moves_geometry`` restores that).

The original rendered each mesh twice with the same geometry and cameras: once for the
silhouette (gradients to shape and camera) and once, detached, for the texture. Here one
render does both: its alpha keeps the geometry gradient, its RGB passes gradients to the
textures only (``rgb_geometry_grad=False``); values and gradients are those of the two renders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from umr import losses as L
from umr.category import BIRDS, CategorySpec
from umr.config import for_stage, from_values, option
from umr.geometry import mirror_cam, rotate_cam, sample_textures
from umr.mesh import FlattenLoss, LaplacianLoss
from umr.nets import Discriminator, MeshNet
from umr.quirks import Quirks
from umr.renderer import RENDERER_BACKENDS, Renderer, make_renderer, point_visibility

__all__ = ["ObjectiveConfig", "Stage1Objective", "Stage2Objective", "TemplateUpdate", "hypothesis_choice_scores",
           "facing_cameras"]


@dataclass
class ObjectiveConfig:
    """Loss weights and switches of both stages; field names are the original's flags. The
    flags of ``train_s1`` / ``train_s2`` are generated from these fields (umr.config)."""

    image_size: int = option(256, "Render size; must equal --img_size.")
    mask_loss_wt: float = option(2.5, "Silhouette loss weight.", stage1=3.0, lower_bound=0.0)
    triangle_reg_wt: float = option(0.15, "Laplacian smoothness weight.", lower_bound=0.0)
    flatten_reg_wt: float = option(0.0005, "Flatten smoothness weight.", stage1=0.0004, lower_bound=0.0)
    deform_reg_wt: float = option(1.0, "Deformation regulariser weight.", stage1=5.0, lower_bound=0.0)
    tex_loss_wt: float = option(3.0, "Texture loss weight.", lower_bound=0.0)
    tex_dt_loss_wt: float = option(3.0, "Texture distance-transform loss weight.", lower_bound=0.0)
    tex_cycle_loss_wt: float = option(1.0, "Texture cycle loss weight.", stage1=0.5, lower_bound=0.0)
    gan_loss_wt: float = option(1.0, "GAN loss weight.", lower_bound=0.0)
    grl_wt: float = option(0.2, "Gradient reversal weight of the discriminator.", lower_bound=0.0)
    use_gan: bool = option(True, "Use the adversarial loss.")
    texture_loss: str = option("perceptual",
                               "Texture distance: UMR's perceptual one (needs AlexNet's ImageNet weights) or l1.",
                               choices=("perceptual", "l1"))
    # stage 1
    ori_reg_wt: float = option(0.4, "Orientation prior weight (first --stop_ori_epoch epochs).", stages=(1,),
                               lower_bound=0.0)
    stop_ori_epoch: float = option(3.0, "Epoch at which the orientation prior stops.", stages=(1,))
    update_template_freq: int = option(5, "Update the template every this many epochs; the deformation prior "
                                       "applies from the epoch after the first update.", stages=(1,), lower_bound=1)
    template_update: str = option("mean", "What the template absorbs at each update: the mean of the predicted "
                                  "deformations over the epoch's photos (the original), or their per-coordinate median, "
                                  "which the minority of photos that stage 1's single camera explains from a wrong view "
                                  "(and so with a distorted shape) cannot drag.", stages=(1,), choices=("mean", "median"))
    mirror_cameras: bool = option(False, "Render each photo also with its camera's mirror image (the same view of "
                                  "the bird facing the other way) and train through whichever silhouette fits the "
                                  "photo better. A single camera regressed from silhouettes rarely turns a bird "
                                  "round, so without it stage 1 explains the birds that face the other way with a "
                                  "shape whose head and tail average into a lump.", stages=(1,))
    # stage 2
    ent_loss_wt: float = option(0.05, "Camera-probability entropy weight (minimised).", stages=(2,), lower_bound=0.0)
    prob_loss_wt: float = option(5.0, "Part matching loss weight.", stages=(2,), lower_bound=0.0)
    vertex_loss_wt: float = option(10.0, "Vertex correspondence loss weight.", stages=(2,), lower_bound=0.0)
    vertex_loss: str = option("umr", "Which template vertices the vertex correspondence loss pulls to their part's "
                              "points. umr: every vertex of the parts the category weighs (birds: head and belly), "
                              "as the original; blind to a camera's mirror image through the image plane (seen from "
                              "above or from below). visible: only the vertices each hypothesis' render shows, every "
                              "part weighted equally (mean per part), which tells those poses apart.",
                              stages=(2,), choices=("umr", "visible"))
    hypothesis_choice: str = option("weighted", "How the camera probabilities learn. weighted: they weigh every "
                                    "hypothesis' silhouette and vertex losses and learn from those losses' gradients "
                                    "(the original). best: each photo's hypothesis with the lowest silhouette plus "
                                    "visible-vertex loss (--vertex_loss visible's terms, which tell front from back "
                                    "views) is the target of a cross-entropy on them (weight --choice_loss_wt); the "
                                    "silhouette and vertex losses still move each hypothesis in proportion to its "
                                    "probability, without training it. winner: as best, but the silhouette and vertex "
                                    "losses train only each photo's chosen hypothesis, so that hypotheses specialise "
                                    "in the photos they win.", stages=(2,), choices=("weighted", "best", "winner"))
    choice_loss_wt: float = option(1.0, "Weight of the probabilities' cross-entropy under --hypothesis_choice best "
                                   "or winner.", stages=(2,), lower_bound=0.0)
    part_choice_wt: float = option(0.0, "Weight of every hypothesis' part matching loss (each part weighted "
                                   "equally, camera and shape fixed) in what trains the camera probabilities: "
                                   "weighted by them under --hypothesis_choice weighted, added to the scores under "
                                   "best and winner. Silhouettes and projected part vertices look alike from the "
                                   "front and from behind; the rendered parts (belly or back in view) do not. 0: the "
                                   "original, whose part loss sees only the sampled camera.", stages=(2,),
                                   lower_bound=0.0)
    renderer: str = option("kernel", "Rasterizer behind the training renders: the C++/CUDA kernels, or the dense "
                           "PyTorch reference (same numbers, far slower; for checking the kernels).",
                           choices=tuple(RENDERER_BACKENDS))
    quirks: Quirks = option(help="The original's departures from the paper to reproduce (--compat, --quirks).",
                            flag=False, default_factory=Quirks)

    @classmethod
    def for_stage(cls, stage: int, **overrides) -> "ObjectiveConfig":
        """The original's defaults of ``train_s1`` / ``train_s2``, then ``overrides``."""
        return for_stage(cls, stage, **overrides)

    @classmethod
    def from_flags(cls, flags, stage: int) -> "ObjectiveConfig":
        return from_values(cls, flags, stage, quirks=Quirks.from_flags(flags))


def hypothesis_choice_scores(config: ObjectiveConfig, neg_ious: torch.Tensor, template: torch.Tensor,
                             part_vertices: dict, hypotheses: torch.Tensor, part_points: dict,
                             visible: torch.Tensor) -> torch.Tensor:
    """Each hypothesis' camera loss on its photo, as ``--hypothesis_choice best`` ranks them:
    ``mask_loss_wt · negIoU + vertex_loss_wt · ℓ_visible`` (B, K), the vertex loss over the
    vertices each hypothesis' render shows, every part weighted equally.

    Args:
        neg_ious: (B, K) silhouette negIoU of every hypothesis' render.
        template, part_vertices, hypotheses, part_points, visible: as
            :func:`umr.losses.vertex_correspondence_terms`.
    """
    every_part = {p: 1.0 for p in part_vertices}
    seen = L.vertex_correspondence_terms(template, part_vertices, hypotheses, part_points, every_part, visible)
    return config.mask_loss_wt * neg_ious + config.vertex_loss_wt * seen


def facing_cameras(renderer: Renderer, verts: torch.Tensor, faces: torch.Tensor, cam: torch.Tensor,
                   mask: torch.Tensor, axis: int = 1):
    """Per photo, its camera or the camera's mirror image (:func:`umr.geometry.mirror_cam`),
    whichever silhouette of ``verts`` fits ``mask`` better (lower negIoU).

    Args:
        verts: (B, V, 3) meshes symmetric under ``X_axis → −X_axis``; faces (F, 3).
        cam: (B, 7); mask (B, H, W).
    Returns:
        The chosen cameras (B, 7), differentiable in ``cam`` (the choice is not), and which
        photos took the mirror image (B,) bool.
    """
    flipped = mirror_cam(cam, axis)
    with torch.no_grad():
        alphas = renderer(torch.cat([verts, verts]).detach(), faces, torch.cat([cam, flipped]).detach()).image[:, 3]
        losses = L.neg_iou(alphas, torch.cat([mask, mask]).to(alphas)).view(2, len(cam))
        mirrored = losses[1] < losses[0]
    return torch.where(mirrored[:, None], flipped, cam), mirrored


def _gan_angles(batch: dict, verts: torch.Tensor) -> torch.Tensor:
    """Novel-view angles for the GAN: integer degrees in [0, 180), per sample from the batch
    (``gan_angle``, see :class:`umr.trainer.SampleNoise`) or drawn here."""
    if "gan_angle" in batch:
        return batch["gan_angle"].to(verts)
    return torch.randint(0, 180, (len(verts),), device=verts.device).to(verts.dtype)


class _Objective(nn.Module):
    gan_channels = 1  # what the discriminator sees: silhouettes (1) or RGB images (3)

    def __init__(self, model: MeshNet, config: ObjectiveConfig, discriminator: Optional[Discriminator],
                 renderer: Optional[Renderer]):
        super().__init__()
        if config.use_gan and discriminator is None:  # built first: its initialisation draws from torch's RNG
            discriminator = Discriminator(config.grl_wt, self.gan_channels, config.image_size)
        self.config = config
        self.axis = model.axis  # the template's symmetry axis (orientation prior)
        faces = model.mesh.faces
        self.register_buffer("faces", torch.from_numpy(faces), persistent=False)
        self.laplacian = LaplacianLoss(faces, len(model.mesh.verts))
        self.flatten = FlattenLoss(faces)
        # One renderer serves every render of an iteration (texture, novel-view and part renders):
        # textures as given, black background; what it must provide is umr.renderer.Renderer.
        self.renderer = renderer if renderer is not None else make_renderer(config.image_size, backend=config.renderer)
        if self.renderer.image_size != config.image_size:
            raise ValueError(f"the renderer draws {self.renderer.image_size} px but --image_size is {config.image_size}")
        self.texture_distance = L.make_texture_distance(config.texture_loss)
        self.discriminator = discriminator if config.use_gan else None

    # Fixed modules rebuilt at construction (the perceptual network's weights come from their
    # ImageNet file): not part of the objective's state_dict.
    _NOT_SAVED = ("texture_distance.",)

    def trainable_parameters(self) -> list:
        """What the optimiser trains besides the model: the discriminator's parameters."""
        return [p for p in self.discriminator.parameters() if p.requires_grad] if self.discriminator is not None else []

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith(self._NOT_SAVED)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(self._NOT_SAVED)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"{type(self).__name__} state: missing {missing}, unexpected {result.unexpected_keys}")
        return result

    def _check_sizes(self, batch):
        size = batch["img"].shape[-1]
        if size != self.config.image_size:
            raise ValueError(f"images are {size} px but the renderer's image_size is {self.config.image_size}; use equal --img_size and --image_size")

    def _masked_alpha(self, alpha):
        return alpha if self.config.quirks.q4_texture_moves_geometry else alpha.detach()

    def _regularisers(self, out) -> dict:
        c = self.config
        return {
            "triangle": c.triangle_reg_wt * self.laplacian(out["verts"]).mean(),
            "flatten": c.flatten_reg_wt * self.flatten(out["verts"]).mean(),
        }


class Stage1Objective(_Objective):
    """docs/method.md §10.2: silhouette, smoothness, orientation, deformation, texture (perceptual, DT, cycle)
    and silhouette GAN losses of the single-camera stage."""

    def __init__(self, model: MeshNet, config: ObjectiveConfig, discriminator: Optional[Discriminator] = None,
                 renderer: Optional[Renderer] = None):
        super().__init__(model, config, discriminator, renderer)

    def forward(self, out: dict, batch: dict, epoch: int):
        self._check_sizes(batch)
        c = self.config
        verts, cam, faces = out["verts"], out["cam"], self.faces
        img, mask = batch["img"], batch["mask"]
        if c.mirror_cameras:
            cam = facing_cameras(self.renderer, verts, faces, cam, mask, self.axis)[0]
        terms = {}
        textures = sample_textures(out["tex_flow"], img)
        render = self.renderer(verts, faces, cam, textures, return_p2f=c.quirks.q2_softras_p2f,
                                   rgb_geometry_grad=False)
        alpha = render.image[:, 3]
        terms["mask"] = c.mask_loss_wt * L.mask_loss(alpha, mask)
        terms.update(self._regularisers(out))
        if epoch > c.update_template_freq:  # the original gates the deformation prior this way
            terms["deform"] = c.deform_reg_wt * L.deform_loss(out["delta_v"])
        if epoch < c.stop_ori_epoch:
            terms["orientation"] = c.ori_reg_wt * L.orientation_loss(verts, self.axis)
        masked_render = render.image[:, :3] * self._masked_alpha(alpha)[:, None]
        terms["texture"] = c.tex_loss_wt * self.texture_distance(masked_render, img * mask[:, None]).mean()
        terms["texture_dt"] = c.tex_dt_loss_wt * L.texture_dt_loss(out["tex_flow"], batch["mask_dt"])
        target, visible = L.cycle_target(render.face_index, faces.shape[0], render.p2f, 1, c.quirks)
        terms["texture_cycle"] = c.tex_cycle_loss_wt * L.texture_cycle_loss(out["tex_flow"], target.to(verts), visible)
        if self.discriminator is not None:
            fake = self.renderer(verts, faces, rotate_cam(cam.detach(), _gan_angles(batch, verts))).image[:, 3:]
            terms["gan"] = c.gan_loss_wt * L.gan_loss(self.discriminator, alpha.detach()[:, None], fake)
        return sum(terms.values()), terms


class TemplateUpdate:
    """Stage 1's template update (docs/method.md §10.3), an end-of-epoch hook of the trainer:
    after every ``freq``-th epoch, run the model (train mode, no gradients) over that epoch's
    training batches and move the mean predicted deformation (over all samples of all
    processes) into the template ``mean_v``; ``statistic="median"``: the per-coordinate median
    of the predicted deformations instead (robust to the photos explained with a wrong view).

    By default the shape predictor's output bias gives the same amount back, so every predicted
    shape stays where it was and only the split between template and deformation changes (the
    deformation prior then sees the per-image deformations alone). ``jump`` (quirk
    ``template_jump``): the original, which added the deformation of the mean latent code (the
    mean deformation only while the stage-1 shape MLP was affine, quirk Q5) and left the
    predictor as it was, so every predicted shape jumped by that amount until the network
    re-adapted.

    Called as ``hook(trainer, epoch)`` with a trainer that has ``model``, ``ctx`` and
    ``loader(epoch)`` (:class:`umr.trainer.Trainer`).
    """

    def __init__(self, freq: int, jump: bool = False, statistic: str = "mean"):
        if statistic not in ("mean", "median"):
            raise ValueError(f"template update statistic must be 'mean' or 'median', got {statistic!r}")
        if jump and statistic != "mean":
            raise ValueError("--template_update median moves the deformations' median into the template; the "
                             "template_jump quirk adds the mean latent code's deformation instead: choose one")
        self.freq, self.jump, self.statistic = freq, jump, statistic

    def __call__(self, trainer, epoch: int) -> None:
        from tqdm import tqdm

        from umr import distributed as D
        from umr.trainer import to_device

        if self.freq <= 0 or (epoch + 1) % self.freq:
            return
        model, jump = trainer.model, self.jump
        model.train()
        device = trainer.ctx.device
        total = torch.zeros_like(model.mean_v if not jump else model.encoder.mean_fc[-1].bias, dtype=torch.float64)
        count = torch.zeros(1, device=device, dtype=torch.float64)
        deltas = []  # every photo's deformation, for the median
        with torch.no_grad():
            for batch in tqdm(trainer.loader(epoch), desc=f"template update (epoch {epoch})", leave=False,
                              disable=not trainer.ctx.is_main):
                batch = to_device(batch, device, model.mean_v.dtype)
                out = model(batch["img"], batch["eps_z"], batch["u_cam"])
                if self.statistic == "median":
                    deltas.append(out["delta_v"])
                else:
                    total += (out["noise"] if jump else out["delta_v"]).double().sum(0)
                    count += len(out["noise"])
            if self.statistic == "median":
                shift = D.all_gather_rows(torch.cat(deltas)).median(0).values
            else:  # the mean deformation (or, jump, the mean latent code)
                shift = (D.all_reduce_sum(total) / D.all_reduce_sum(count)).to(model.mean_v.dtype)
            if jump:
                model.mean_v += model.predict_offsets(shift[None])[0]
            else:
                model.mean_v += shift
                model.shape_predictor.shift_output(-shift)


class Stage2Objective(_Objective):
    """docs/method.md §12.2: multi-hypothesis silhouette, camera entropy, smoothness, deformation, texture
    (per hypothesis), RGB GAN, part matching and vertex correspondence losses."""

    gan_channels = 3

    def __init__(
        self,
        model: MeshNet,
        config: ObjectiveConfig,
        face_labels: torch.Tensor,
        part_vertices: dict,
        discriminator: Optional[Discriminator] = None,
        category: CategorySpec = BIRDS,
        renderer: Optional[Renderer] = None,
    ):
        super().__init__(model, config, discriminator, renderer)
        self.part_loss = L.PartMatchingLoss(face_labels, self.renderer, category)
        self.part_vertices = part_vertices
        self.vertex_loss_weights = category.vertex_loss_weights
        # the template T̄ (V, 3), fixed in stage 2, which the vertex correspondence loss projects
        self.register_buffer("template", model.get_mean_shape().detach().clone(), persistent=False)
        # The GAN's real images are the previous batch's (the original's choice; the first
        # iteration uses its own batch). In state_dict (extra state) for exact resumes.
        self.previous_real: Optional[torch.Tensor] = None

    def hypothesis_part_losses(self, verts: torch.Tensor, hyps: torch.Tensor, part_maps: torch.Tensor) -> torch.Tensor:
        """(B, K) part matching loss of the shapes ``verts`` (B, V, 3) seen from every hypothesis
        ``hyps`` (B, K, 7), every part weighted equally (``--part_choice_wt``)."""
        B, K = hyps.shape[:2]
        weights = torch.ones(part_maps.shape[1])
        weights[0] = 0  # background, as the category's weights
        rows = self.part_loss.per_image(verts.repeat_interleave(K, 0), self.faces, hyps.reshape(B * K, 7),
                                        part_maps.repeat_interleave(K, 0), weights)
        return rows.view(B, K)

    def get_extra_state(self):
        return {"previous_real": None if self.previous_real is None else self.previous_real.cpu()}

    def set_extra_state(self, state):
        previous = (state or {}).get("previous_real")
        self.previous_real = None if previous is None else previous.to(self.template)

    def forward(self, out: dict, batch: dict, epoch: int):
        self._check_sizes(batch)
        template = self.template
        c = self.config
        verts, faces = out["verts"], self.faces
        hyps, probs = out["cam_hypotheses"], out["cam_probs"]
        B, K = probs.shape
        img, mask = batch["img"], batch["mask"]
        terms = {"entropy": c.ent_loss_wt * L.camera_entropy(probs)}
        textures = sample_textures(out["tex_flow"], img)
        render = self.renderer(verts.repeat_interleave(K, dim=0), faces, hyps.reshape(B * K, 7),
                                   textures.repeat_interleave(K, dim=0), rgb_geometry_grad=False)
        alphas = render.image[:, 3]
        part_maps = L.normalise_part_maps(batch["part_prob"], mask, c.quirks.q17_no_epsilon)
        points = {p: batch[f"{p}_points"] for p in self.part_vertices}
        choosing = c.hypothesis_choice != "weighted"
        visible = None
        if c.vertex_loss == "visible" or choosing:
            visible = point_visibility(verts.detach().repeat_interleave(K, dim=0), hyps.detach().reshape(B * K, 7),
                                       render.depth, self.renderer.depth_offset).view(B, K, -1)
        part_rows = None
        if c.part_choice_wt > 0:
            with torch.no_grad():
                part_rows = self.hypothesis_part_losses(verts, hyps, part_maps)
            if not choosing:
                terms["part_choice"] = c.part_choice_wt * (probs * part_rows).sum(1).mean()
        if choosing:
            with torch.no_grad():
                neg_ious = L.hypothesis_neg_iou(alphas.view(B, K, *alphas.shape[1:]), mask)
                scores = hypothesis_choice_scores(c, neg_ious, template, self.part_vertices, hyps, points, visible)
                if part_rows is not None:
                    scores = scores + c.part_choice_wt * part_rows
            terms["choice"] = c.choice_loss_wt * L.hypothesis_choice_loss(probs, scores)
        # what weighs each hypothesis' silhouette and vertex losses: under "weighted" the
        # probabilities, which learn from them; under "best" the probabilities, fixed (they learn
        # from the choice term alone); under "winner" each photo's chosen hypothesis alone
        if c.hypothesis_choice == "winner":
            weighting = F.one_hot(scores.argmin(1), K).to(probs)
        else:
            weighting = probs.detach() if choosing else probs
        terms["mask"] = c.mask_loss_wt * L.multi_mask_loss(alphas.view(B, K, *alphas.shape[1:]), mask, weighting)
        terms.update(self._regularisers(out))
        terms["deform"] = c.deform_reg_wt * L.deform_loss(out["delta_v"])

        target_img = (img * mask[:, None]).repeat_interleave(K, dim=0)
        masked_render = render.image[:, :3] * self._masked_alpha(alphas)[:, None]
        distance = self.texture_distance(masked_render, target_img).view(B, K)
        terms["texture"] = c.tex_loss_wt * (probs.detach() * distance).sum(1).mean()
        terms["texture_dt"] = c.tex_dt_loss_wt * L.texture_dt_loss(out["tex_flow"], batch["mask_dt"])
        # the cycle loss looks at the render of the sampled camera
        sampled = torch.arange(B, device=verts.device) * K + out["cam_sample_inds"][:, 0]
        target, shown = L.cycle_target(render.face_index[sampled], faces.shape[0], None, 2, c.quirks)
        terms["texture_cycle"] = c.tex_cycle_loss_wt * L.texture_cycle_loss(out["tex_flow"], target.to(verts), shown)

        cam_s = out["cam"].detach()
        real = (img * mask[:, None]).detach()
        if self.discriminator is not None:
            previous = self.previous_real if self.previous_real is not None and len(self.previous_real) == B else real
            angles = _gan_angles(batch, verts)
            fake = self.renderer(verts, faces, rotate_cam(cam_s, angles), textures.detach()).image[:, :3]
            terms["gan"] = c.gan_loss_wt * L.gan_loss(self.discriminator, previous, fake)
        self.previous_real = real

        terms["part"] = c.prob_loss_wt * self.part_loss(verts, faces, cam_s, part_maps)
        every_part = {p: 1.0 for p in self.part_vertices}
        visible_only = c.vertex_loss == "visible"
        terms["vertex"] = c.vertex_loss_wt * L.vertex_correspondence_loss(
            template, self.part_vertices, hyps, weighting, points, every_part if visible_only else self.vertex_loss_weights,
            train_probs=not c.quirks.detached_probs, visible=visible if visible_only else None)
        return sum(terms.values()), terms
