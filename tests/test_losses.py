"""UMR's losses on cases with known answers, many on synthetic birds with their true 3-D shape."""
import math

import numpy as np
import pytest
import torch
from conftest import to_device
from torch.utils.data import default_collate

from umr.data import synth_birds
from umr.data.cub import CUBDataset
from umr import losses as L
from umr.category import BIRDS, CategorySpec
from umr.geometry import rotate_cam
from umr.nets import Discriminator, MeshNet
from umr.objectives import ObjectiveConfig, Stage1Objective, Stage2Objective
from umr.quirks import Quirks
from umr.renderer import SoftRenderer, face_pixel_centers, make_renderer

SIZE = 64


@pytest.fixture(scope="module")
def birds(synth_set):
    root = synth_set(seed=7, num_train=3, num_val=0, num_test=0, photo_size=192)
    ds = CUBDataset(root / "CUB_200_2011", root / "cachedir" / "cub", img_size=SIZE, jitter_frac=0.0, mirror=False,
                    scops_path=root / "scops")
    torch.manual_seed(0)
    batch = {k: torch.as_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in default_collate([ds[i] for i in range(3)]).items()}
    gt = np.load(root / "gt" / "train.npz")
    return {
        "batch": batch,
        "verts": torch.from_numpy(gt["verts"]).float(),
        "faces": torch.from_numpy(gt["faces"]),
        "face_parts": torch.from_numpy(gt["face_parts"]),
        "cams": synth_birds.canonical_camera(batch["sfm_pose"]).float(),
    }


def turned(cams, degrees, axis=(0.0, 1.0, 0.0)):
    """Cameras turned about an axis of the camera frame (default: the image's vertical)."""
    return rotate_cam(cams, torch.full((len(cams),), float(degrees)), axis)


