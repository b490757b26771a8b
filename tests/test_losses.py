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


def test_hypothesis_choice_loss_is_the_cross_entropy_to_the_lowest_score(device):
    scores = torch.tensor([[0.3, 0.1, 0.9], [0.2, 0.5, 0.05]], device=device)
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]], device=device, requires_grad=True)
    probs = logits.softmax(1)
    loss = L.hypothesis_choice_loss(probs, scores)
    values = probs.detach()
    by_hand = -(math.log(float(values[0, 1])) + math.log(float(values[1, 2]))) / 2
    assert abs(float(loss.detach()) - by_hand) < 1e-5
    loss.backward()
    stepped = (logits - 0.1 * logits.grad).softmax(1)
    assert stepped[0, 1] > probs[0, 1] and stepped[1, 2] > probs[1, 2]  # the chosen hypotheses gain


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


def true_part_loss(birds, renderer=None):
    """The part matching loss with the birds' true part labels, and their normalised SCOPS maps."""
    labels = birds["face_parts"][:, None].expand(-1, 36)
    batch = birds["batch"]
    maps = L.normalise_part_maps(batch["part_prob"], batch["mask"])
    return L.PartMatchingLoss(labels, renderer or make_renderer(SIZE)), maps


def test_part_matching_prefers_the_true_pose(birds, device):
    birds = to_device(birds, device)
    loss, maps = true_part_loss(birds)
    true = loss(birds["verts"], birds["faces"], birds["cams"], maps)
    for degrees in (30, 90, 180):
        assert loss(birds["verts"], birds["faces"], turned(birds["cams"], degrees), maps) > true


def test_part_matching_per_image_rows_are_each_images_loss(birds, device):
    birds = to_device(birds, device)
    loss, maps = true_part_loss(birds)
    cams = turned(birds["cams"], 40)
    rows = loss.per_image(birds["verts"], birds["faces"], cams, maps)
    assert rows.shape == (3,)
    for b in range(3):
        torch.testing.assert_close(rows[b], loss(birds["verts"][b : b + 1], birds["faces"], cams[b : b + 1], maps[b : b + 1]))
    torch.testing.assert_close(rows.mean(), loss(birds["verts"], birds["faces"], cams, maps))
    # other weights: the category's (background 0, head 5, belly 5) passed explicitly give the same rows
    same = loss.per_image(birds["verts"], birds["faces"], cams, maps, torch.tensor(BIRDS.part_weight_vector()))
    torch.testing.assert_close(same, rows)
    equal = loss.per_image(birds["verts"], birds["faces"], cams, maps, torch.tensor([0.0, 1, 1, 1, 1]))
    assert not torch.allclose(equal, rows)


def test_part_matching_tells_a_view_from_its_mirror_image_where_silhouettes_cannot(birds):
    """Seen through the image plane's mirror (the front for the back, above for below) a
    symmetric bird has the same silhouette, but other parts face the camera: the part loss with
    every part weighted (``--part_choice_wt``'s rows) prefers the true view."""
    batch = birds["batch"]
    renderer = make_renderer(SIZE)
    loss, maps = true_part_loss(birds, renderer)
    verts = birds["verts"]  # each photo's own bird
    cams, twins = birds["cams"], mirror_through_image_plane(birds["cams"])
    alpha = {name: renderer(verts, birds["faces"], c).image[:, 3] for name, c in (("true", cams), ("twin", twins))}
    torch.testing.assert_close(L.neg_iou(alpha["true"], batch["mask"]), L.neg_iou(alpha["twin"], batch["mask"]),
                               atol=0.05, rtol=0)  # alike but for the head turn of each synthetic bird
    every_part = torch.tensor([0.0, 1, 1, 1, 1])
    true = loss.per_image(verts, birds["faces"], cams, maps, every_part)
    twin = loss.per_image(verts, birds["faces"], twins, maps, every_part)
    assert (twin > 5 * true).all(), (true, twin)


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


def mirror_through_image_plane(cams):
    """The cameras R' = M R S (M: depth flipped, S: the template's left/right mirror, axis 1),
    which project every point of a left/right-symmetric point set where R projects its twin."""
    from umr.geometry import matrix_to_quat, quat_to_matrix

    flip_depth = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    mirror = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    rot = flip_depth @ quat_to_matrix(cams[:, 3:].double()) @ mirror
    return torch.cat([cams[:, :3], matrix_to_quat(rot).to(cams)], dim=-1)


