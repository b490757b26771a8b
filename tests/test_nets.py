"""UMR's networks: shapes, symmetry, camera hypotheses, original checkpoints, GRL, discriminator."""

from pathlib import Path

import pytest
import torch

from umr import nets as N
from umr.geometry import quat_geodesic_angle
from umr.quirks import Quirks

IMG = 64


@pytest.fixture(scope="module")
def stage2():
    torch.manual_seed(0)
    return N.MeshNet(stage=2, img_size=IMG, pretrained_encoder=False)


@pytest.fixture(scope="module")
def stage1():
    torch.manual_seed(0)
    return N.MeshNet(stage=1, img_size=IMG, pretrained_encoder=False)


def check_outputs(model, out, batch):
    mesh = model.mesh
    assert out["verts"].shape == (batch, 642, 3) and out["delta_v"].shape == (batch, 337, 3)
    assert out["tex_flow"].shape == (batch, 1280, 6, 6, 2)
    assert out["uvimage_pred"].shape == (batch, 2, 128, 256)
    assert out["tex_flow"].abs().max() <= 1 and out["uvimage_pred"].abs().max() <= 1
    assert out["cam"].shape == (batch, 7)
    device = out["verts"].device
    torch.testing.assert_close(out["cam"][:, 3:].norm(dim=-1), torch.ones(batch, device=device), atol=1e-6, rtol=0)
    assert torch.all(out["cam"][:, 0] > 0)
    # exactly mirror symmetric about y = 0, centre vertices on the plane
    verts = out["verts"]
    mirror = torch.from_numpy(mesh.vertex_mirror_index).to(device)
    assert torch.equal(verts[:, mirror], verts * torch.tensor([1.0, -1.0, 1.0], device=device))
    # left faces sample the image where their right twins do
    assert torch.equal(out["tex_flow"][:, 656:], out["tex_flow"][:, 32:656])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_stage2_outputs(stage2, batch, train, device):
    stage2.to(device).train(train)
    out = stage2(torch.rand(batch, 3, IMG, IMG, device=device))
    check_outputs(stage2, out, batch)
    assert out["cam_hypotheses"].shape == (batch, 8, 7) and out["cam_probs"].shape == (batch, 8)
    torch.testing.assert_close(out["cam_probs"].sum(1).cpu(), torch.ones(batch))
    torch.testing.assert_close(out["cam_hypotheses"][..., 3:].norm(dim=-1).cpu(), torch.ones(batch, 8), atol=1e-6, rtol=0)
    chosen = torch.gather(out["cam_hypotheses"], 1, out["cam_sample_inds"][..., None].expand(-1, 1, 7))[:, 0]
    assert torch.equal(chosen, out["cam"])
    if not train:  # most probable hypothesis, mean latent: deterministic
        assert torch.equal(out["cam_sample_inds"][:, 0], out["cam_probs"].argmax(1))
        again = stage2(torch.rand(batch, 3, IMG, IMG, device=device) * 0 + 0.5)
        assert torch.equal(again["verts"], stage2(torch.full((batch, 3, IMG, IMG), 0.5, device=device))["verts"])


@pytest.mark.parametrize("batch", [1, 3])
def test_stage1_outputs(stage1, batch, device):
    stage1.to(device).train()
    out = stage1(torch.rand(batch, 3, IMG, IMG, device=device))
    check_outputs(stage1, out, batch)
    assert out["noise"].shape == (batch, 350)


def test_camera_hypotheses_at_init(stage2, device):
    stage2.to(device).eval()
    out = {k: v.cpu() for k, v in stage2(torch.rand(4, 3, IMG, IMG, device=device)).items()}
    torch.testing.assert_close(out["cam_probs"], torch.full((4, 8), 1 / 8), atol=0.02, rtol=0)
    torch.testing.assert_close(out["cam_hypotheses"][..., 0], torch.ones(4, 8), atol=0.05, rtol=0)
    # default: the hypotheses start at the 8 spread rotations of cam_biases (Q7's intent)
    biases = N.camera_biases(8)
    angle = quat_geodesic_angle(out["cam_hypotheses"][..., 3:], biases[None].expand(4, -1, -1))
    assert angle.max() < 0.1
    torch.testing.assert_close(biases[0], torch.tensor([0.7071068, 0.7071068, 0, 0]))
    torch.testing.assert_close(biases[1], torch.tensor([0.6532815, 0.6532815, 0.2705981, -0.2705981]))
    # q7: the biases are unused, so all start near the identity
    original = N.MeshNet(stage=2, img_size=IMG, pretrained_encoder=False, quirks=Quirks(q7_biases_unused=True))
    original = original.to(device).eval()
    quats = original(torch.rand(4, 3, IMG, IMG, device=device))["cam_hypotheses"][..., 3:].cpu()
    assert quat_geodesic_angle(quats, torch.tensor([1.0, 0, 0, 0]).expand(4, 8, 4)).max() < 0.1


