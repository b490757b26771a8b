"""The pose benchmarks' own pieces: the supervised-pose bound's loss and its end-to-end run."""
import json

import torch

from benchmarks import pose_supervised as PS
from umr.checkpoints import CHECKPOINT_FORMAT, model_config
from umr.geometry import quat_to_matrix
from umr.nets import MeshNet


def random_rotations(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(*shape, 4, generator=g, dtype=torch.float64), dim=-1)
    return quat_to_matrix(q)


def test_soft_supervised_loss_is_the_probability_weighted_chordal_distance():
    rots, true = random_rotations(3, 4, seed=1), random_rotations(3, seed=2)
    probs = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1)
    expected = sum(probs[b, k] * ((rots[b, k] - true[b]) ** 2).sum() for b in range(3) for k in range(4)) / 3
    assert torch.allclose(PS.supervised_pose_loss(rots, probs, true, "soft"), expected)
    # a hypothesis at the truth with all the probability costs nothing
    rots[:, 2] = true
    one_hot = torch.nn.functional.one_hot(torch.full((3,), 2), 4).double()
    assert PS.supervised_pose_loss(rots, one_hot, true, "soft") == 0


def test_best_assignment_trains_only_the_closest_hypothesis_and_points_the_probabilities_to_it():
    true = random_rotations(2, seed=3)
    rots = random_rotations(2, 4, seed=4)
    rots[0, 1] = true[0] @ quat_to_matrix(torch.nn.functional.normalize(torch.tensor([1.0, 0.1, 0.0, 0.0], dtype=torch.float64), dim=0))  # 11°
    rots[1, 3] = true[1]
    rots.requires_grad_(True)
    logits = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    PS.supervised_pose_loss(rots, torch.softmax(logits, 1), true, "best").backward()
    moved = rots.grad.flatten(2).abs().sum(-1) > 0
    assert moved.tolist() == [[False, True, False, False], [False, False, False, False]]  # row 1 is already exact
    # the cross-entropy raises the closest hypothesis' probability and lowers the others'
    assert (logits.grad[0, 1] < 0) and (logits.grad[0, [0, 2, 3]] > 0).all()
    assert (logits.grad[1, 3] < 0) and (logits.grad[1, [0, 1, 2]] > 0).all()


def test_single_trains_the_first_hypothesis_only():
    true = random_rotations(2, seed=5)
    rots = random_rotations(2, 3, seed=6).requires_grad_(True)
    loss = PS.supervised_pose_loss(rots, torch.full((2, 3), 1 / 3, dtype=torch.float64), true, "single")
    assert torch.allclose(loss, ((rots[:, 0] - true) ** 2).flatten(1).sum(1).mean())


def test_supervised_bound_runs_end_to_end_and_reports_test_and_training_errors(synth_set, tmp_path, capsys, monkeypatch):
    data = synth_set(0, 16, 2, 8, photo_size=96)
    model = MeshNet(stage=1, img_size=64, pretrained_encoder=False, uv_height=32, uv_channels=64)
    path = tmp_path / "s1.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model_config(model)}, path)
    monkeypatch.setattr("sys.argv", ["pose_supervised", "--init_from", str(path), "--data", str(data),
                                     "--num_iter", "4", "--batch_size", "4", "--eval_freq", "2", "--assign", "best"])
    PS.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["iter"] for line in lines] == [2, 4]
    for line in lines:
        assert 0 <= line["rot_err_median"] <= 180 and 0 <= line["train"]["rot_err_median"] <= 180
        assert torch.isfinite(torch.tensor(line["loss"]))