def test_neg_iou_known_values(device):
    mask = (torch.rand(2, 8, 8) > 0.5).float().to(device)
    torch.testing.assert_close(L.neg_iou(mask, mask).cpu(), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(L.neg_iou(torch.zeros_like(mask), mask).cpu(), torch.ones(2))
    half = torch.zeros(1, 4, 4, device=device)
    half[:, :, :2] = 1
    torch.testing.assert_close(L.neg_iou(torch.ones_like(half), half).cpu(), torch.tensor([0.5]), atol=1e-6, rtol=0)


def test_mask_loss_of_the_true_mesh_is_near_zero(birds, device):
    birds = to_device(birds, device)
    renderer = SoftRenderer(SIZE)
    mask = birds["batch"]["mask"]
    true = L.mask_loss(renderer(birds["verts"], birds["faces"], birds["cams"]).image[:, 3], mask)
    assert true < 0.08  # half a pixel of convention difference at 64 px remains
    previous = true
    for degrees in (15, 40):
        loss = L.mask_loss(renderer(birds["verts"], birds["faces"], turned(birds["cams"], degrees)).image[:, 3], mask)
        assert loss > previous + 0.02
        previous = loss


def test_multi_mask_loss_weights_hypotheses(device):
    mask = (torch.rand(2, 8, 8) > 0.5).float().to(device)
    alphas = torch.stack([mask, torch.zeros_like(mask)], dim=1)  # hypothesis 0 perfect, 1 empty
    assert L.multi_mask_loss(alphas, mask, torch.tensor([[1.0, 0.0], [1.0, 0.0]], device=device)) < 1e-6
    probs = torch.tensor([[0.25, 0.75], [0.5, 0.5]], device=device)
    torch.testing.assert_close(L.multi_mask_loss(alphas, mask, probs).cpu(), torch.tensor(0.625))


def test_entropy_of_uniform_is_log_k(device):
    entropy = L.camera_entropy(torch.full((3, 8), 1 / 8, device=device))
    torch.testing.assert_close(entropy.cpu(), torch.tensor(math.log(8)))
    assert L.camera_entropy(torch.eye(8, device=device)[:2]) < 1e-6


def test_texture_cycle_zero_when_flow_is_at_face_centres(birds, device):
    birds = to_device(birds, device)
    out = SoftRenderer(SIZE)(birds["verts"], birds["faces"], birds["cams"])
    F = birds["faces"].shape[0]
    centres, visible = face_pixel_centers(out.face_index, F)
    flow = centres[:, :, None, None, :].expand(-1, -1, 6, 6, -1)
    assert L.texture_cycle_loss(flow, centres, visible) < 1e-12
    shifted = L.texture_cycle_loss(flow + 0.1, centres, visible)
    torch.testing.assert_close(shifted, visible.sum() * 2 * 0.01 / (3 * F * 2))
    target, vis = L.cycle_target(out.face_index, F, None, 2)
    torch.testing.assert_close(target, centres)
    assert torch.equal(vis, visible)
    assert not vis[:, -1].all()  # face F-1 is hidden in some images
    # q1: the original's stage-2 target is zero; q9: face F-1 counts wherever there is background
    target, vis = L.cycle_target(out.face_index, F, None, 2, Quirks(q1_zero_cycle_target=True))
    assert torch.all(target == 0) and torch.equal(vis, visible)
    target, vis = L.cycle_target(out.face_index, F, None, 2, Quirks(q9_last_face_visible=True))
    torch.testing.assert_close(target, centres)
    assert torch.all(vis[:, -1]) and torch.equal(vis[:, :-1], visible[:, :-1])
    # q2: stage 1 takes SoftRas' p2f (q1 does not touch stage 1)
    p2f = torch.rand(3, F, 2, device=device)
    target, _ = L.cycle_target(out.face_index, F, p2f, 1, Quirks(q2_softras_p2f=True))
    assert torch.equal(target, p2f)
    target, _ = L.cycle_target(out.face_index, F, p2f, 1, Quirks(q1_zero_cycle_target=True))
    torch.testing.assert_close(target, centres)


def test_texture_dt_loss(birds, device):
    batch = to_device(birds["batch"], device)
    inside = torch.zeros(3, 4, 6, 6, 2, device=device)  # the image centre, on the bird
    corner = torch.full((3, 4, 6, 6, 2), -0.98, device=device)
    assert L.texture_dt_loss(inside, batch["mask_dt"]) < 0.2 < 0.9 < L.texture_dt_loss(corner, batch["mask_dt"])


def part_vertices_of(face_parts, faces):
    return {name: torch.unique(faces[face_parts == label].flatten()) for label, name in enumerate(BIRDS.part_names, start=1)}


def test_part_matching_prefers_the_true_pose(birds, device):
    birds = to_device(birds, device)
    batch = birds["batch"]
    labels = birds["face_parts"][:, None].expand(-1, 36)
    loss = L.PartMatchingLoss(labels, make_renderer(SIZE))
    maps = L.normalise_part_maps(batch["part_prob"], batch["mask"])
    true = loss(birds["verts"], birds["faces"], birds["cams"], maps)
    for degrees in (30, 90, 180):
        assert loss(birds["verts"], birds["faces"], turned(birds["cams"], degrees), maps) > true


@pytest.mark.parametrize("num_parts", [1, 4, 5, 7])
def test_part_maps_equal_one_grey_render_per_part(birds, num_parts):
    # the part renders are packed three parts to a render; each channel must equal the render
    # of that part alone, whatever the number of parts of the category
    names = tuple(f"part{i}" for i in range(num_parts))
    category = CategorySpec("toy", ("a",), (0,), names, ((0.5, 0.5, 0.5),) * (num_parts + 1),
                            {p: 2 for p in names}, {names[-1]: 2.0})
    g = torch.Generator().manual_seed(num_parts)
    faces = birds["faces"]
    labels = torch.randint(0, num_parts + 1, (len(faces), 36), generator=g)
    renderer = make_renderer(SIZE)
    loss = L.PartMatchingLoss(labels, renderer, category)
    assert loss.part_weights.tolist() == [0.0] * num_parts + [2.0]
    maps = loss.render_parts(birds["verts"], faces, birds["cams"])
    assert maps.shape == (3, num_parts, SIZE, SIZE)
    for part in range(1, num_parts + 1):
        grey = (labels == part).float()[None, :, :, None].expand(3, -1, -1, 3)
        alone = renderer(birds["verts"], faces, birds["cams"], grey).image[:, 0]
        torch.testing.assert_close(maps[:, part - 1], alone, rtol=0, atol=1e-6)
    part_maps = torch.rand(3, num_parts + 1, SIZE, SIZE, generator=g)
    assert torch.isfinite(loss(birds["verts"], faces, birds["cams"], part_maps))


def test_vertex_correspondence_prefers_the_true_pose(birds, device):
    birds = to_device(birds, device)
    batch = birds["batch"]
    one, other, half = (torch.tensor([p], device=device) for p in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]))
    parts = part_vertices_of(birds["face_parts"], birds["faces"])
    for b in range(3):
        # turned in the image plane: the parts land elsewhere
        hyps = torch.stack([birds["cams"][b : b + 1], turned(birds["cams"][b : b + 1], 60, (0.0, 0.0, 1.0))], dim=1)
        points = {p: batch[f"{p}_points"][b : b + 1] for p in BIRDS.part_names}
        true = L.vertex_correspondence_loss(birds["verts"][b], parts, hyps, one, points)
        wrong = L.vertex_correspondence_loss(birds["verts"][b], parts, hyps, other, points)
        assert true < wrong
        mixed = L.vertex_correspondence_loss(birds["verts"][b], parts, hyps, half, points)
        torch.testing.assert_close(mixed, (true + wrong) / 2)