def symmetric_bird(device):
    """A mirror-symmetric bird-like template (an ellipsoid, the head at its front top) with its
    four parts by direction, and three cameras seen from above, from below and from the front."""
    from umr.mesh import symmetric_template

    mesh = symmetric_template()
    verts = torch.from_numpy(mesh.verts).float() * torch.tensor([0.8, 0.45, 0.5])
    x, z = verts[:, 0], verts[:, 2]
    label = torch.where(x > 0.45, 0, torch.where(x > 0.3, 1, torch.where(z > 0, 2, 3)))  # head, neck, back, belly
    parts = {p: torch.nonzero(label == i)[:, 0].to(device) for i, p in enumerate(BIRDS.part_names)}
    side = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # bird x → image x, bird z → image up
    side[0, 0] = 1.0
    cams = []
    for elevation, azimuth in ((40.0, 20.0), (-35.0, -30.0), (15.0, -75.0)):
        e, a = math.radians(elevation), math.radians(azimuth)
        rx = torch.tensor([[1, 0, 0], [0, math.cos(e), -math.sin(e)], [0, math.sin(e), math.cos(e)]])
        rz = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        from umr.geometry import matrix_to_quat

        cams.append(torch.cat([torch.tensor([0.9, 0.05, -0.02]), matrix_to_quat((rx @ side @ rz).double()).float()]))
    return verts.to(device), torch.from_numpy(mesh.faces).to(device), parts, torch.stack(cams).to(device)


def test_vertex_loss_sees_a_pose_and_its_mirror_image_alike_unless_visible_only(device):
    """Under orthographic projection a camera and its mirror image through the image plane
    project a symmetric template's parts to the same places, so UMR's vertex loss (every part
    vertex) cannot tell the bird seen from above from the bird seen from below (or the front from
    the back); counting only the vertices a hypothesis' render shows can."""
    from umr.renderer import point_visibility, project_points

    verts, faces, parts, cams = symmetric_bird(device)
    twins = mirror_through_image_plane(cams)
    renderer = make_renderer(SIZE)
    both = torch.stack([cams, twins], dim=1)  # (B, 2, 7): hypothesis 0 the truth, 1 its mirror
    B = len(cams)
    depth = renderer(verts[None].expand(2 * B, -1, -1), faces, both.reshape(2 * B, 7)).depth
    visible = point_visibility(verts[None].expand(2 * B, -1, -1), both.reshape(2 * B, 7), depth,
                               renderer.depth_offset).view(B, 2, -1)
    # the image's part points: where the truth shows each part
    shown = visible[:, 0]
    projected = project_points(verts[None].expand(B, -1, -1), cams)
    points = {}
    for part, index in parts.items():
        rows = [projected[b, index[shown[b, index]]] for b in range(B)]
        assert min(len(r) for r in rows) >= 3, part  # every part shows in every view
        count = max(len(r) for r in rows)  # every shown vertex is a point (repeated to fill the rows)
        points[part] = torch.stack([r[torch.arange(count, device=device) % len(r)] for r in rows])
    one = torch.tensor([[1.0, 0.0]], device=device).expand(B, -1)
    other = torch.tensor([[0.0, 1.0]], device=device).expand(B, -1)
    weights = {p: 1.0 for p in parts}
    for b in range(B):
        args = dict(template=verts, part_vertices=parts, hypotheses=both[b : b + 1], part_points={p: v[b : b + 1] for p, v in points.items()}, weights=weights)
        true = L.vertex_correspondence_loss(probs=one[b : b + 1], **args)
        twin = L.vertex_correspondence_loss(probs=other[b : b + 1], **args)
        torch.testing.assert_close(true, twin, rtol=1e-4, atol=1e-6)  # UMR's loss: blind
        true = L.vertex_correspondence_loss(probs=one[b : b + 1], visible=visible[b : b + 1], **args)
        twin = L.vertex_correspondence_loss(probs=other[b : b + 1], visible=visible[b : b + 1], **args)
        assert float(true) < 1e-6 < float(twin) / 10  # visible only: the truth fits, its mirror does not
    # a hypothesis that hides a part is charged all of that part's vertices, not nothing
    hidden = visible.clone()
    hidden[:, :, parts["head"]] = False
    masked = L.vertex_correspondence_loss(verts, parts, both, one, points, weights, visible=hidden)
    assert masked > L.vertex_correspondence_loss(verts, parts, both, one, points, weights, visible=visible)


