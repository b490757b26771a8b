"""Checkpoints: the original's layouts (stage 1 and 2) load with the original's forward pass,
ours rebuild their model from the file alone, and nothing but tensors is ever unpickled."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from experiments.common import load_model
from umr.checkpoints import CHECKPOINT_FORMAT, CheckpointError, load_file, model_config, read_model_checkpoint
from umr.nets import MeshNet
from umr.quirks import MODEL_QUIRKS, Quirks

REPO = Path(__file__).resolve().parents[1]
IMG = 64
CPU = torch.device("cpu")
ORIGINAL_FORWARD = Quirks(q5_linear_shape_mlp=True, q7_biases_unused=True, free_centre_vertices=True)

# The original's stage-2 state-dict layout, (docs/method.md §5.7).
ORIGINAL_LAYOUT = [
    r"mean_v", r"uv_sampler", r"cam_predictor\.cam_biases",
    r"encoder\.resnet_conv\.resnet\..+",
    r"encoder\.enc_conv1\.[01]\..+", r"encoder\.enc_fc\.[01]\.[01]\..+",
    r"encoder\.(mean|logvar)_fc\.[02]\..+",
    r"shape_predictor\.pred_layer\..+",
    r"cam_predictor\.fc\.[01]\.0\..+",
    r"cam_predictor\.(scale|trans|quat)_predictor\.pred_layer\..+", r"cam_predictor\.prob_predictor\..+",
    r"cam_predictor\.camera_predictor\.[0-7]\.(fc_layer\.[01]\.[01]|quat_predictor\.pred_layer|prob_predictor|scale_predictor\.pred_layer|trans_predictor\.pred_layer)\..+",
    r"texture_predictor\.enc\.[01]\.[01]\..+",
    r"texture_predictor\.decoder\.(([02468])\.2|([13579])\.[01]|10)\..+",
]
# ... and its stage-1 layout: the shape MLP as pred_layer, the single camera's heads at the top.
ORIGINAL_STAGE1_ONLY = [r"noise", r"texture_predictor\.uv_sampler", r"shape_predictor\.pred_layer\.[02468]\..+",
                        r"(quat|scale|trans)_predictor\.pred_layer\..+"]


def original_stage2_state(model):
    """Our stage-2 weights re-saved the way the original code saved them."""
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "texture_predictor.uv_sampler"}
    state["uv_sampler"] = torch.zeros(16, 656, 36, 2)  # batch-sized in the original
    for name, shape in (("scale", 1), ("trans", 2), ("quat", 4)):
        state[f"cam_predictor.{name}_predictor.pred_layer.weight"] = torch.randn(shape, 200)
        state[f"cam_predictor.{name}_predictor.pred_layer.bias"] = torch.randn(shape)
    state["cam_predictor.prob_predictor.weight"] = torch.randn(8, 200)
    state["cam_predictor.prob_predictor.bias"] = torch.randn(8)
    return state


def original_stage1_state(model):
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("shape_predictor.mlp.", "shape_predictor.pred_layer.")
        key = re.sub(r"^cam_predictor\.(quat|scale|trans)_predictor\.", r"\1_predictor.pred_layer.", key)
        state[key] = value.clone()
    state["texture_predictor.uv_sampler"] = torch.zeros(16, 656, 36, 2)
    state["noise"] = torch.zeros(16, 350)
    return state


def in_layout(state, patterns):
    return all(any(re.fullmatch(p, k) for p in patterns) for k in state if not k.endswith("num_batches_tracked"))


def trained_like(model):
    """Weights away from their init, so that every quirk of the forward pass shows."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def outputs(model, img):
    with torch.no_grad():
        return model(img)


def test_original_stage2_checkpoint_gives_the_originals_cameras(tmp_path):
    reference = trained_like(MeshNet(stage=2, img_size=IMG, pretrained_encoder=False, quirks=ORIGINAL_FORWARD))
    state = original_stage2_state(reference)
    assert in_layout(state, ORIGINAL_LAYOUT)
    assert {p for p in ORIGINAL_LAYOUT for k in state if re.fullmatch(p, k)} == set(ORIGINAL_LAYOUT)
    torch.save(state, tmp_path / "pred_net_latest.pth")
    checkpoint = read_model_checkpoint(tmp_path / "pred_net_latest.pth")
    assert (checkpoint.kind, checkpoint.stage) == ("original", 2) and "original UMR" in checkpoint.describe()
    # the original's files record no architecture: the caller's (here the image size) is used
    loaded = load_model(checkpoint, CPU, arch={"img_size": IMG})  # the paper-intent quirks for everything else
    assert loaded.quirks == ORIGINAL_FORWARD
    img = torch.rand(2, 3, IMG, IMG)
    want, got = outputs(reference, img), outputs(loaded, img)
    for key in ("cam_hypotheses", "cam", "cam_probs", "verts", "tex_flow"):
        torch.testing.assert_close(got[key], want[key], msg=key)
    # what the same weights give in the paper-intent mode: hypotheses turned by cam_biases
    wrong = MeshNet(stage=2, img_size=IMG, pretrained_encoder=False)
    wrong.load_state_dict(reference.state_dict())
    assert not torch.allclose(outputs(wrong.eval(), img)["cam_hypotheses"], want["cam_hypotheses"], atol=0.1)
    # test-time choices stay the caller's
    assert load_model(checkpoint, CPU, Quirks(q12_sampled_camera=True), {"img_size": IMG}).quirks.q12_sampled_camera
    # a checkpoint that does not fit says which keys are wrong
    del state["shape_predictor.pred_layer.bias"]
    with pytest.raises(CheckpointError, match="missing.*shape_predictor.pred_layer.bias"):
        load_model(state, CPU, arch={"img_size": IMG})