def test_vertex_correspondence_chooses_the_semantically_right_hypothesis(birds, device):
    """The probabilities get the vertex loss's gradient (towards the hypothesis whose parts land
    on the image's parts), so semantic consistency selects hypotheses; train_probs=False (the
    original, --compat) detaches them: only silhouettes would choose."""
    birds = to_device(birds, device)
    batch = birds["batch"]
    parts = part_vertices_of(birds["face_parts"], birds["faces"])
    for b in range(3):
        # the true camera and the same camera turned by 180 degrees: the same silhouette from the
        # other side of the symmetric bird, the head at the other end
        hyps = torch.stack([birds["cams"][b : b + 1], turned(birds["cams"][b : b + 1], 180)], dim=1).requires_grad_()
        points = {p: batch[f"{p}_points"][b : b + 1] for p in BIRDS.part_names}
        logits = torch.zeros(1, 2, device=device, requires_grad=True)
        L.vertex_correspondence_loss(birds["verts"][b], parts, hyps, logits.softmax(1), points).backward()
        assert logits.grad[0, 0] < 0 < logits.grad[0, 1]  # descent raises the true camera's probability
        logits.grad = None
        L.vertex_correspondence_loss(birds["verts"][b], parts, hyps, logits.softmax(1), points,
                                     train_probs=False).backward()
        assert logits.grad is None


def test_face_sample_labels_nearest_vs_compat_rounding():
    from umr.mesh import symmetric_template
    from umr.nets import TexturePredictorUV

    mesh = symmetric_template()
    sampler = TexturePredictorUV(8, mesh).uv_sampler
    seg = np.zeros((128, 256), dtype=np.uint8)
    seg[:, 128:] = 4  # labels 0 and 4 meet; bilinear + round invents 2 on the seam
    nearest = L.face_sample_labels(seg, sampler, mesh)
    rounded = L.face_sample_labels(seg, sampler, mesh, rounded=True)  # q10_rounded_labels
    assert set(nearest.unique().tolist()) == {0, 4}
    assert 2 in rounded.unique().tolist()
    assert nearest.shape == (1280, 36) and torch.equal(nearest[656:], nearest[32:656])


def test_part_map_normalisation_epsilon(device):
    prob = torch.rand(2, 5, 8, 8).to(device)
    prob[1, 3] = 0  # part 3 absent from image 1
    mask = torch.ones(2, 8, 8, device=device)
    maps = L.normalise_part_maps(prob, mask)
    assert torch.isfinite(maps).all() and torch.all(maps[1, 3] == 0)
    torch.testing.assert_close(maps[0].flatten(1).max(1).values.cpu(), torch.ones(5))
    original = L.normalise_part_maps(prob, mask, no_epsilon=True)  # q17_no_epsilon
    assert torch.isnan(original[1, 3]).all() and torch.equal(original[0], maps[0])


