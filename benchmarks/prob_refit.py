r"""How much pose a stage-2 model's probability layers could pick with the features they already
get; prints one JSON line.

Everything of the model stays fixed (eval mode) except the 8 hypotheses' probability layers
(``prob_predictor``: one linear layer each), which are refit by full-batch Adam to each training
photo's hypothesis with the lowest ``train_s2 --hypothesis_choice best`` score (silhouette plus
visible-vertex loss, :func:`umr.objectives.hypothesis_choice_scores`; training photos, no
augmentation), starting from the trained layers. The test photos' hypotheses are then picked by
the refit layers, from the image alone as the model predicts.

Keys: ``rot_err_median`` (the model's own pick), ``refit_rot_err_median`` (the refit layers'
pick), ``by_losses_rot_err_median`` (each test photo's lowest-score hypothesis, which needs its
mask and part points: what a perfect refit would reach), and ``choice_accuracy`` (the share of
photos whose pick is the losses' choice, before and after, training and test photos). Errors
are test medians after the one global rotation between frames, as ``benchmarks.pose_diagnosis``
computes them.

    python -m benchmarks.prob_refit --model_path <stage-2 pred_net_latest.pth> \
        --data <synthetic set> --stemp_path <its semantic template> [--steps 500] [--lr 1e-2]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch.utils.data import default_collate

from benchmarks.pose_diagnosis import CHOICE_RULES, choices_by_losses
from experiments.common import load_model
from umr.data.cub import CUBDataset
from umr.data.synth_birds import canonical_camera
from umr.evaluation import align_rotations, rotation_of


def fit_probability_layers(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                           steps: int, lr: float, decay: float = 1e-3):
    """Logistic regression of the hypotheses' logits ``features[:, k] · weight[k] + bias[k]``.

    Args:
        features: (N, K, F) each hypothesis' input to its probability layer.
        weight, bias: (K, F), (K,) the starting layers.
        target: (N,) the hypothesis each photo should pick.
    Returns:
        The fitted (weight, bias), minimising cross-entropy + ``decay · ‖weight‖²`` by Adam.
    """
    weight, bias = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = (features * weight[None]).sum(-1) + bias
            loss = torch.nn.functional.cross_entropy(logits, target) + decay * weight.pow(2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return weight.detach(), bias.detach()


@torch.no_grad()
def predictions(model, dataset, stemp_path, choice: str) -> dict:
    """Every photo's probability-layer inputs (N, K, F), hypotheses (N, K, 7), probabilities
    (N, K), the losses' choice (N,) and true rotation (N, 3, 3)."""
    heads = model.cam_predictor.camera_predictor
    seen = {}
    hooks = [head.prob_predictor.register_forward_hook(lambda m, args, out, k=k: seen.__setitem__(k, args[0]))
             for k, head in enumerate(heads)]
    items = [dataset[i] for i in range(len(dataset))]
    features, hyps, probs = [], [], []
    for i in range(0, len(items), 32):
        out = model(torch.from_numpy(np.stack([it["img"] for it in items[i : i + 32]])).float())
        features.append(torch.stack([seen[k] for k in range(len(heads))], 1))
        hyps.append(out["cam_hypotheses"])
        probs.append(out["cam_probs"])
    for hook in hooks:
        hook.remove()
    batch = default_collate(items)
    hyps = torch.cat(hyps)
    return {"features": torch.cat(features), "hyps": hyps, "probs": torch.cat(probs),
            "choice": choices_by_losses(model, batch, hyps, stemp_path)[choice],
            "true": rotation_of(canonical_camera(batch["sfm_pose"]).float())}


def median_error(hyps: torch.Tensor, pick: torch.Tensor, true: torch.Tensor) -> float:
    return round(float(align_rotations(rotation_of(hyps[torch.arange(len(hyps)), pick]), true)[0].median()), 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="a stage-2 checkpoint")
    parser.add_argument("--data", required=True, help="a synthetic set (python -m umr.data.synth_birds --out ...)")
    parser.add_argument("--stemp_path", required=True, help="the run's semantic template")
    parser.add_argument("--steps", type=int, default=500, help="full-batch Adam steps")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--choice", default="mask_and_visible_vertex", choices=CHOICE_RULES,
                        help="the losses whose lowest is the target (benchmarks.pose_diagnosis.choices_by_losses)")
    args = parser.parse_args()
    model = load_model(args.model_path, torch.device("cpu"))
    if model.stage != 2:
        parser.error("--model_path: a stage-2 model is needed (camera hypotheses)")
    sets = {split: predictions(model, CUBDataset(f"{args.data}/CUB_200_2011", f"{args.data}/cachedir/cub", split=split,
                                                 img_size=model.arch["img_size"], mirror=False, jitter_frac=0.0,
                                                 scops_path=f"{args.data}/scops"), args.stemp_path, args.choice)
            for split in ("train", "test")}
    heads = model.cam_predictor.camera_predictor
    weight = torch.stack([head.prob_predictor.weight[0] for head in heads])
    bias = torch.stack([head.prob_predictor.bias[0] for head in heads])
    weight, bias = fit_probability_layers(sets["train"]["features"], weight, bias, sets["train"]["choice"],
                                          args.steps, args.lr)
    picks = {split: ((s["features"] * weight[None]).sum(-1) + bias).argmax(1) for split, s in sets.items()}
    test = sets["test"]

    def accuracy(pick, split):
        return round(float((pick == sets[split]["choice"]).float().mean()), 3)

    print(json.dumps({
        "rot_err_median": median_error(test["hyps"], test["probs"].argmax(1), test["true"]),
        "refit_rot_err_median": median_error(test["hyps"], picks["test"], test["true"]),
        "by_losses_rot_err_median": median_error(test["hyps"], test["choice"], test["true"]),
        "choice_accuracy": {"before": {s: accuracy(sets[s]["probs"].argmax(1), s) for s in sets},
                            "after": {s: accuracy(picks[s], s) for s in sets}},
        "num_images": {s: len(sets[s]["true"]) for s in sets},
    }))


if __name__ == "__main__":
    main()