def test_stage2_visible_vertex_loss_counts_what_each_hypothesis_shows(birds):
    """--vertex_loss visible: the objective's vertex term is the loss over the vertices each
    hypothesis' own render shows, every part weighted equally; it trains the camera heads and
    the probabilities."""
    from umr.renderer import point_visibility

    batch = birds["batch"]
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=SIZE, pretrained_encoder=False, uv_height=16, uv_channels=32)
    labels = torch.randint(0, 5, (1280, 36))
    parts = symmetric_bird("cpu")[2]  # template vertices of each part
    terms = {}
    for mode in ("umr", "visible"):
        config = ObjectiveConfig.for_stage(2, image_size=SIZE, texture_loss="l1", use_gan=False, vertex_loss=mode)
        objective = Stage2Objective(model, config, labels, parts)
        model.zero_grad()
        out = model(batch["img"], torch.zeros(3, 350), torch.full((3,), 0.5))
        _, terms[mode] = objective(out, batch, 0)
        terms[mode]["vertex"].backward()
        heads = model.cam_predictor.camera_predictor
        assert all(h.quat_predictor.pred_layer.weight.grad.abs().sum() > 0 for h in heads)
        assert all(h.prob_predictor.weight.grad.abs().sum() > 0 for h in heads)
    B, K = out["cam_probs"].shape
    verts = out["verts"].detach().repeat_interleave(K, dim=0)
    cams = out["cam_hypotheses"].detach().reshape(B * K, 7)
    renderer = make_renderer(SIZE)
    visible = point_visibility(verts, cams, renderer(verts, model.faces, cams).depth, renderer.depth_offset)
    points = {p: batch[f"{p}_points"] for p in parts}
    template = model.get_mean_shape()
    expected = L.vertex_correspondence_loss(template, parts, out["cam_hypotheses"], out["cam_probs"], points,
                                            {p: 1.0 for p in parts}, visible=visible.view(B, K, -1))
    torch.testing.assert_close(terms["visible"]["vertex"], 10.0 * expected)
    assert not torch.allclose(terms["visible"]["vertex"], terms["umr"]["vertex"])


def test_stage2_best_hypothesis_choice_trains_the_probabilities_toward_the_losses_choice(birds):
    """--hypothesis_choice best: the choice term is the cross-entropy of the probabilities to each
    photo's hypothesis with the lowest silhouette + visible-vertex loss; the silhouette and vertex
    terms still move the cameras but no longer train the probabilities."""
    from umr.renderer import point_visibility

    batch = birds["batch"]
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=SIZE, pretrained_encoder=False, uv_height=16, uv_channels=32)
    labels = torch.randint(0, 5, (1280, 36))
    parts = symmetric_bird("cpu")[2]
    config = ObjectiveConfig.for_stage(2, image_size=SIZE, texture_loss="l1", use_gan=False, hypothesis_choice="best",
                                       choice_loss_wt=0.5)
    objective = Stage2Objective(model, config, labels, parts)
    out = model(batch["img"], torch.zeros(3, 350), torch.full((3,), 0.5))
    _, terms = objective(out, batch, 0)
    heads = model.cam_predictor.camera_predictor
    for name, trains_probs in (("mask", False), ("vertex", False), ("choice", True)):
        model.zero_grad()
        terms[name].backward(retain_graph=True)
        prob_grad = sum(float(h.prob_predictor.weight.grad.abs().sum()) for h in heads if h.prob_predictor.weight.grad is not None)
        assert (prob_grad > 0) == trains_probs, name
        if name != "choice":
            assert all(h.quat_predictor.pred_layer.weight.grad.abs().sum() > 0 for h in heads)

    # the target, computed here from the renders of every hypothesis
    B, K = out["cam_probs"].shape
    verts = out["verts"].detach().repeat_interleave(K, dim=0)
    cams = out["cam_hypotheses"].detach().reshape(B * K, 7)
    renderer = make_renderer(SIZE)
    render = renderer(verts, model.faces, cams)
    neg_iou = L.neg_iou(render.image[:, 3], batch["mask"].repeat_interleave(K, 0)).view(B, K)
    visible = point_visibility(verts, cams, render.depth, renderer.depth_offset).view(B, K, -1)
    points = {p: batch[f"{p}_points"] for p in parts}
    seen = L.vertex_correspondence_terms(model.get_mean_shape(), parts, out["cam_hypotheses"].detach(), points,
                                         {p: 1.0 for p in parts}, visible)
    target = (2.5 * neg_iou + 10.0 * seen).argmin(1)
    expected = -torch.log(out["cam_probs"][torch.arange(B), target] + 1e-9).mean()
    torch.testing.assert_close(terms["choice"], 0.5 * expected)
    assert "choice" not in objective.__class__(model, ObjectiveConfig.for_stage(2, image_size=SIZE, texture_loss="l1",
                                                                                use_gan=False), labels, parts)(out, batch, 0)[1]