def test_regulariser_gradients(device):
    delta = torch.randn(2, 5, 3, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(L.deform_loss, (delta,))
    assert torch.autograd.gradcheck(lambda v: L.orientation_loss(v), (delta,))


def fake_alexnet_weights(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
    path = tmp_path / "checkpoints" / weights.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    net = torchvision.models.alexnet(weights=None)
    torch.save(net.state_dict(), path)
    return net


def test_perceptual_distance_formula(tmp_path, monkeypatch):
    alexnet = fake_alexnet_weights(tmp_path, monkeypatch)
    distance = L.PerceptualDistance()
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    d = distance(x, y)
    assert d.shape == (2,) and torch.all((d > 0) & (d <= 5))
    torch.testing.assert_close(distance(x, x), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(distance(y, x), d)
    # independent computation: AlexNet ReLU1..5, 1 - mean cosine per layer, summed
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    expected = torch.zeros(2)
    fx, fy = (2 * x - 1 - shift) / scale, (2 * y - 1 - shift) / scale
    for end in (2, 5, 8, 10, 12):
        a = alexnet.features[:end](fx)
        b = alexnet.features[:end](fy)
        cos = (a / (a.norm(dim=1, keepdim=True) + 1e-10) * b / (b.norm(dim=1, keepdim=True) + 1e-10)).sum(1)
        expected += 1 - cos.mean((1, 2))
    torch.testing.assert_close(d, expected, atol=1e-5, rtol=1e-5)


def test_perceptual_distance_without_weights_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(RuntimeError, match="--texture_loss l1"):
        L.make_texture_distance("perceptual")


def texture_term_grads(stage, quirks, device):
    torch.manual_seed(0)
    model = MeshNet(stage=stage, img_size=SIZE, pretrained_encoder=False, quirks=quirks).to(device)
    config = ObjectiveConfig.for_stage(stage, image_size=SIZE, texture_loss="l1", use_gan=False, quirks=quirks)
    if stage == 1:
        objective = Stage1Objective(model, config)
    else:
        labels = torch.randint(0, 5, (1280, 36))
        parts = {p: torch.arange(i * 10, i * 10 + 10) for i, p in enumerate(BIRDS.part_names)}
        objective = Stage2Objective(model, config, labels.to(device), to_device(parts, device))
    batch = {
        "img": torch.rand(2, 3, SIZE, SIZE),
        "mask": torch.zeros(2, SIZE, SIZE),
        "mask_dt": torch.rand(2, SIZE, SIZE),
        "part_prob": torch.rand(2, 5, SIZE, SIZE),
        **{f"{p}_points": torch.rand(2, 10, 2) - 0.5 for p in BIRDS.part_names},
    }
    batch["mask"][:, 16:48, 10:54] = 1
    batch = to_device(batch, device)
    out = model(batch["img"])
    _, terms = objective(out, batch, 0)
    (terms["texture"] + terms["texture_dt"] + terms["texture_cycle"]).backward()

    def grad_norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    return grad_norm(model.shape_predictor), grad_norm(model.cam_predictor), grad_norm(model.texture_predictor)


@pytest.mark.parametrize("stage", [1, 2])
def test_texture_losses_do_not_move_shape_or_camera(stage, device):
    shape, cam, texture = texture_term_grads(stage, Quirks(), device)
    assert shape == 0 and cam == 0 and texture > 0
    # the original let the perceptual loss reach them through the undetached silhouette (q4)
    shape, cam, texture = texture_term_grads(stage, Quirks(q4_texture_moves_geometry=True), device)
    assert shape > 0 and cam > 0 and texture > 0


def test_gan_loss_trains_discriminator_and_reverses_generator_gradient(device):
    torch.manual_seed(0)
    disc = Discriminator(0.2, 1, 64).to(device)
    real = torch.rand(2, 1, 64, 64).to(device)
    fake = torch.rand(2, 1, 64, 64).to(device).requires_grad_()
    loss = L.gan_loss(disc, real, fake)
    loss.backward()
    fake_grad = fake.grad.clone()
    # without the GRL the generator gradient is the opposite, scaled by 1/0.2
    fake.grad = None
    logits = disc.fc(disc.conv(torch.cat([real, fake])).flatten(1))
    labels = torch.cat([torch.ones(2, 1), torch.zeros(2, 1)]).to(device)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
    torch.testing.assert_close(fake_grad, -0.2 * fake.grad)
