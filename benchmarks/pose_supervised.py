r"""How fast stage 2's camera network can learn pose at all: the same encoder and camera
hypotheses, started as ``train_s2 --init_from`` starts them, trained on a synthetic training
split with the **true** rotations as the loss (no rendering, no self-supervision). Silhouettes
and parts carry no more information about the pose than the rotation itself, so its test error
after N iterations is what to expect, at best, of the self-supervised losses with the same
network, data, batch size, learning rate and iterations. Prints one JSON line every
``--eval_freq`` iterations and at the end (test split, and ``train``: the first training photos
unaugmented).

    python -m benchmarks.pose_supervised --init_from <stage-1 pred_net_latest.pth> \
        --data <synthetic set> [--num_iter 400] [--batch_size 8] [--learning_rate 1e-4] \
        [--assign soft|best|single]

``--assign soft``: ``Σ_k p_k d_k`` with the probabilities trained by it, the form of stage 2's
silhouette and vertex losses; ``best``: every image trains only its closest hypothesis, and the
probabilities learn by cross-entropy which one that is; ``single``: one camera (hypothesis 0
only, as stage 1's single camera). ``d_k`` is the squared chordal distance
``‖R_k − R_true‖²`` between rotation matrices. Errors are reported after the one global
rotation between the model's frame and the truth's (as ``test_3d``).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from experiments.common import init_from_checkpoint
from umr.checkpoints import read_model_checkpoint
from umr.data.cub import CUBDataset
from umr.data.synth_birds import canonical_camera
from umr.evaluation import align_rotations, rotation_of
from umr.nets import MeshNet


def camera_hypotheses(model: MeshNet, img: torch.Tensor):
    """(B, K, 3, 3) rotations and (B, K) probabilities of the camera hypotheses."""
    feat, _, _ = model.encode(img)
    _, hyps, probs, _ = model.cam_predictor(feat, sample=False)
    B, K = probs.shape
    return rotation_of(hyps.reshape(B * K, 7)).view(B, K, 3, 3), probs


def supervised_pose_loss(rots: torch.Tensor, probs: torch.Tensor, true: torch.Tensor, assign: str) -> torch.Tensor:
    """rots (B, K, 3, 3), probs (B, K), true (B, 3, 3) → scalar loss (see the module's doc)."""
    dist = (rots - true[:, None]).pow(2).flatten(2).sum(-1)  # (B, K)
    if assign == "single":
        return dist[:, 0].mean()
    if assign == "soft":
        return (probs * dist).sum(1).mean()
    best = dist.detach().argmin(1)
    return dist.gather(1, best[:, None]).mean() + F.nll_loss(torch.log(probs + 1e-9), best)


def true_rotations(batch) -> torch.Tensor:
    return rotation_of(canonical_camera(torch.as_tensor(batch["sfm_pose"]).double())).float()


def evaluate(model: MeshNet, images: torch.Tensor, true: torch.Tensor, single: bool = False) -> dict:
    model.eval()
    with torch.no_grad():
        outs = [camera_hypotheses(model, images[i : i + 32]) for i in range(0, len(images), 32)]
    model.train()
    rots = torch.cat([r for r, _ in outs])
    probs = torch.cat([p for _, p in outs])
    chosen = rots[:, 0] if single else rots[torch.arange(len(rots)), probs.argmax(1)]
    errors, _ = align_rotations(chosen, true)
    return {"rot_err_median": round(float(errors.median()), 2), "rot_err_mean": round(float(errors.mean()), 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init_from", required=True, help="a stage-1 checkpoint (encoder as train_s2 --init_from)")
    parser.add_argument("--data", required=True, help="a synthetic set (python -m umr.data.synth_birds --out ...)")
    parser.add_argument("--num_iter", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--assign", choices=("soft", "best", "single"), default="soft")
    parser.add_argument("--eval_freq", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from_scratch", action="store_true", help="a new encoder (--init_from gives only the architecture)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    arch = read_model_checkpoint(args.init_from, "--init_from").arch
    model = MeshNet(**{**arch, "stage": 2}, pretrained_encoder=False)
    if not args.from_scratch:
        init_from_checkpoint(model, args.init_from, parts=("encoder",))
    size = arch["img_size"]
    root = args.data
    train = CUBDataset(f"{root}/CUB_200_2011", f"{root}/cachedir/cub", split="train", img_size=size, seed=args.seed)
    test = CUBDataset(f"{root}/CUB_200_2011", f"{root}/cachedir/cub", split="test", img_size=size, mirror=False)
    test_items = [test[i] for i in range(len(test))]
    test_images = torch.from_numpy(np.stack([it["img"] for it in test_items]))
    test_true = true_rotations({"sfm_pose": np.stack([it["sfm_pose"] for it in test_items])})
    # the first training photos, unaugmented: how far the network fits what it trains on
    seen = CUBDataset(f"{root}/CUB_200_2011", f"{root}/cachedir/cub", split="train", img_size=size, mirror=False,
                      jitter_frac=0.0)
    seen_items = [seen[i] for i in range(min(len(seen), len(test)))]
    seen_images = torch.from_numpy(np.stack([it["img"] for it in seen_items]))
    seen_true = true_rotations({"sfm_pose": np.stack([it["sfm_pose"] for it in seen_items])})
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=1,
                                         persistent_workers=True)
    params = list(model.encoder.parameters()) + list(model.cam_predictor.parameters())
    optimiser = torch.optim.Adam(params, lr=args.learning_rate, betas=(0.9, 0.999))
    model.train()
    step, start = 0, time.time()
    while step < args.num_iter:
        for batch in loader:
            rots, probs = camera_hypotheses(model, batch["img"].float())
            loss = supervised_pose_loss(rots, probs, true_rotations(batch), args.assign)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if step % args.eval_freq == 0 or step == args.num_iter:
                print(json.dumps({"iter": step, "loss": round(float(loss.detach()), 4), "s": round(time.time() - start, 1),
                                  **evaluate(model, test_images, test_true, args.assign == "single"),
                                  "train": evaluate(model, seen_images, seen_true, args.assign == "single")}), flush=True)
            if step == args.num_iter:
                break


if __name__ == "__main__":
    main()