def test_stage2_winner_choice_trains_only_each_photos_chosen_hypothesis(birds):
    """--hypothesis_choice winner: the silhouette and vertex terms reach, for every photo, only
    the hypothesis with the lowest score (the cross-entropy's target), and not the probabilities."""
    batch = birds["batch"]
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=SIZE, pretrained_encoder=False, uv_height=16, uv_channels=32)
    labels = torch.randint(0, 5, (1280, 36))
    parts = symmetric_bird("cpu")[2]
    out = model(batch["img"], torch.zeros(3, 350), torch.full((3,), 0.5))
    B, K = out["cam_probs"].shape
    terms = {}
    for choice in ("best", "winner"):
        config = ObjectiveConfig.for_stage(2, image_size=SIZE, texture_loss="l1", use_gan=False, hypothesis_choice=choice)
        terms[choice] = Stage2Objective(model, config, labels, parts)(out, batch, 0)[1]
    torch.testing.assert_close(terms["winner"]["choice"], terms["best"]["choice"])  # the same target
    log_probs = torch.log(out["cam_probs"].detach() + 1e-9)
    target = None
    for name in ("mask", "vertex"):
        grad_hyps, grad_probs = torch.autograd.grad(terms["winner"][name], [out["cam_hypotheses"], out["cam_probs"]],
                                                    retain_graph=True, allow_unused=True)
        moved = grad_hyps.abs().sum(-1) > 0  # (B, K): which hypotheses this term moves
        assert (moved.sum(1) == 1).all(), (name, moved)
        target = moved.float().argmax(1) if target is None else target
        assert torch.equal(moved.float().argmax(1), target)
        assert grad_probs is None or not grad_probs.any()
        best_grad = torch.autograd.grad(terms["best"][name], out["cam_hypotheses"], retain_graph=True)[0]
        assert ((best_grad.abs().sum(-1) > 0).sum(1) > 1).all()  # best: every hypothesis moves
    expected = -log_probs[torch.arange(B), target].mean()
    torch.testing.assert_close(terms["winner"]["choice"].detach(), expected)


