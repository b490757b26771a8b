"""The quirk switches: --compat turns all on, --quirks each one alone, and the switches that the
other test files do not reach (loaders, avg_uv's exemplar view, the extra keypoint pair, the
objective's wiring) each change what they should."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from umr.category import BIRDS
from umr.geometry import quat_to_matrix
from umr.nets import MeshNet
from umr.objectives import ObjectiveConfig, Stage2Objective
from umr.quirks import MODEL_QUIRKS, QUIRK_NAMES, Quirks

REPO = Path(__file__).resolve().parents[1]


def test_compat_turns_every_quirk_on_and_names_turn_on_one_each():
    assert Quirks().enabled() == [] and Quirks.original().enabled() == list(QUIRK_NAMES)
    assert Quirks.from_flags(SimpleNamespace(compat=True, quirks=[])) == Quirks.original()
    for name in QUIRK_NAMES:
        assert Quirks.from_names([name]).enabled() == [name]
    with pytest.raises(ValueError, match="unknown quirk.*q7_biases_unused"):
        Quirks.from_names(["q7_bias"])
    recorded = {name: True for name in MODEL_QUIRKS}
    mixed = Quirks(q12_sampled_camera=True).with_model_quirks(recorded)
    assert mixed.enabled() == sorted(set(MODEL_QUIRKS) | {"q12_sampled_camera"}, key=QUIRK_NAMES.index)
    parsed = {**dataclasses.asdict(ObjectiveConfig.for_stage(2)), "compat": False, "quirks": ["q4_texture_moves_geometry"]}
    config = ObjectiveConfig.from_flags(SimpleNamespace(**parsed), stage=2)
    assert config.quirks.enabled() == ["q4_texture_moves_geometry"]


def test_unknown_quirk_flag_is_refused_at_parse_time():
    result = subprocess.run([sys.executable, "-m", "experiments.test_iou", "--quirks=q7_bias"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown quirk name" in result.stderr and "q7_biases_unused" in result.stderr


@pytest.fixture(scope="module")
def synth(synth_set):
    return synth_set(seed=2, num_train=2, num_val=0, num_test=6)


def test_q13_test_loaders_mirror(synth):
    from experiments.common import build_dataset

    flags = SimpleNamespace(dataset="synth_birds", cub_dir=str(synth / "CUB_200_2011"),
                            cub_cache_dir=str(synth / "cachedir" / "cub"),
                            img_size=64, padding_frac=0.05, jitter_frac=0.05, scops_path="", data_seed=0,
                            compat=False, quirks=[])
    assert not build_dataset(flags, "test", use_scops=False, train=False).pipeline.mirror
    flags.quirks = ["q13_shuffled_test_loaders"]
    assert build_dataset(flags, "test", use_scops=False, train=False).pipeline.mirror


def test_q27_evaluates_one_pair_more(synth, tmp_path):
    counts = {}
    for quirks in ("", "q27_extra_pair"):
        name = quirks or "default"
        subprocess.run([sys.executable, "-m", "experiments.test_kp", "--oracle", "--mode=cam", "--number_pairs=3",
                        f"--quirks={quirks}", "--dataset=synth_birds", f"--cub_dir={synth / 'CUB_200_2011'}", "--split=test",
                        f"--cub_cache_dir={synth / 'cachedir' / 'cub'}", "--img_size=64", "--image_size=64",
                        "--n_data_workers=0", f"--results_eval_dir={tmp_path}", f"--name={name}"],
                       cwd=REPO, check=True, capture_output=True, timeout=300)
        counts[name] = json.loads((tmp_path / name / "test_kp_cam.json").read_text())["number_pairs"]
    assert counts == {"default": 3, "q27_extra_pair": 4}


def test_q8_exemplar_view_is_the_mirrored_mesh_in_the_mirrored_photo():
    from experiments.avg_uv import exemplar_view

    cam = torch.cat([torch.tensor([[0.8, 0.1, -0.2]]), torch.nn.functional.normalize(torch.randn(1, 4), dim=-1)], 1)
    photo = torch.rand(1, 3, 8, 8)
    same_cam, same_photo = exemplar_view(cam, photo, flipped=False)
    assert torch.equal(same_cam, cam) and torch.equal(same_photo, photo)
    flipped_cam, flipped_photo = exemplar_view(cam, photo, flipped=True)
    assert torch.equal(flipped_photo, photo.flip(-1))
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    torch.testing.assert_close(quat_to_matrix(flipped_cam[:, 3:])[0], mirror @ quat_to_matrix(cam[:, 3:])[0] @ mirror)
    torch.testing.assert_close(flipped_cam[:, :3], cam[:, :3] * torch.tensor([1.0, -1.0, 1.0]))


def test_detached_probs_stops_the_vertex_loss_training_the_probabilities():
    size = 64

    def prob_grad(quirks):
        torch.manual_seed(0)
        model = MeshNet(stage=2, img_size=size, pretrained_encoder=False)
        config = ObjectiveConfig.for_stage(2, image_size=size, texture_loss="l1", use_gan=False, quirks=quirks)
        parts = {p: torch.arange(i * 10, i * 10 + 10) for i, p in enumerate(BIRDS.part_names)}
        objective = Stage2Objective(model, config, torch.randint(0, 5, (1280, 36)), parts)
        batch = {"img": torch.rand(2, 3, size, size), "mask": torch.zeros(2, size, size),
                 "mask_dt": torch.rand(2, size, size), "part_prob": torch.rand(2, 5, size, size),
                 **{f"{p}_points": torch.rand(2, 10, 2) - 0.5 for p in BIRDS.part_names}}
        batch["mask"][:, 16:48, 10:54] = 1
        _, terms = objective(model(batch["img"]), batch, 0)
        terms["vertex"].backward()
        grads = [h.prob_predictor.weight.grad for h in model.cam_predictor.camera_predictor]
        return sum(float(g.abs().sum()) for g in grads if g is not None)

    assert prob_grad(Quirks()) > 0
    assert prob_grad(Quirks(detached_probs=True)) == 0


def test_hidden_keypoints_let_a_hidden_vertex_carry_the_keypoint():
    from umr.evaluation import transfer_keypoints

    # vertex 0 lies behind the surface (the z-buffer holds vertex 1's depth everywhere)
    verts = torch.tensor([[[0.3, 0.0, 0.5], [0.2, 0.0, -0.5]]])
    cam = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0]])
    pred = {"verts": verts, "template": verts, "cam": cam, "alpha": torch.ones(1, 32, 32),
            "depth": torch.full((1, 64, 64), -0.5)}
    kp = torch.tensor([[[0.3, 0.0]]])  # on vertex 0
    for quirks, x in ((Quirks(), 0.2), (Quirks(hidden_keypoints=True), 0.3)):
        moved = transfer_keypoints(pred, pred, kp, "cam", 32, visible_only=not quirks.hidden_keypoints)
        assert abs(float(moved[0, 0, 0]) - x) <= 1 / 31 + 1e-6
