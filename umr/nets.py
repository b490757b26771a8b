"""UMR's networks (docs/method.md §4–7): encoder, shape / camera / texture-flow
predictors for both stages, and the discriminator with its gradient reversal layer.

Module names follow the original's stage-2 state-dict layout (docs/method.md §5.7); :mod:`umr.checkpoints`
loads the authors' released checkpoints of both stages. Where the original departs from the
paper, the default follows the paper and a :class:`umr.quirks.Quirks` switch restores the
original:

* ``q5_linear_shape_mlp``: stage-1 shape MLP with LeakyReLU slope 1 (an affine map; default 0.01);
* ``q6_sampled_latent``: the latent code sampled in eval mode too (default: the mean);
* ``q7_biases_unused``: camera hypotheses not rotated by ``cam_biases[k]`` (default: rotated);
* ``q12_sampled_camera``: the camera hypothesis sampled in eval mode too (default: the most probable);
* ``q14_uniform_bn_init``: BatchNorm1d weights start U(0, 1), PyTorch 1.1's init (default 1);
* ``free_centre_vertices``: centre vertices of the symmetric mesh may leave the symmetry plane
  (default: they keep it, so the predicted mesh is exactly mirror symmetric).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from umr.config import option
from umr.conventions import ALIGN_CORNERS
from umr.geometry import hamilton_product
from umr.mesh import SymmetricMesh, compute_uv_sampler, symmetric_template, uv_image_size
from umr.quirks import Quirks

__all__ = [
    "MeshNet",
    "Discriminator",
    "GradientReversal",
    "load_resnet18",
    "PretrainedWeightsMissing",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsMissing(RuntimeError):
    """ImageNet weights are not on this machine; the message says where to put them."""


# --------------------------------------------------------------------------------------------
# Building blocks (docs/method.md §4)


def net_init(module: nn.Module, uniform_bn: bool = False) -> nn.Module:
    """Linear/Conv2d weights N(0, 0.02) and zero bias; BatchNorm2d weight 1, bias 0.
    BatchNorm1d: weight 1 (``uniform_bn``: U(0, 1) as PyTorch 1.1 initialised it, quirk Q14)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d) and uniform_bn:
            nn.init.uniform_(m.weight)
    return module


