"""CUB loaders on a tiny synthetic set generated here (nothing is committed)."""
import shutil

import numpy as np
import pytest
import scipy.io
import torch

from umr.data import synth_birds
from umr.data.base import Sample, barrier_distance_transform, mirror_sample
from umr.data.cub import CUBDataset, DataError, KeypointPairs, make_loader
from umr.category import BIRDS, CategorySpec
from umr.geometry import quat_to_matrix

COUNTS = dict(num_train=6, num_val=2, num_test=3)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth_birds.generate(out, seed=3, photo_size=160, workers=1, progress=False, **COUNTS)
    return out


def dataset(root, split="train", **kwargs):
    kwargs.setdefault("scops_path", root / "scops")
    return CUBDataset(root / "CUB_200_2011", root / "cachedir" / "cub", split=split, **kwargs)


def test_item_shapes_ranges_and_dtypes(synth):
    ds = dataset(synth, img_size=64)
    assert len(ds) == 6 and len(dataset(synth, "test")) == 3
    item = ds[0]
    assert item["img"].shape == (3, 64, 64) and item["img"].dtype == np.float32
    assert 0 <= item["img"].min() and item["img"].max() <= 1
    assert item["mask"].shape == (64, 64) and 0 <= item["mask"].min() and item["mask"].max() <= 1
    assert item["mask"].max() == 1 and item["mask"].min() == 0
    assert item["mask_dt"].shape == (64, 64) and 0 < item["mask_dt"].min() and item["mask_dt"].max() <= 1
    assert item["kp"].shape == (15, 3) and np.all(np.abs(item["kp"][:, :2]) <= 1)
    assert set(np.unique(item["kp"][:, 2])) <= {0.0, 1.0}
    assert np.all(item["kp"][item["kp"][:, 2] == 0] == 0)  # invisible rows are zero
    assert item["sfm_pose"].shape == (7,) and abs(np.linalg.norm(item["sfm_pose"][3:]) - 1) < 1e-5
    assert item["part_prob"].shape == (5, 64, 64)
    np.testing.assert_allclose(item["part_prob"].sum(0), 1, atol=0.03)
    for part, n in (("head", 10), ("neck", 10), ("back", 30), ("belly", 30)):
        assert item[f"{part}_center"].shape == (2,)
        assert item[f"{part}_points"].shape == (n, 2) and np.all(np.abs(item[f"{part}_points"]) <= 1)
    batch = next(iter(make_loader(ds, batch_size=3, shuffle=False, drop_last=False, num_workers=0)))
    assert batch["img"].shape == (3, 3, 64, 64) and batch["img"].dtype == torch.float32