def test_original_stage1_checkpoint_loads(tmp_path):
    reference = trained_like(MeshNet(stage=1, img_size=IMG, pretrained_encoder=False, quirks=ORIGINAL_FORWARD))
    state = original_stage1_state(reference)
    assert in_layout(state, ORIGINAL_LAYOUT + ORIGINAL_STAGE1_ONLY)
    assert not any(k.startswith(("shape_predictor.mlp", "cam_predictor")) for k in state)
    torch.save(state, tmp_path / "s1.pth")
    checkpoint = read_model_checkpoint(tmp_path / "s1.pth")
    assert (checkpoint.kind, checkpoint.stage) == ("original", 1)
    loaded = load_model(checkpoint, CPU, arch={"img_size": IMG})
    assert loaded.quirks.q5_linear_shape_mlp and loaded.quirks.free_centre_vertices
    img = torch.rand(2, 3, IMG, IMG)
    want, got = outputs(reference, img), outputs(loaded, img)
    for key in ("cam", "verts", "tex_flow"):
        torch.testing.assert_close(got[key], want[key], msg=key)


def test_our_checkpoint_records_its_model():
    quirks = Quirks(q7_biases_unused=True, q12_sampled_camera=True)
    model = trained_like(MeshNet(stage=2, img_size=128, nz_feat=64, uv_height=16, uv_channels=32,
                                 pretrained_encoder=False, quirks=quirks))
    raw = {"format": CHECKPOINT_FORMAT, "stage": 2, "model": model.state_dict(), "model_config": model_config(model)}
    checkpoint = read_model_checkpoint(raw)
    assert checkpoint.kind == "umr" and checkpoint.arch["img_size"] == 128 and checkpoint.arch["uv_height"] == 16
    assert set(checkpoint.model_quirks) == set(MODEL_QUIRKS) and checkpoint.model_quirks["q7_biases_unused"]
    loaded = load_model(checkpoint, CPU)  # no architecture given: all from the checkpoint
    assert loaded.arch == model.arch
    assert loaded.quirks.q7_biases_unused and not loaded.quirks.q12_sampled_camera  # q12 is the caller's
    img = torch.rand(2, 3, 128, 128)
    torch.testing.assert_close(outputs(loaded, img)["cam_hypotheses"], outputs(model, img)["cam_hypotheses"])


class _Payload:
    """Pickles as a call that writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_file(evil)
    assert not marker.exists()
    result = subprocess.run([sys.executable, "-m", "experiments.demo", f"--model_path={evil}",
                             f"--img_path={tmp_path / 'x.png'}", f"--out_path={tmp_path}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_files_that_are_not_checkpoints_get_one_clear_line(tmp_path):
    model = MeshNet(stage=1, img_size=IMG, pretrained_encoder=False)
    good = tmp_path / "good.pth"
    torch.save(model.state_dict(), good)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], a_list)
    wrong = tmp_path / "wrong.pth"
    torch.save({"weights": 3}, wrong)
    for path, reason in ((text, "not a PyTorch checkpoint"), (truncated, "truncated"), (a_list, "list"),
                         (wrong, "neither a umr checkpoint nor a model state dict")):
        with pytest.raises(CheckpointError, match=reason) as err:
            read_model_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert read_model_checkpoint(good).kind == "state"


@pytest.fixture(scope="module")
def data_dir(synth_set):
    return synth_set(seed=5, num_train=4, num_val=0, num_test=4)


def run(module, *args, check=True):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def test_trained_checkpoint_is_evaluated_with_only_model_path(data_dir, tmp_path):
    data = ["--dataset=synth_birds", f"--cub_dir={data_dir / 'CUB_200_2011'}", f"--cub_cache_dir={data_dir / 'cachedir' / 'cub'}",
            "--n_data_workers=0"]
    run("experiments.train_s1", *data, f"--scops_path={data_dir / 'scops'}", "--img_size=64", "--image_size=64",
        "--nz_feat=64", "--uv_height=16", "--uv_channels=32", "--quirks=q5_linear_shape_mlp", "--batch_size=2",
        "--num_iter=2", "--nopretrained_encoder", "--texture_loss=l1", "--val_freq=0", "--display_freq=0",
        "--name=s1", f"--checkpoint_dir={tmp_path}", f"--vis_dir={tmp_path / 'vis'}")
    ckpt = tmp_path / "s1" / "pred_net_latest.pth"
    config = torch.load(ckpt, map_location="cpu", weights_only=True)["model_config"]
    assert config["img_size"] == 64 and config["nz_feat"] == 64 and config["quirks"]["q5_linear_shape_mlp"]

    result = run("experiments.test_iou", *data, "--split=test", f"--model_path={ckpt}")
    assert "umr stage-1 checkpoint (64 px; model quirks: q5_linear_shape_mlp)" in result.stdout
    assert json.loads((tmp_path / "s1" / "test_iou.json").read_text())["num_images"] == 4
    photo = sorted((data_dir / "CUB_200_2011" / "images").glob("*/*.jpg"))[0]
    run("experiments.demo", f"--model_path={ckpt}", f"--img_path={photo}", f"--out_path={tmp_path / 'demo'}",
        "--turntable_frames=2")
    assert Image.open(tmp_path / "demo" / "render.png").size == (64, 64)
    # a flag that contradicts the checkpoint stops, naming both values
    for flag, given in (("img_size", 128), ("nz_feat", 200)):
        result = run("experiments.test_iou", *data, "--split=test", f"--model_path={ckpt}", f"--{flag}={given}",
                     check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"--{flag} {given}" in result.stderr and f"{flag} {64}" in result.stderr