def batch_norm_with_running_stats(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn`` applied with its running statistics, which it leaves unchanged: what a training
    batch with one value per channel gets (its own statistics are undefined)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class _SingleSampleSafe:
    """Batch norm that, in training mode, falls back to its running statistics when the batch
    has a single value per channel (batch size 1), where batch statistics are undefined."""

    def forward(self, x):
        if self.training and x.numel() // x.shape[1] == 1:
            return batch_norm_with_running_stats(self, x)
        return super().forward(x)


class BatchNorm1d(_SingleSampleSafe, nn.BatchNorm1d):
    pass


class BatchNorm2d(_SingleSampleSafe, nn.BatchNorm2d):
    pass


def fc(use_bn: bool, nc_in: int, nc_out: int) -> nn.Sequential:
    if use_bn:
        return nn.Sequential(nn.Linear(nc_in, nc_out), BatchNorm1d(nc_out), nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(nn.Linear(nc_in, nc_out), nn.LeakyReLU(0.1, inplace=True))


def fc_stack(nc_in: int, nc_out: int, nlayers: int, use_bn: bool = True, uniform_bn: bool = False) -> nn.Sequential:
    layers = [fc(use_bn, nc_in if i == 0 else nc_out, nc_out) for i in range(nlayers)]
    return net_init(nn.Sequential(*layers), uniform_bn)


def conv2d(use_bn: bool, nc_in: int, nc_out: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    layers = [nn.Conv2d(nc_in, nc_out, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=True)]
    if use_bn:
        layers.append(BatchNorm2d(nc_out))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return nn.Sequential(*layers)


def upconv2d(nc_in: int, nc_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.ReflectionPad2d(1),
        nn.Conv2d(nc_in, nc_out, 3, stride=1, padding=0),
        nn.LeakyReLU(0.2, inplace=True),
    )


def decoder2d(nlayers: int, nc_input: int, nc_final: int, use_bn: bool = True, nc_min: int = 8, uniform_bn: bool = False):
    layers, nc = [], nc_input
    for _ in range(nlayers):
        nc_out = nc // 2 if nc // 2 >= nc_min else nc
        layers += [upconv2d(nc, nc_out), conv2d(use_bn, nc_out, nc_out)]
        nc = nc_out
    layers.append(nn.Conv2d(nc, nc_final, 3, stride=1, padding=1, bias=True))
    return net_init(nn.Sequential(*layers), uniform_bn)


# --------------------------------------------------------------------------------------------
# Encoder (docs/method.md §5.2)


def imagenet_weights(weights, what: str, avoid: str) -> Path:
    """The local file of torchvision ``weights`` (the torch hub cache; never downloaded), or
    :class:`PretrainedWeightsMissing` naming the file, where to get it and the flag ``avoid``
    that does without. ``what``: the network that needs them, for the message."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise PretrainedWeightsMissing(
            f"ImageNet weights for {what} are not on this machine: expected {path}. Download {weights.url} to that "
            f"path (or set TORCH_HOME), or pass {avoid}."
        )
    return path


def load_resnet18(pretrained: bool) -> nn.Module:
    """torchvision's ResNet-18, with ImageNet weights from the local torch hub cache.

    Raises :class:`PretrainedWeightsMissing` (naming the file, where to get it and the flag that
    avoids it) when ``pretrained`` and the weights are not on this machine; never downloads.
    """
    import torchvision

    if not pretrained:
        return torchvision.models.resnet18(weights=None)
    path = imagenet_weights(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "the ResNet-18 encoder",
                            "--nopretrained_encoder to train the encoder from scratch")
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


class _ResNetConv(nn.Module):
    def __init__(self, pretrained: bool):
        super().__init__()
        self.resnet = load_resnet18(pretrained)  # the unused fc stays, for the state-dict layout
        for p in self.resnet.fc.parameters():  # ... and is never trained
            p.requires_grad_(False)

    def forward(self, x):
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        return r.layer4(r.layer3(r.layer2(r.layer1(x))))


class Encoder(nn.Module):
    """Image (B, 3, S, S), ImageNet-normalised → feature (B, nz_feat) and the latent's mean and
    log-variance (B, z_dim)."""

    def __init__(self, img_size: int, nz_feat: int = 200, z_dim: int = 350, pretrained: bool = True,
                 uniform_bn: bool = False):
        super().__init__()
        if img_size % 64:
            raise ValueError(f"img_size must be a multiple of 64 (the encoder downsamples by 64), got {img_size}")
        self.resnet_conv = _ResNetConv(pretrained)
        self.enc_conv1 = conv2d(True, 512, 256, kernel_size=4, stride=2)
        self.enc_fc = fc_stack(256 * (img_size // 64) ** 2, nz_feat, 2, uniform_bn=uniform_bn)
        self.mean_fc = nn.Sequential(nn.Linear(nz_feat, nz_feat), nn.LeakyReLU(0.01), nn.Linear(nz_feat, z_dim))
        self.logvar_fc = nn.Sequential(nn.Linear(nz_feat, nz_feat), nn.LeakyReLU(0.01), nn.Linear(nz_feat, z_dim))

    def forward(self, img):
        feat = self.enc_conv1(self.resnet_conv(img))
        feat = self.enc_fc(feat.flatten(1))
        return feat, self.mean_fc(feat), self.logvar_fc(feat)


# --------------------------------------------------------------------------------------------
# Predictors (docs/method.md §5.3–5.5, docs/method.md §6)


class ShapePredictor(nn.Module):
    """Stage 2: Linear(z → half-mesh offsets), weights N(0, 1e-4)."""

    def __init__(self, z_dim: int, num_output: int):
        super().__init__()
        self.pred_layer = nn.Linear(z_dim, num_output * 3)
        nn.init.normal_(self.pred_layer.weight, std=1e-4)

    def forward(self, z):
        return self.pred_layer(z).view(z.shape[0], -1, 3)


class ShapeMLP(nn.Module):
    """Stage 1: MLP z → 350 → 700 → 1400 → 2800 → half-mesh offsets (default PyTorch init).
    ``linear``: the original's ``LeakyReLU(True)``, which set the slope to 1 (an affine map, quirk Q5)."""

    def __init__(self, z_dim: int, num_output: int, linear: bool = False):
        super().__init__()
        slope = 1.0 if linear else 0.01
        widths = [z_dim, 350, 700, 1400, 2800]
        layers = []
        for nc_in, nc_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(nc_in, nc_out), nn.LeakyReLU(slope, inplace=True)]
        layers.append(nn.Linear(widths[-1], num_output * 3))
        self.mlp = nn.Sequential(*layers)

    def forward(self, z):
        return self.mlp(z).view(z.shape[0], -1, 3)

    @torch.no_grad()
    def shift_output(self, offset: torch.Tensor) -> None:
        """Add ``offset`` (V_half, 3) to every prediction (through the last layer's bias)."""
        self.mlp[-1].bias += offset.reshape(-1).to(self.mlp[-1].bias)


def _scale_from(out):
    return F.relu(out + 1.0) + 1e-12  # scale bias 1, lr multiplier 1 (the flags never reached it)


class _Linear(nn.Module):
    """A Linear layer under the attribute name ``pred_layer`` (the original's layout)."""

    def __init__(self, nc_in, nc_out):
        super().__init__()
        self.pred_layer = nn.Linear(nc_in, nc_out)

    def forward(self, x):
        return self.pred_layer(x)


class CameraHead(nn.Module):
    """One hypothesis: fc_stack(BN) → unit quaternion, probability logit, scale, translation."""

    def __init__(self, nz_feat: int, uniform_bn: bool = False):
        super().__init__()
        self.fc_layer = fc_stack(nz_feat, nz_feat, 2, use_bn=True, uniform_bn=uniform_bn)
        self.quat_predictor = _Linear(nz_feat, 4)
        self.prob_predictor = nn.Linear(nz_feat, 1)
        self.scale_predictor = _Linear(nz_feat, 1)
        self.trans_predictor = _Linear(nz_feat, 2)

    def forward(self, h):
        g = self.fc_layer(h)
        quat = F.normalize(self.quat_predictor(g), dim=-1)
        cam = torch.cat([_scale_from(self.scale_predictor(g)), self.trans_predictor(g), quat], dim=-1)
        return cam, self.prob_predictor(g)


def camera_biases(num_hypotheses: int) -> torch.Tensor:
    """(K, 4) quaternions: (0.7071, 0.7071, 0, 0) repeatedly left-multiplied by a 45° y rotation."""
    step = torch.tensor([math.cos(math.pi / 8), 0.0, math.sin(math.pi / 8), 0.0])
    quats = [torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0])]
    for _ in range(num_hypotheses - 1):
        quats.append(hamilton_product(step, quats[-1]))
    return torch.stack(quats)


