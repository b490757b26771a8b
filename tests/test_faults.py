"""Nothing lost, nothing silently wrong: runs, evaluations and the demo under faults and bad
input, on tiny synthetic data at 64 px (one test per fault)."""
import fcntl
import json
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from umr.data.cub import CUBDataset, DataError, DataWarning, read_image
from umr import trainer as T
from umr.distributed import Context

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def data_dir(synth_set):
    return synth_set(seed=11, num_train=8, num_val=5, num_test=4)


def data_flags(root, scops=True):
    return ["--dataset=synth_birds", f"--cub_dir={root / 'CUB_200_2011'}", f"--cub_cache_dir={root / 'cachedir' / 'cub'}",
            *([f"--scops_path={root / 'scops'}"] if scops else []), f"--img_size={SIZE}", f"--image_size={SIZE}",
            "--n_data_workers=0"]


def train_flags(root, out, name, *extra):
    return [*data_flags(root), f"--name={name}", f"--checkpoint_dir={out}", f"--vis_dir={out / 'vis'}",
            "--batch_size=4", "--nopretrained_encoder", "--texture_loss=l1", "--print_freq=1", "--save_latest_freq=0",
            "--val_freq=0", "--display_freq=0", "--uv_height=16", "--uv_channels=32", *extra]


def run(module, *args, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def one_line_error(result, *needles):
    """Exit status 2 and one 'error:' line naming what it should, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def small_trainer(data_dir, out, **settings):
    from umr.nets import MeshNet
    from umr.objectives import ObjectiveConfig, Stage1Objective

    dataset = CUBDataset(data_dir / "CUB_200_2011", data_dir / "cachedir" / "cub", img_size=SIZE)
    torch.manual_seed(0)
    model = MeshNet(stage=1, img_size=SIZE, pretrained_encoder=False, uv_height=16, uv_channels=32)
    objective = Stage1Objective(model, ObjectiveConfig.for_stage(1, image_size=SIZE, texture_loss="l1", use_gan=False))
    config = dict(name="run", checkpoint_dir=str(out), vis_dir=str(out / "vis"), batch_size=4, num_epochs=1,
                  save_latest_freq=1, display_freq=0, n_data_workers=0)
    return T.Trainer(T.TrainSettings(**{**config, **settings}), model, objective, dataset,
                     Context(0, 1, 0, torch.device("cpu")))


# 1 ------------------------------------------------------------------------------------------
def test_a_diverged_update_never_replaces_the_last_good_checkpoint(data_dir, tmp_path):
    trainer = small_trainer(data_dir, tmp_path)
    step = trainer.optimizer.step

    def diverging_step(*args, **kwargs):
        step(*args, **kwargs)
        if trainer.step == 2:  # the update of step 2 (a save step) leaves NaN weights
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer.optimizer.step = diverging_step
    with pytest.raises(FloatingPointError, match="not finite after step 2.*Last good checkpoint"):
        trainer.run()
    saved = T.load_checkpoint(trainer.latest_path)
    assert saved["step"] == 1 and all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_a_kill_during_the_guarded_save_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    trainer = small_trainer(data_dir, tmp_path)
    real_save = torch.save

    def killed_at_step_2(obj, f, *args, **kwargs):
        if obj.get("step") == 2:
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert T.load_checkpoint(trainer.latest_path)["step"] == 1
    assert not list(tmp_path.glob("run/*.tmp"))


# 2 ------------------------------------------------------------------------------------------
def test_a_folder_that_holds_a_run_is_refused_unless_resume_or_overwrite(data_dir, tmp_path):
    flags = train_flags(data_dir, tmp_path, "r", "--num_iter=2")
    run("experiments.train_s1", *flags)
    log = tmp_path / "r" / "loss_log.jsonl"
    before = log.read_text()
    one_line_error(run("experiments.train_s1", *flags, check=False), "already holds a run", "--resume", "--overwrite")
    assert log.read_text() == before  # nothing appended, nothing replaced
    run("experiments.train_s1", *train_flags(data_dir, tmp_path, "r", "--num_iter=1"), "--overwrite")
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1]
    assert T.load_checkpoint(tmp_path / "r" / "pred_net_latest.pth")["step"] == 1
    # a second run in the same folder at the same time is refused while the first holds the lock
    with open(tmp_path / "r" / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(run("experiments.train_s1", *flags, "--resume", check=False), "in use by a training run")


# 3 ------------------------------------------------------------------------------------------
def test_an_empty_split_is_an_error(data_dir, tmp_path):
    # 8 training images, batch 16: no batch at all (the run used to 'train' 500 empty epochs)
    result = run("experiments.train_s1", *train_flags(data_dir, tmp_path, "e", "--batch_size=16", "--num_epochs=2"),
                 check=False)
    one_line_error(result, "train split has 8 image(s)", "train_cub_cleaned.mat", "--batch_size 16")
    assert not (tmp_path / "e" / "pred_net_latest.pth").exists()
    empty = tmp_path / "empty"
    shutil.copytree(data_dir, empty)
    import scipy.io

    scipy.io.savemat(empty / "cachedir" / "cub" / "data" / "test_cub_cleaned.mat", {"images": np.zeros((0,))})
    scipy.io.savemat(empty / "cachedir" / "cub" / "sfm" / "anno_test.mat", {"sfm_anno": np.zeros((0,))})
    result = run("experiments.test_iou", *data_flags(empty, scops=False), "--split=test", "--oracle",
                 f"--results_eval_dir={tmp_path}", check=False)
    one_line_error(result, "test split has no images", "test_cub_cleaned.mat")


# 4 ------------------------------------------------------------------------------------------
def test_evaluation_results_record_what_was_measured(data_dir, tmp_path):
    common = [*data_flags(data_dir, scops=False), "--split=test", "--oracle", f"--results_eval_dir={tmp_path}",
              "--name=o"]
    result = run("experiments.test_kp", *common, "--mode=cam", "--number_pairs=5", "--batch_size=2",
                 "--max_eval_iter=2")
    assert "over 2 pairs (of 5: --max_eval_iter)" in result.stdout
    record = json.loads((tmp_path / "o" / "test_kp_cam.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert record["number_pairs"] == 2 and record["number_pairs_requested"] == 5 and record["split_images"] == 4
    assert record["evaluated"]["split"] == "test" and record["evaluated"]["max_eval_iter"] == 2
    assert record["evaluated"]["cub_cache_dir"] == str((data_dir / "cachedir" / "cub").resolve())
    # no pair to evaluate, or more pairs than distinct pairs: refused before any work
    assert run("experiments.test_kp", *common, "--number_pairs=0", check=False).returncode != 0
    one_line_error(run("experiments.test_kp", *common, "--number_pairs=13", check=False), "12 distinct ordered pairs")
    # results that cannot be written stop the evaluation at the start, naming --results_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run("experiments.test_iou", *common, f"--results_dir={blocker / 'sub'}", check=False)
    one_line_error(result, "--results_dir")
    assert "test_iou: average" not in result.stdout


# 5 ------------------------------------------------------------------------------------------
def test_resume_with_another_batch_size_is_refused(data_dir, tmp_path):
    run("experiments.train_s1", *train_flags(data_dir, tmp_path, "b", "--num_iter=1", "--num_epochs=3"))
    result = run("experiments.train_s1", *train_flags(data_dir, tmp_path, "b", "--num_iter=3", "--num_epochs=3"),
                 "--resume", "--batch_size=2", check=False)
    one_line_error(result, "--batch_size 4", "this run has 2")
    assert T.load_checkpoint(tmp_path / "b" / "pred_net_latest.pth")["step"] == 1


# 6 ------------------------------------------------------------------------------------------
def test_16_bit_and_transparent_photos(tmp_path):
    gray = np.full((20, 30), 30000, dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    image = read_image(tmp_path / "gray16.png")
    assert image.shape == (20, 30, 3) and np.allclose(image, 30000 / 65535, atol=1e-6)  # not clipped to white
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, but transparent on the left half
    rgba[:, 5:, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert np.allclose(image[:, :5], 1.0) and np.allclose(image[:, 5:], [1.0, 0.0, 0.0])


def test_demo_says_it_composited_a_transparent_photo(data_dir, tmp_path):
    from umr.nets import MeshNet

    checkpoint = tmp_path / "model.pth"
    torch.save(MeshNet(stage=2, img_size=SIZE, pretrained_encoder=False, uv_height=16, uv_channels=32).state_dict(),
               checkpoint)
    photo = sorted((data_dir / "CUB_200_2011" / "images").glob("*/*.jpg"))[0]
    rgba = tmp_path / "rgba.png"
    Image.open(photo).convert("RGBA").save(rgba)
    result = run("experiments.demo", f"--model_path={checkpoint}", f"--img_path={rgba}", f"--out_path={tmp_path / 'd'}",
                 f"--img_size={SIZE}", f"--image_size={SIZE}", "--uv_height=16", "--uv_channels=32",
                 "--turntable_frames=2")
    assert "composited over white" in result.stdout


# 7 ------------------------------------------------------------------------------------------
def test_suspect_masks_and_part_maps_are_named(data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    ds = CUBDataset(root / "CUB_200_2011", root / "cachedir" / "cub", img_size=SIZE, scops_path=root / "scops")
    ds.anno[0].mask = np.zeros_like(ds.anno[0].mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds[0]
    assert any(issubclass(w.category, DataWarning) and "empty mask" in str(w.message) and "train_cub_cleaned.mat"
               in str(w.message) for w in caught)
    path = ds._part_file(1)[0]
    assert path.suffix == ".npz"  # the synthetic set's full-image maps
    prob = np.load(path)["prob"]
    bad = prob.astype(np.float32)  # 0..255 values stored as float
    bad[0, 0, 0] = 255
    np.savez(path, prob=bad)
    with pytest.raises(DataError, match=f"{path}.*values from .* to 255"):
        ds[1]
    bad = (prob / 255.0).astype(np.float32)
    bad[0, 0, 0] = np.nan
    np.savez(path, prob=bad)
    with pytest.raises(DataError, match=f"{path}.*NaN"):
        ds[1]


# 8 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, flag", [
    ("experiments.train_s1", "--batch_size=0"),
    ("experiments.train_s1", "--mask_loss_wt=-1"),
    ("experiments.train_s2", "--vertex_loss_wt=-0.5"),
    ("experiments.train_s2", "--num_hypo_cams=0"),
    ("experiments.test_kp", "--number_pairs=0"),
])
def test_flags_that_make_no_sense_are_refused_at_parse_time(module, flag):
    result = run(module, flag, check=False, timeout=120)
    name = flag.split("=")[0]
    assert result.returncode != 0 and f"flag {name}=" in result.stderr and "Traceback" not in result.stderr


# 9 ------------------------------------------------------------------------------------------
def test_one_line_for_device_folder_and_worker_errors(data_dir, tmp_path):
    if not torch.cuda.is_available():
        one_line_error(run("experiments.train_s1", *train_flags(data_dir, tmp_path, "c"), "--device=cuda", check=False),
                       "--device cuda")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run("experiments.train_s1", *train_flags(data_dir, blocker, "w"), check=False)
    one_line_error(result, "--checkpoint_dir", str(blocker))
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    for image in sorted((broken / "CUB_200_2011" / "images").glob("*/*train*.jpg"))[:2]:
        image.unlink()
    flags = [f for f in train_flags(broken, tmp_path, "x", "--num_iter=2") if not f.startswith("--n_data_workers")]
    one_line_error(run("experiments.train_s1", *flags, "--n_data_workers=2", check=False), "image not found", "--cub_dir")


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(data_dir, tmp_path):
    flags = train_flags(data_dir, tmp_path, "i", "--num_iter=400", "--num_epochs=200")
    process = subprocess.Popen([sys.executable, "-m", "experiments.train_s1", *flags], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "i" / "loss_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "checkpoint saved to" in stderr and "--resume" in stderr
    saved = T.load_checkpoint(tmp_path / "i" / "pred_net_latest.pth")
    assert 2 <= saved["step"] < 400 and not saved["finished"]
    run("experiments.train_s1", *train_flags(data_dir, tmp_path, "i", f"--num_iter={saved['step'] + 1}",
                                              "--num_epochs=200"), "--resume")
    assert T.load_checkpoint(tmp_path / "i" / "pred_net_latest.pth")["step"] == saved["step"] + 1