def test_stage2_part_choice_trains_only_the_probabilities_by_every_hypothesis_part_loss(birds):
    """--part_choice_wt: the term is Σ_k p_k ℓ_k with ℓ_k the part matching loss of the shape
    seen from hypothesis k (every part weighted equally), computed here from the renders; it
    trains the probability layers and nothing else. Under --hypothesis_choice best the same rows
    join the scores whose lowest is the target."""
    batch = birds["batch"]
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=SIZE, pretrained_encoder=False, uv_height=16, uv_channels=32)
    labels = torch.randint(0, 5, (1280, 36))
    parts = symmetric_bird("cpu")[2]
    config = ObjectiveConfig.for_stage(2, image_size=SIZE, texture_loss="l1", use_gan=False, part_choice_wt=3.0)
    objective = Stage2Objective(model, config, labels, parts)
    out = model(batch["img"], torch.zeros(3, 350), torch.full((3,), 0.5))
    _, terms = objective(out, batch, 0)

    B, K = out["cam_probs"].shape
    part_loss = L.PartMatchingLoss(labels, make_renderer(SIZE))
    maps = L.normalise_part_maps(batch["part_prob"], batch["mask"])
    rows = torch.stack([part_loss.per_image(out["verts"].detach(), model.faces, out["cam_hypotheses"][:, k].detach(),
                                            maps, torch.tensor([0.0, 1, 1, 1, 1])) for k in range(K)], 1)
    torch.testing.assert_close(terms["part_choice"], 3.0 * (out["cam_probs"] * rows).sum(1).mean())
    model.zero_grad()
    terms["part_choice"].backward(retain_graph=True)
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".prob_predictor." in name or "cam_predictor" in name or "encoder" in name for name in trained)
    heads = model.cam_predictor.camera_predictor
    assert all(h.prob_predictor.weight.grad.abs().sum() > 0 for h in heads)
    assert all(h.quat_predictor.pred_layer.weight.grad is None or not h.quat_predictor.pred_layer.weight.grad.any()
               for h in heads)
    assert not any(name.startswith(("shape_predictor", "texture_predictor")) for name in trained)

    best = ObjectiveConfig.for_stage(2, image_size=SIZE, texture_loss="l1", use_gan=False, hypothesis_choice="best",
                                     part_choice_wt=1e6)  # the part rows decide the target
    _, terms = Stage2Objective(model, best, labels, parts)(out, batch, 0)
    assert "part_choice" not in terms
    expected = -torch.log(out["cam_probs"][torch.arange(B), rows.argmin(1)] + 1e-9).mean()
    torch.testing.assert_close(terms["choice"], expected)


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


def test_facing_cameras_take_the_mirror_image_where_its_silhouette_fits():
    from test_geometry import front_heavy_symmetric_shape
    from umr.geometry import matrix_to_quat, mirror_cam
    from umr.objectives import facing_cameras

    verts, faces = front_heavy_symmetric_shape()
    side = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # bird x → image x, z → up
    cams = torch.cat([torch.tensor([[0.8, 0.05, 0.0], [0.8, -0.05, 0.0]]), matrix_to_quat(side).expand(2, 4)], 1)
    renderer = make_renderer(SIZE)
    # photo 0 as the camera draws it, photo 1 as its mirror image draws it
    truth = torch.stack([cams[0], mirror_cam(cams)[1]])
    mask = (renderer(verts.expand(2, -1, -1), faces, truth).image[:, 3] > 0.5).float()
    cams.requires_grad_(True)
    chosen, mirrored = facing_cameras(renderer, verts.expand(2, -1, -1), faces, cams, mask)
    assert mirrored.tolist() == [False, True]
    torch.testing.assert_close(chosen.detach(), truth)
    chosen.sum().backward()
    assert (cams.grad.abs().sum(1) > 0).all()  # both rows train the predicted camera


def test_stage1_mirror_cameras_trains_through_the_better_facing():
    """train_s1 --mirror_cameras: a photo of the mesh facing the other way costs the silhouette
    loss of the mirrored camera, not of the predicted one."""
    from test_geometry import front_heavy_symmetric_shape
    from umr.geometry import mirror_cam

    torch.manual_seed(0)
    model = MeshNet(stage=1, img_size=SIZE, pretrained_encoder=False, uv_height=16, uv_channels=32)
    batch = {"img": torch.rand(2, 3, SIZE, SIZE), "mask_dt": torch.rand(2, SIZE, SIZE)}
    out = model(batch["img"], torch.zeros(2, model.latent_size), torch.full((2,), 0.5))
    verts = front_heavy_symmetric_shape()[0].expand(2, -1, -1).contiguous()
    out["verts"] = verts
    renderer = make_renderer(SIZE)
    mirrored = mirror_cam(out["cam"].detach())
    batch["mask"] = (renderer(verts, model.faces, mirrored).image[:, 3] > 0.5).float()
    mask_terms = {}
    for on in (False, True):
        config = ObjectiveConfig.for_stage(1, image_size=SIZE, texture_loss="l1", use_gan=False, mirror_cameras=on)
        mask_terms[on] = Stage1Objective(model, config)(out, batch, 0)[1]["mask"]
    expected = 3.0 * L.mask_loss(renderer(verts, model.faces, mirrored).image[:, 3], batch["mask"])
    torch.testing.assert_close(mask_terms[True], expected)
    assert mask_terms[False] > mask_terms[True] + 0.1