class MultiCamPredictor(nn.Module):
    """K camera hypotheses with probabilities (docs/method.md §5.4).

    ``cam_biases`` (Q7): by default hypothesis k's quaternion is ``q_k ⊗ bias_k`` — the heads
    start near the identity, so the hypotheses start spread over 8 azimuths of a side view, as
    intended; ``use_biases=False`` leaves them unused, as the original did.
    """

    def __init__(self, nz_feat: int, num_hypotheses: int = 8, use_biases: bool = True, uniform_bn: bool = False):
        super().__init__()
        self.use_biases = use_biases
        self.fc = fc_stack(nz_feat, nz_feat, 2, use_bn=False)
        self.camera_predictor = nn.ModuleList([CameraHead(nz_feat, uniform_bn) for _ in range(num_hypotheses)])
        net_init(self, uniform_bn)
        for head in self.camera_predictor:
            head.quat_predictor.pred_layer.bias.data.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        self.register_buffer("cam_biases", camera_biases(num_hypotheses))

    def forward(self, feat, sample: bool, uniform: Optional[torch.Tensor] = None):
        """``uniform`` (B,): U[0, 1) numbers that pick the sampled hypothesis by inverse CDF
        (the training loop passes per-sample numbers, so runs do not depend on the process
        count); None draws them here."""
        h = self.fc(feat)
        cams, logits = zip(*(head(h) for head in self.camera_predictor))
        hypotheses = torch.stack(cams, dim=1)  # (B, K, 7)
        if self.use_biases:
            quats = hamilton_product(hypotheses[..., 3:], self.cam_biases.to(hypotheses.dtype)[None])
            hypotheses = torch.cat([hypotheses[..., :3], quats], dim=-1)
        probs = torch.softmax(torch.cat(logits, dim=1), dim=1)  # (B, K)
        if sample:
            if uniform is None:
                uniform = torch.rand(probs.shape[0], device=probs.device)
            below = (probs.detach().cumsum(1) <= uniform.to(probs.dtype)[:, None]).sum(1, keepdim=True)
            index = below.clamp_max(probs.shape[1] - 1)
        else:
            index = probs.detach().argmax(dim=1, keepdim=True)
        cam = torch.gather(hypotheses, 1, index[..., None].expand(-1, 1, 7))[:, 0]
        return cam, hypotheses, probs, index