def test_pose_diagnosis_chooses_the_hypothesis_whose_silhouette_fits(synth_set, tmp_path):
    """``choices_by_losses``: of hypotheses that put the mesh out of the frame and one that puts it
    where the photo's mask is, every rule picks the latter for every photo."""
    from torch.utils.data import default_collate

    from benchmarks.pose_diagnosis import CHOICE_RULES, choices_by_losses
    from umr.data.cub import CUBDataset
    from umr.data.synth_birds import truth_template
    from umr.renderer import make_renderer

    data = synth_set(0, 16, 2, 8, photo_size=96)
    stemp = tmp_path / "truth_template"
    truth_template(data / "gt" / "train.npz", stemp)
    torch.manual_seed(0)
    model = MeshNet(stage=2, img_size=64, pretrained_encoder=False, uv_height=32, uv_channels=64).eval()
    dataset = CUBDataset(data / "CUB_200_2011", data / "cachedir" / "cub", split="test", img_size=64,
                         scops_path=data / "scops", mirror=False)
    batch = default_collate([dataset[i] for i in range(4)])
    N, K, right = 4, 8, 5
    base = torch.tensor([0.8, 0.0, 0.0, 0.7071, 0.7071, 0.0, 0.0])
    hyps = base.repeat(N, K, 1)
    hyps[:, :, 1] = 5.0  # out of the frame
    hyps[:, right, 1] = 0.0
    with torch.no_grad():  # the photos' masks: the model's own mesh seen by the right hypothesis
        verts = model(batch["img"].float())["verts"]
        batch["mask"] = (make_renderer(64)(verts, model.faces, hyps[:, right]).image[:, 3] > 0.5).float()
    choices = choices_by_losses(model, batch, hyps, stemp)
    assert set(choices) == set(CHOICE_RULES)
    for rule in CHOICE_RULES:  # every rule's silhouette, vertex and part terms are worst out of the frame
        assert choices[rule].tolist() == [right] * N, rule


def test_prob_refit_learns_a_choice_the_features_carry():
    """``fit_probability_layers``: from layers that pick hypothesis 0 for every photo, the refit
    picks each photo's target where one feature of the target's hypothesis marks it."""
    from benchmarks.prob_refit import fit_probability_layers

    g = torch.Generator().manual_seed(0)
    N, K, F = 64, 4, 6
    target = torch.randint(0, K, (N,), generator=g)
    features = 0.1 * torch.randn(N, K, F, generator=g)
    features[torch.arange(N), target, 2] += 1.0
    weight, bias = torch.zeros(K, F), torch.tensor([3.0, 0.0, 0.0, 0.0])
    assert ((features * weight).sum(-1) + bias).argmax(1).eq(0).all()
    weight, bias = fit_probability_layers(features, weight, bias, target, steps=200, lr=0.05)
    assert torch.equal(((features * weight[None]).sum(-1) + bias).argmax(1), target)


def test_prob_refit_runs_end_to_end(synth_set, tmp_path, capsys, monkeypatch):
    from benchmarks import prob_refit
    from umr.data.synth_birds import truth_template

    data = synth_set(0, 16, 2, 8, photo_size=96)
    stemp = tmp_path / "truth_template"
    truth_template(data / "gt" / "train.npz", stemp)
    model = MeshNet(stage=2, img_size=64, pretrained_encoder=False, uv_height=32, uv_channels=64)
    path = tmp_path / "s2.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model_config(model)}, path)
    monkeypatch.setattr("sys.argv", ["prob_refit", "--model_path", str(path), "--data", str(data),
                                     "--stemp_path", str(stemp), "--steps", "50"])
    prob_refit.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_images"] == {"train": 16, "test": 8}
    for key in ("rot_err_median", "refit_rot_err_median", "by_losses_rot_err_median"):
        assert 0 <= result[key] <= 180
    # fit on the training photos' own choice, the refit layers agree with it more than before
    assert result["choice_accuracy"]["after"]["train"] >= result["choice_accuracy"]["before"]["train"]


def test_pose_diagnosis_takes_stage1_models_and_reports_which_way_side_views_face(synth_set, tmp_path, capsys,
                                                                                  monkeypatch):
    from benchmarks import pose_diagnosis

    data = synth_set(0, 16, 2, 8, photo_size=96)
    torch.manual_seed(0)
    model = MeshNet(stage=1, img_size=64, pretrained_encoder=False, uv_height=32, uv_channels=64)
    with torch.no_grad():  # one fixed view for every photo: the bird faces one way in all of them
        model.cam_predictor.quat_predictor.weight.zero_()
        model.cam_predictor.quat_predictor.bias.copy_(torch.tensor([0.7071, 0.7071, 0.0, 0.0]))
    path = tmp_path / "s1.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model_config(model)}, path)
    monkeypatch.setattr("sys.argv", ["pose_diagnosis", "--model_path", str(path), "--data", str(data)])
    pose_diagnosis.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["chosen"] == [8] and result["oracle_rot_err_median"] == result["rot_err_median"]
    facing = result["facing"]
    assert 0 < facing["n"] <= 8 and facing["predicted_right"] in (0.0, 1.0)
    assert abs(facing["agree"] - (facing["true_right"] if facing["predicted_right"] else 1 - facing["true_right"])) < 1e-3