def test_test_time_latent_and_camera_quirks(device):
    img = torch.rand(2, 3, IMG, IMG, device=device)

    def two_runs(quirks):
        torch.manual_seed(1)
        model = N.MeshNet(stage=2, img_size=IMG, pretrained_encoder=False, quirks=quirks).to(device).eval()
        with torch.no_grad():  # probabilities spread enough for sampling to pick others
            for head in model.cam_predictor.camera_predictor:
                head.prob_predictor.weight.normal_(0, 0.5)
        runs = [model(img) for _ in range(12)]
        return runs, all(torch.equal(r["noise"], runs[0]["noise"]) for r in runs), all(
            torch.equal(r["cam_sample_inds"], runs[0]["cam_sample_inds"]) for r in runs)

    runs, same_z, same_cam = two_runs(Quirks())
    assert same_z and same_cam  # the mean latent and the most probable hypothesis
    torch.testing.assert_close(runs[0]["noise"], runs[0]["mean"])
    assert torch.equal(runs[0]["cam_sample_inds"][:, 0], runs[0]["cam_probs"].argmax(1))
    _, same_z, same_cam = two_runs(Quirks(q6_sampled_latent=True))
    assert not same_z and same_cam
    _, same_z, same_cam = two_runs(Quirks(q12_sampled_camera=True))
    assert same_z and not same_cam


def test_centre_vertices_stay_on_the_symmetry_plane_unless_free(device):
    img = torch.rand(2, 3, IMG, IMG, device=device)
    for quirks, on_plane in ((Quirks(), True), (Quirks(free_centre_vertices=True), False)):
        torch.manual_seed(0)
        model = N.MeshNet(stage=2, img_size=IMG, pretrained_encoder=False, quirks=quirks).to(device).eval()
        with torch.no_grad():
            model.shape_predictor.pred_layer.bias.normal_(0, 0.1)
            centre_y = model(img)["verts"][:, : model.mesh.num_indept, 1]
        assert bool((centre_y.abs() < 1e-6).all()) == on_plane


def test_stage1_shape_mlp_is_affine_only_with_the_quirk(device):
    z1, z2 = torch.randn(1, 350, device=device), torch.randn(1, 350, device=device)
    compat = N.ShapeMLP(350, 337, linear=True).to(device)  # q5_linear_shape_mlp
    torch.testing.assert_close(compat(0.3 * z1 + 0.7 * z2), 0.3 * compat(z1) + 0.7 * compat(z2), atol=1e-5, rtol=1e-4)
    default = N.ShapeMLP(350, 337).to(device)
    assert not torch.allclose(default(0.3 * z1 + 0.7 * z2), 0.3 * default(z1) + 0.7 * default(z2), atol=1e-6)


def test_batchnorm1d_init():
    default = N.fc_stack(10, 10, 2)
    compat = N.fc_stack(10, 10, 2, uniform_bn=True)  # q14_uniform_bn_init
    assert torch.all(default[0][1].weight == 1)
    w = compat[0][1].weight
    assert torch.all((w >= 0) & (w <= 1)) and w.std() > 0.1  # U(0, 1), PyTorch 1.1's init
    model = N.MeshNet(stage=2, img_size=IMG, pretrained_encoder=False, quirks=Quirks(q14_uniform_bn_init=True))
    assert model.encoder.enc_fc[0][1].weight.std() > 0.1
    assert torch.all(N.MeshNet(stage=2, img_size=IMG, pretrained_encoder=False).encoder.enc_fc[0][1].weight == 1)


def test_buffers_do_not_depend_on_batch_size(stage2, device):
    stage2.to(device)
    shapes = {name: tuple(b.shape) for name, b in stage2.named_buffers()}
    assert shapes["texture_predictor.uv_sampler"] == (656, 36, 2)  # the original's was (B, 656, 36, 2)
    for train in (True, False):
        stage2.train(train)
        for batch in (1, 5):
            stage2(torch.rand(batch, 3, IMG, IMG, device=device))
            assert {name: tuple(b.shape) for name, b in stage2.named_buffers()} == shapes


def test_pretrained_encoder_without_weights_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(N.PretrainedWeightsMissing, match="--nopretrained_encoder"):
        N.load_resnet18(pretrained=True)


def test_pretrained_encoder_loads_local_weights(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "checkpoints" / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    loaded = N.load_resnet18(pretrained=True)
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)


def test_gradient_reversal_flips_and_scales(device):
    x = torch.randn(5, device=device, requires_grad=True)
    upstream = torch.randn(5, device=device)
    y = N.GradientReversal(0.2)(x)
    assert torch.equal(y, x)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, -0.2 * upstream)


@pytest.mark.parametrize("size,channels", [(64, 1), (256, 3)])
def test_discriminator_shapes(size, channels, device):
    disc = N.Discriminator(0.2, channels, size).to(device)
    assert disc(torch.rand(3, channels, size, size, device=device)).shape == (3, 1)