class SingleCamPredictor(nn.Module):
    """Stage 1: one camera from the feature. Default init, no identity bias (as the original);
    ``side_view``: weights N(0, 0.02) and zero biases except the quaternion's, which is the first
    camera hypothesis' side view (``camera_biases(1)[0]``), so every image starts seen from the
    side, in the frame that stage 2's hypotheses assume."""

    def __init__(self, nz_feat: int, side_view: bool = False):
        super().__init__()
        self.quat_predictor = nn.Linear(nz_feat, 4)
        self.scale_predictor = nn.Linear(nz_feat, 1)
        self.trans_predictor = nn.Linear(nz_feat, 2)
        if side_view:
            net_init(self)
            self.quat_predictor.bias.data.copy_(camera_biases(1)[0])

    def forward(self, feat):
        quat = F.normalize(self.quat_predictor(feat), dim=-1)
        return torch.cat([_scale_from(self.scale_predictor(feat)), self.trans_predictor(feat), quat], dim=-1)


class TexturePredictorUV(nn.Module):
    """Feature → UV flow image (B, 2, H_uv, W_uv) in [-1, 1] → per-face flow (B, F, T, T, 2).

    The UV sampler (num_half_faces, T*T, 2) is a buffer independent of the batch size; left
    faces reuse their right twins' flow (same image locations, docs/method.md §5.5). ``uv_height`` (a power of
    two ≥ 8; None or 0: from the face count, 128 for UMR's mesh) and ``channels`` (of the decoder's
    first 4 x 8 feature map; 256 in UMR) size the network: a 32-row UV image is plenty for 64-px
    images and takes a fraction of the time.
    """

    def __init__(self, nz_feat: int, mesh: SymmetricMesh, tex_size: int = 6, uniform_bn: bool = False,
                 uv_height: Optional[int] = None, channels: int = 256):
        super().__init__()
        self.mesh = mesh
        self.tex_size = tex_size
        faces = mesh.faces[: mesh.num_half_faces]
        sampler = compute_uv_sampler(mesh.verts, faces, tex_size).reshape(len(faces), tex_size * tex_size, 2)
        self.register_buffer("uv_sampler", torch.from_numpy(sampler).float())
        self.uv_height, self.uv_width = uv_image_size(len(faces), tex_size)
        if uv_height:
            if uv_height < 8 or uv_height & (uv_height - 1):
                raise ValueError(f"the UV image height must be a power of two of at least 8, got {uv_height}")
            self.uv_height, self.uv_width = uv_height, 2 * uv_height
        self.feat_h, self.feat_w, self.channels = 4, 8, channels
        nlayers = int(round(math.log2(self.uv_height / self.feat_h)))
        self.enc = fc_stack(nz_feat, channels * self.feat_h * self.feat_w, 2, uniform_bn=uniform_bn)
        self.decoder = decoder2d(nlayers, channels, 2, uniform_bn=uniform_bn)

    def forward(self, feat):
        uv_image = self.decoder(self.enc(feat).view(-1, self.channels, self.feat_h, self.feat_w))
        uv_image = torch.tanh(uv_image)
        grid = self.uv_sampler.to(uv_image.dtype)[None].expand(feat.shape[0], -1, -1, -1)
        flow = F.grid_sample(uv_image, grid, align_corners=ALIGN_CORNERS)  # (B, 2, F_half, T*T)
        flow = flow.permute(0, 2, 3, 1).reshape(feat.shape[0], -1, self.tex_size, self.tex_size, 2)
        return self.mesh.symmetrize_faces(flow), uv_image


# --------------------------------------------------------------------------------------------
# The mesh network of both stages