def test_category_spec_refuses_inconsistent_data():
    good = dict(name="toy", keypoint_names=("L", "R", "C"), keypoint_mirror=(1, 0, 2), part_names=("a", "b"),
                part_colours=((0, 0, 0), (1, 0, 0), (0, 1, 0)), part_points={"a": 3, "b": 4})
    toy = CategorySpec(**good)
    assert toy.num_keypoints == 3 and toy.num_parts == 2 and toy.part_labels == ("background", "a", "b")
    assert toy.part_weight_vector() == (0.0, 0.0, 0.0)
    bad = [({"keypoint_mirror": (1, 2, 0)}, "own inverse"), ({"keypoint_mirror": (0, 0, 2)}, "permutation"),
           ({"keypoint_mirror": (1, 0)}, "permutation"), ({"part_colours": ((0, 0, 0), (1, 0, 0))}, "3 RGB triples"),
           ({"part_colours": ((0, 0), (1, 0, 0), (0, 1, 0))}, "3 RGB triples"),
           ({"part_points": {"a": 3}}, "part_points"), ({"part_loss_weights": {"c": 1.0}}, "unknown part"),
           ({"vertex_loss_weights": {"c": 1.0}}, "unknown part")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            CategorySpec(**{**good, **change})


def test_birds_category_matches_the_synthetic_generator(synth):
    # the mirror swaps exactly the L*/R* keypoints, and the generator writes the category's names
    for k, name in enumerate(BIRDS.keypoint_names):
        twin = BIRDS.keypoint_names[BIRDS.keypoint_mirror[k]]
        swapped = {"L": "R", "R": "L"}.get(name[0], "") + name[1:] if name[0] in "LR" and name[1].isupper() else name
        assert twin == swapped, (name, twin)
    assert len(synth_birds.KEYPOINT_ANCHORS) == BIRDS.num_keypoints
    gt = np.load(synth / "gt" / "train.npz")
    assert tuple(gt["keypoint_names"]) == BIRDS.keypoint_names and tuple(gt["part_labels"]) == BIRDS.part_labels
    assert set(np.unique(gt["face_parts"])) == set(range(1, BIRDS.num_parts + 1))


def test_mirroring_twice_is_identity():
    rng = np.random.default_rng(0)
    kp = np.concatenate([rng.uniform(0, 31, (15, 2)), rng.integers(0, 2, (15, 1))], axis=1)
    sample = Sample(rng.random((32, 32, 3)), rng.random((32, 32)), kp, 1.3, rng.random(2) * 30,
                    np.linalg.qr(rng.normal(size=(3, 3)))[0], rng.random((32, 32, 5)))
    once = mirror_sample(sample)
    assert once.mirrored and np.array_equal(once.image, sample.image[:, ::-1])
    np.testing.assert_array_equal(once.kp[:, 0], 31 - sample.kp[BIRDS.keypoint_mirror_array, 0])
    twice = mirror_sample(once)
    assert not twice.mirrored
    for field in ("image", "mask", "kp", "sfm_trans", "sfm_rot", "parts"):
        np.testing.assert_allclose(getattr(twice, field), getattr(sample, field), atol=1e-12)


@pytest.mark.parametrize("split,mirror", [("train", True), ("train", False), ("test", None), ("val", True)])
def test_sfm_pose_projects_true_keypoints_onto_loaded_keypoints(synth, split, mirror):
    # every augmentation (jitter on train, mirroring) keeps keypoints and the sfm pose consistent
    size = 96
    ds = dataset(synth, split, img_size=size, mirror=mirror)
    gt = np.load(synth / "gt" / f"{split}.npz")
    seen_mirrored = set()
    for draw in range(4):
        ds.set_epoch(draw)
        for index in range(len(ds)):
            item = ds[index]
            kp3d = gt["kp3d_sfm"][index]
            if item["mirrored"]:
                kp3d = (kp3d * [-1, 1, 1])[BIRDS.keypoint_mirror_array]  # the mirrored bird's keypoints
            seen_mirrored.add(item["mirrored"])
            scale, trans, quat = item["sfm_pose"][0], item["sfm_pose"][1:3], item["sfm_pose"][3:]
            rot = quat_to_matrix(torch.from_numpy(quat).double()).numpy()
            projected = scale * (kp3d @ rot.T)[:, :2] + trans
            visible = item["kp"][:, 2] > 0
            assert visible.sum() >= 3
            err_px = np.abs(projected[visible] - item["kp"][visible, :2]).max() * size / 2
            assert err_px < 1.0, (index, err_px)
            # visible keypoints lie on the bird's mask
            cols = np.clip(np.round((item["kp"][visible, 0] + 1) * size / 2).astype(int), 0, size - 1)
            rows = np.clip(np.round((item["kp"][visible, 1] + 1) * size / 2).astype(int), 0, size - 1)
            padded = np.pad(item["mask"], 1)
            near = np.max([padded[rows + 1 + dr, cols + 1 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
            assert np.all(near > 0), index
    expected = {True, False} if mirror or (mirror is None and split == "train") else {False}
    assert seen_mirrored == expected


def test_full_image_part_maps_follow_the_jittered_crop(synth):
    ds = dataset(synth, img_size=64, jitter_frac=0.2, mirror=True, seed=1)
    for index in range(len(ds)):
        item = ds[index]
        foreground = 1 - item["part_prob"][0]
        inside = item["mask"] > 0.5
        assert foreground[inside].mean() > 0.8 and foreground[~inside].mean() < 0.15


def test_per_crop_part_maps_load_like_full_maps(tmp_path):
    full = tmp_path / "full"
    crop = tmp_path / "crop"
    synth_birds.generate(full, seed=4, photo_size=128, workers=1, progress=False, num_train=3, num_val=0, num_test=0)
    synth_birds.generate(crop, seed=4, photo_size=128, workers=1, progress=False, num_train=3, num_val=0, num_test=0,
                         scops_format="crop", crop_size=64)
    assert list((crop / "scops").glob("*/*_0.npy")) and not list((crop / "scops").glob("*/*.npz"))
    for index in range(3):
        a = dataset(full, img_size=64, jitter_frac=0.0, mirror=False)[index]["part_prob"]
        b = dataset(crop, img_size=64, jitter_frac=0.0, mirror=False)[index]["part_prob"]
        assert np.abs(a - b).mean() < 0.01  # same crop; only 8-bit storage differs


def test_augmentation_depends_only_on_seed_epoch_and_index(synth):
    ds = dataset(synth, img_size=64, jitter_frac=0.2)
    a = ds[1]
    torch.manual_seed(123)  # the global RNG plays no part
    b = ds[1]
    for key in ("img", "kp", "sfm_pose", "head_points"):
        np.testing.assert_array_equal(a[key], b[key])
    ds.set_epoch(1)
    assert not np.array_equal(ds[1]["sfm_pose"], a["sfm_pose"])  # another epoch, another crop
    other = dataset(synth, img_size=64, jitter_frac=0.2, seed=9)
    assert not np.array_equal(other[1]["sfm_pose"], a["sfm_pose"])


def test_part_points_are_inside_the_part(synth):
    ds = dataset(synth, img_size=64, mirror=False)
    a = ds[1]
    for part in ("head", "belly"):
        channel = {"head": 1, "belly": 4}[part]
        prob = a["part_prob"][channel] * a["mask"]
        pts = a[f"{part}_points"]
        cols = np.clip(((pts[:, 0] + 1) * 32).astype(int), 0, 63)
        rows = np.clip(((pts[:, 1] + 1) * 32).astype(int), 0, 63)
        assert np.all(prob[rows, cols] > 0)
        centre_err = np.abs(a[f"{part}_center"] - pts.mean(0)).max()
        assert centre_err < 0.5


def test_keypoint_pairs_are_deterministic(synth):
    ds = dataset(synth, "test", img_size=32, scops_path=None)
    a, b = KeypointPairs(ds, 6), KeypointPairs(ds, 6)
    np.testing.assert_array_equal(a.first, b.first)
    np.testing.assert_array_equal(a.second, b.second)
    expected = np.random.RandomState(len(ds))
    np.testing.assert_array_equal(a.first, expected.randint(len(ds), size=6))
    c = KeypointPairs(ds, 6, seed=123)
    assert not (np.array_equal(a.first, c.first) and np.array_equal(a.second, c.second))
    item = a[0]
    assert item["img"].shape == (2, 3, 32, 32) and item["kp"].shape == (2, 15, 3)
    with pytest.raises(DataError, match="more than the 6 distinct ordered pairs of the split's 3 images"):
        KeypointPairs(ds, 7)


def test_generator_is_deterministic_and_mat_round_trips(tmp_path, synth):
    again = tmp_path / "again"
    synth_birds.generate(again, seed=3, photo_size=160, workers=2, progress=False, **COUNTS)
    for rel in ("cachedir/cub/data/train_cub_cleaned.mat", "cachedir/cub/sfm/anno_train.mat"):
        first, second = scipy.io.loadmat(synth / rel), scipy.io.loadmat(again / rel)
        key = "images" if "data/" in rel else "sfm_anno"
        for field in first[key].dtype.names:
            for x, y in zip(first[key][field].ravel(), second[key][field].ravel()):
                assert np.array_equal(np.asarray(x, dtype=object).tolist(), np.asarray(y, dtype=object).tolist()) or np.array_equal(x, y)
    for name in ("verts", "kp3d", "cam_rot"):
        np.testing.assert_array_equal(np.load(synth / "gt" / "test.npz")[name], np.load(again / "gt" / "test.npz")[name])
    other = tmp_path / "other"
    synth_birds.generate(other, seed=4, photo_size=160, workers=1, progress=False, num_train=1, num_val=0, num_test=0)
    assert not np.array_equal(np.load(synth / "gt" / "train.npz")["verts"][0], np.load(other / "gt" / "train.npz")["verts"][0])


def test_mat_write_read_round_trip(tmp_path):
    records = [{
        "rel_path": "001.A/b.jpg", "mask": np.eye(4, dtype=np.uint8), "bbox": (1, 2, 3, 4),
        "parts": np.arange(45, dtype=np.float64).reshape(3, 15), "class_id": 1, "sfm_scale": 2.5,
        "sfm_trans": np.array([1.0, 2.0]), "sfm_rot": np.eye(3), "verts": np.zeros((2, 3), np.float32),
        "faces": np.zeros((1, 3), np.int64), "face_parts": np.zeros(1, np.int64), "kp3d": np.ones((15, 3)),
        "cam_rot": np.eye(3), "surface_points": np.zeros((2048, 3), np.float32),
    }]
    synth_birds.write_split(tmp_path, "train", records)
    images = scipy.io.loadmat(tmp_path / "cachedir/cub/data/train_cub_cleaned.mat", struct_as_record=False, squeeze_me=True)["images"]
    assert images.rel_path == "001.A/b.jpg"
    np.testing.assert_array_equal(images.mask, np.eye(4))
    assert (images.bbox.x1, images.bbox.y1, images.bbox.x2, images.bbox.y2) == (1, 2, 3, 4)
    np.testing.assert_array_equal(images.parts, records[0]["parts"])
    sfm = scipy.io.loadmat(tmp_path / "cachedir/cub/sfm/anno_train.mat", struct_as_record=False, squeeze_me=True)
    assert sfm["sfm_anno"].scale == 2.5 and sfm["S"].shape == (3, 15)


def copy_set(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_raise_clear_errors(synth, tmp_path):
    root = copy_set(synth, tmp_path / "broken")
    cub, cache = root / "CUB_200_2011", root / "cachedir" / "cub"
    with pytest.raises(DataError, match="--cub_dir"):
        CUBDataset(tmp_path / "nowhere", cache)
    with pytest.raises(DataError, match="--cub_cache_dir"):
        CUBDataset(cub, tmp_path / "nowhere")
    with pytest.raises(DataError, match="--split"):
        CUBDataset(cub, cache, split="holdout")
    (cache / "data" / "val_cub_cleaned.mat").unlink()
    with pytest.raises(DataError, match=r"val_cub_cleaned\.mat.*--cub_cache_dir"):
        CUBDataset(cub, cache, split="val")
    with pytest.raises(DataError, match="--scops_path"):
        CUBDataset(cub, cache, scops_path=tmp_path / "nowhere")
    # a .mat without the expected fields
    scipy.io.savemat(cache / "data" / "test_cub_cleaned.mat", {"images": np.array([{"rel_path": "x.jpg"}])})
    with pytest.raises(DataError, match=r"no field\(s\) \['mask', 'bbox', 'parts'\]"):
        CUBDataset(cub, cache, split="test")
    ds = CUBDataset(cub, cache, split="train", scops_path=root / "scops")
    # a missing image, an unreadable image
    ds.image_path(0).unlink()
    with pytest.raises(DataError, match=f"image not found: {ds.image_path(0)}.*--cub_dir"):
        ds[0]
    ds.image_path(1).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=f"could not read image {ds.image_path(1)}"):
        ds[1]
    # a SCOPS map of the wrong shape, and a missing one
    scops_file = ds._part_file(2)[0]
    np.savez(scops_file, prob=np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(DataError, match=r"has shape \(10, 10, 5\)"):
        ds[2]
    scops_file.unlink()
    with pytest.raises(DataError, match="no SCOPS part map.*--scops_path"):
        ds[2]


def test_worker_errors_surface_instead_of_hanging(synth, tmp_path):
    root = copy_set(synth, tmp_path / "broken")
    ds = dataset(root, img_size=32)
    ds.image_path(4).unlink()
    loader = make_loader(ds, batch_size=2, shuffle=False, drop_last=False, num_workers=2)
    with pytest.raises(DataError, match="image not found"):
        for _ in loader:
            pass


def test_barrier_distance_transform():
    mask = np.zeros((15, 15))
    mask[:, :7] = 1
    mask[:, 7] = 0.5  # fractional boundary: d_out = d_in = 1
    dt = barrier_distance_transform(mask)
    assert np.all((dt > 0) & (dt < 1))
    np.testing.assert_allclose(dt[:, 7], 0.5)
    assert np.all(np.diff(dt[7]) > 0)  # monotone from deep inside to far outside


def test_truth_template_is_what_a_good_semantic_template_looks_like(synth, tmp_path):
    """The template made from the 3-D truth has every part with a plausible share of the
    vertices, the head at the front and top, the belly below; the semantic losses' template
    check accepts it and refuses the same template without a head; avg_uv's labelling of its UV
    label image gives back (nearly) the same vertex labels."""
    from experiments.avg_uv import labels_from_uv
    from umr.losses import SemanticTemplate, SemanticTemplateError, check_part_vertices
    from umr.nets import MeshNet

    counts = synth_birds.truth_template(synth / "gt" / "train.npz", tmp_path, smoothing=10)
    template = SemanticTemplate(tmp_path)
    assert counts == {p: len(v) for p, v in template.vertices.items()}
    check_part_vertices(template.vertices, 642, 0.02, tmp_path)
    with pytest.raises(SemanticTemplateError, match="head 0"):
        check_part_vertices({**template.vertices, "head": template.vertices["head"][:0]}, 642, 0.02, tmp_path)
    verts = MeshNet(stage=2, pretrained_encoder=False, mean_shape=template.mean_v).get_mean_shape()
    centre = {p: verts[v].mean(0) for p, v in template.vertices.items()}
    head, belly, back = centre["head"], centre["belly"], centre["back"]
    assert head[0] > 0.3 and head[0] > back[0] and head[2] > belly[2]  # x forward, z up
    assert belly[2] < back[2]
    assert template.mean_v[:, 1].min() >= 0  # the half template: centre and right (y >= 0) vertices
    # avg_uv's face and vertex labelling of the UV label image as a (one-hot) distribution
    model = MeshNet(stage=1, img_size=64, pretrained_encoder=False)
    prob = torch.nn.functional.one_hot(torch.from_numpy(np.array(template.seg)).long(), 5).permute(2, 0, 1).float()
    _, _, vertex_labels = labels_from_uv(prob, model)
    truth = np.zeros(642, dtype=np.int64)
    for k, part in enumerate(BIRDS.part_names, start=1):
        truth[template.vertices[part].numpy()] = k
    assert (vertex_labels == truth).mean() > 0.9


def test_avg_uv_render_source_reads_each_face_its_own_part(synth, tmp_path):
    """avg_uv --uv_source render: part maps that are the template's own parts rendered at a
    side view, read back through the same mesh and camera, give every visible face (or its
    mirror twin) its own part, and most of the half template is seen."""
    from experiments.avg_uv import sample_part_maps
    from umr.losses import SemanticTemplate
    from umr.nets import MeshNet, camera_biases
    from umr.renderer import make_renderer

    synth_birds.truth_template(synth / "gt" / "train.npz", tmp_path, smoothing=10)
    template = SemanticTemplate(tmp_path)
    model = MeshNet(stage=1, img_size=64, pretrained_encoder=False, mean_shape=template.mean_v)
    verts, faces, mesh = model.get_mean_shape().detach()[None], model.faces, model.mesh
    vertex_labels = torch.zeros(len(verts[0]), dtype=torch.long)
    for k, part in enumerate(BIRDS.part_names, start=1):
        vertex_labels[template.vertices[part]] = k
    face_labels = torch.mode(vertex_labels[faces], dim=1).values  # (F,)
    cam = torch.cat([torch.tensor([0.8, 0.0, 0.0]), camera_biases(1)[0]])[None]
    reader = make_renderer(64)
    one_hot = torch.nn.functional.one_hot(face_labels, 5).float()  # (F, 5)
    channels = []
    for group in ((1, 2, 3), (4, 0, 0)):
        colours = one_hot[:, list(group)][None, :, None, None, :].expand(1, -1, 6, 6, 3).contiguous()
        channels.append(reader(verts, faces, cam, colours).image)
    alpha = channels[0][:, 3:]
    part_prob = torch.cat([1 - alpha, channels[0][:, :3], channels[1][:, :1]], 1)  # (1, 5, S, S)
    total, weight = sample_part_maps(part_prob, verts, cam, faces, mesh, reader, 6)
    assert total[:, 0].abs().max() == 0  # only the four parts are read
    per_face_weight = weight[0, 0].sum(1)  # (F_half,)
    read = total[0, 1:].sum(2).argmax(0) + 1  # (F_half,)
    half_labels = face_labels[: mesh.num_half_faces]
    seen = per_face_weight > 0.5
    assert seen.float().mean() > 0.7
    assert (read[seen] == half_labels[seen]).float().mean() > 0.9


def test_registered_data_sets_meet_the_sample_contract(synth):
    """Every DATASETS entry's loader yields items that check_sample accepts, with and without
    part maps; check_sample names a key that breaks the contract."""
    from umr.data import DATASETS, check_sample

    for spec in DATASETS.values():
        for scops in (None, synth / "scops"):
            ds = spec.loader(synth / "CUB_200_2011", synth / "cachedir" / "cub", split="train", img_size=64,
                             scops_path=scops, category=spec.category)
            item = ds[0]
            check_sample(item, 64, spec.category)
            assert ("part_prob" in item) == (scops is not None)
    bad = dict(item, back_points=item["back_points"][:3])
    with pytest.raises(ValueError, match="back_points"):
        check_sample(bad, 64)
    with pytest.raises(ValueError, match="'mask'"):
        check_sample({k: v for k, v in item.items() if k != "mask"}, 64)
    assert DATASETS["synth_birds"].has_truth and not DATASETS["cub"].has_truth