@dataclass(frozen=True)
class ArchitectureConfig:
    """What shapes :class:`MeshNet` besides its stage and image size: the ``--nz_feat`` ...
    ``--uv_channels`` flags are generated from these fields, and checkpoints record them
    (umr.checkpoints.model_config), so a model is rebuilt from its checkpoint alone."""

    nz_feat: int = option(200, "Encoder feature size.", lower_bound=1)
    z_dim: int = option(350, "Latent code size.", lower_bound=1)
    num_hypo_cams: int = option(8, "Camera hypotheses (stage 2).", lower_bound=1)
    tex_size: int = option(6, "Texture samples per face side.", lower_bound=2)
    subdivide: int = option(3, "Icosphere subdivisions of the template (3: 642 vertices, 1280 faces).",
                            lower_bound=1)
    axis: int = option(1, "Symmetry axis of the template (0, 1 or 2).")
    uv_height: int = option(0, "Rows of the predicted UV flow image (a power of two; its width is twice that). 0: from "
                            "the face count and --tex_size, 128 for the default mesh, as the original. 32 suffices "
                            "for 64-px images and makes the texture-flow network several times cheaper.",
                            lower_bound=0)
    uv_channels: int = option(256, "Channels of the texture-flow decoder's first 4 x 8 feature map (the two fully "
                              "connected layers before it have 32 times as many units); 256 as the original.",
                              lower_bound=1)


_ARCH = ArchitectureConfig()


class MeshNet(nn.Module):
    """UMR's predictor. ``stage`` 1 learns the template from a sphere with one camera; stage 2
    keeps the template fixed and predicts ``num_hypo_cams`` camera hypotheses.

    Forward takes images (B, 3, S, S) in [0, 1] (ImageNet normalisation happens inside) and
    returns a dict: ``verts`` (B, V, 3), ``delta_v`` (B, V_half, 3), ``cam`` (B, 7),
    ``tex_flow`` (B, F, T, T, 2), ``uvimage_pred`` (B, 2, H_uv, W_uv), ``mean``, ``logvar``,
    ``noise`` (B, z_dim, the code used); stage 2 also ``cam_hypotheses`` (B, K, 7),
    ``cam_probs`` (B, K), ``cam_sample_inds`` (B, 1).
    """

    def __init__(
        self,
        stage: int = 2,
        img_size: int = 256,
        nz_feat: int = _ARCH.nz_feat,
        z_dim: int = _ARCH.z_dim,
        num_hypo_cams: int = _ARCH.num_hypo_cams,
        tex_size: int = _ARCH.tex_size,
        subdivide: int = _ARCH.subdivide,
        axis: int = _ARCH.axis,
        pretrained_encoder: bool = True,
        mean_shape: Optional[torch.Tensor] = None,
        quirks: Optional[Quirks] = None,
        logvar_init: Optional[float] = None,
        side_view_init: bool = False,
        uv_height: Optional[int] = _ARCH.uv_height,
        uv_channels: int = _ARCH.uv_channels,
    ):
        """``uv_height``, ``uv_channels``: size of the texture-flow network
        (:class:`TexturePredictorUV`; None or 0, and 256: UMR's). ``logvar_init``: initial bias of the
        latent log-variance head (None: PyTorch's default init, as the original, where the
        injected noise starts with unit variance and outweighs the image's code);
        ``side_view_init``: stage 1's camera starts at the side view (see
        :class:`SingleCamPredictor`). ``quirks``: :class:`umr.quirks.Quirks` (default: none)."""
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        quirks = quirks or Quirks()
        self.stage, self.quirks, self.axis = stage, quirks, axis
        # what rebuilds this network from a checkpoint (umr.checkpoints)
        self.arch = dict(stage=stage, img_size=img_size, nz_feat=nz_feat, z_dim=z_dim, num_hypo_cams=num_hypo_cams,
                         tex_size=tex_size, subdivide=subdivide, axis=axis, uv_height=uv_height or 0,
                         uv_channels=uv_channels)
        self.mesh = symmetric_template(subdivide, axis)
        template = torch.from_numpy(self.mesh.verts[: self.mesh.num_output]).float()
        if mean_shape is not None:
            if tuple(mean_shape.shape) != tuple(template.shape):
                raise ValueError(f"mean shape must be {tuple(template.shape)} (the half template), got {tuple(mean_shape.shape)}")
            template = mean_shape.detach().float().cpu()
        self.register_buffer("mean_v", template)
        self.register_buffer("faces", torch.from_numpy(self.mesh.faces), persistent=False)
        # zero the symmetry-plane coordinate of centre-vertex offsets (exact symmetry)
        keep = torch.ones(self.mesh.num_output, 3)
        if not quirks.free_centre_vertices:
            keep[: self.mesh.num_indept, axis] = 0
        self.register_buffer("offset_mask", keep, persistent=False)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        uniform_bn = quirks.q14_uniform_bn_init
        self.encoder = Encoder(img_size, nz_feat, z_dim, pretrained_encoder, uniform_bn)
        if logvar_init is not None:
            nn.init.constant_(self.encoder.logvar_fc[-1].bias, logvar_init)
        num_output = self.mesh.num_output
        if stage == 1:
            self.shape_predictor = ShapeMLP(z_dim, num_output, quirks.q5_linear_shape_mlp)
            self.cam_predictor = SingleCamPredictor(nz_feat, side_view_init)
        else:
            self.shape_predictor = ShapePredictor(z_dim, num_output)
            self.cam_predictor = MultiCamPredictor(nz_feat, num_hypo_cams, not quirks.q7_biases_unused, uniform_bn)
        self.texture_predictor = TexturePredictorUV(nz_feat, self.mesh, tex_size, uniform_bn, uv_height, uv_channels)
        net_init(self.texture_predictor, uniform_bn)

    def symmetrize(self, half: torch.Tensor) -> torch.Tensor:
        return self.mesh.symmetrize(half)

    def get_mean_shape(self) -> torch.Tensor:
        """The full template (V, 3)."""
        return self.symmetrize(self.mean_v)

    @property
    def latent_size(self) -> int:
        """Size of the latent code z (the ``eps_z`` a training sample carries)."""
        return self.arch["z_dim"]

    def trainable_parameters(self) -> list:
        """The parameters an optimiser trains (the ResNet's unused classifier is not among them)."""
        return [p for p in self.parameters() if p.requires_grad]

    def predict_offsets(self, z: torch.Tensor) -> torch.Tensor:
        """Half-mesh offsets (B, V_half, 3) for latent codes (B, z_dim)."""
        return self.shape_predictor(z) * self.offset_mask.to(z.dtype)

    def encode(self, img: torch.Tensor):
        """Images (B, 3, S, S) in [0, 1] → the encoder's feature (B, nz_feat) and the latent's mean
        and log-variance (B, z_dim) each (ImageNet normalisation happens here)."""
        return self.encoder((img - self.image_mean) / self.image_std)

    def forward(self, img: torch.Tensor, eps: Optional[torch.Tensor] = None, u_cam: Optional[torch.Tensor] = None) -> dict:
        """``eps`` (B, z_dim) standard normal and ``u_cam`` (B,) uniform numbers for the latent
        sample and the camera hypothesis sample; None draws them here."""
        feat, mean, logvar = self.encode(img)
        if self.training or self.quirks.q6_sampled_latent:
            # the original also samples at test time; the paper's intent is the mean there
            eps = torch.randn_like(mean) if eps is None else eps.to(mean)
            z = mean + eps * torch.exp(0.5 * logvar)
        else:
            z = mean
        delta = self.predict_offsets(z)
        out = {"mean": mean, "logvar": logvar, "noise": z, "delta_v": delta}
        out["verts"] = self.symmetrize(self.mean_v[None] + delta)
        out["tex_flow"], out["uvimage_pred"] = self.texture_predictor(feat)
        if self.stage == 1:
            out["cam"] = self.cam_predictor(feat)
        else:
            sample = self.training or self.quirks.q12_sampled_camera  # else the most probable hypothesis
            cam, hyp, probs, index = self.cam_predictor(feat, sample, u_cam)
            out.update(cam=cam, cam_hypotheses=hyp, cam_probs=probs, cam_sample_inds=index)
        return out


# --------------------------------------------------------------------------------------------
# Discriminator (docs/method.md §7)


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.weight * grad, None


class GradientReversal(nn.Module):
    """Identity forward; backward multiplies the gradient by ``−weight``."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return _ReverseGrad.apply(x, self.weight)


class Discriminator(nn.Module):
    """GRL → four stride-2 3x3 convs (32, 64, 32, 32) → 1x1 conv → Linear → one logit per image."""

    def __init__(self, grl_weight: float, in_dim: int, img_size: int = 256):
        super().__init__()
        if img_size % 16:
            raise ValueError(f"the discriminator needs an image size divisible by 16, got {img_size}")
        self.grl = GradientReversal(grl_weight)
        self.conv = nn.Sequential(
            nn.Conv2d(in_dim, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )
        self.fc = nn.Linear((img_size // 16) ** 2, 1)

    def forward(self, x):
        return self.fc(self.conv(self.grl(x)).flatten(1))
