"""The original code's departures from the paper, one switch each.

By default every switch is off and this code follows the paper's intent; a switch on restores
the original UMR code's behaviour at that one place, so its numbers can be reproduced.
``--compat`` turns every switch on; ``--quirks name,name`` turns on the ones named. The README's
quirk table says what each one changes.

Three of them change what trained weights compute (:data:`MODEL_QUIRKS`): a checkpoint records
them, and a model rebuilt from it gets them from there, whatever the command line says. The
authors' released checkpoints were trained with all three on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Iterable, Mapping

__all__ = ["Quirks", "MODEL_QUIRKS", "ORIGINAL_MODEL_QUIRKS", "QUIRK_NAMES"]


@dataclass(frozen=True)
class Quirks:
    """One field per quirk; True restores the original's behaviour there."""

    q1_zero_cycle_target: bool = False
    """Stage 2's texture-cycle target is zero (the original took it from a renderer that never fills it)."""
    q2_softras_p2f: bool = False
    """Stage 1's texture-cycle target is SoftRas' p2f (running-max softmax weights), not each face's mean pixel."""
    q4_texture_moves_geometry: bool = False
    """The predicted silhouette that masks the rendered texture is not detached: texture losses move shape and camera."""
    q5_linear_shape_mlp: bool = False
    """Stage 1's shape MLP has LeakyReLU slope 1, i.e. it is an affine map."""
    q6_sampled_latent: bool = False
    """The latent code is sampled at test time too (the paper's intent there is the mean)."""
    q7_biases_unused: bool = False
    """The camera hypotheses are not rotated by ``cam_biases``: all start near the identity."""
    q8_flipped_exemplar: bool = False
    """avg_uv's exemplar search: batch norm in train mode, the 'flipped' camera and image, one λ per batch."""
    q9_last_face_visible: bool = False
    """The texture-cycle loss counts face F−1 as visible wherever the z-buffer shows background (index −1)."""
    q10_rounded_labels: bool = False
    """The template's part labels are sampled bilinearly from the UV label image, then rounded."""
    q12_sampled_camera: bool = False
    """The camera hypothesis is sampled at test time too (the paper's intent there is the most probable one)."""
    q13_shuffled_test_loaders: bool = False
    """Evaluation loaders shuffle, mirror and drop the last partial batch."""
    q14_uniform_bn_init: bool = False
    """BatchNorm1d weights start U(0, 1), as PyTorch 1.1 initialised them (now 1)."""
    q17_no_epsilon: bool = False
    """Part-map normalisation divides by a part's peak without an epsilon (NaN for an absent part)."""
    q27_extra_pair: bool = False
    """Keypoint transfer evaluates one pair more than ``--number_pairs``."""
    template_jump: bool = False
    """Stage 1's template update adds the deformation of the mean latent code and leaves the shape
    predictor as it is, so every predicted shape jumps until the network re-adapts."""
    detached_probs: bool = False
    """The vertex (semantic) loss does not train the hypothesis probabilities."""
    hidden_keypoints: bool = False
    """Keypoint transfer lets faces / vertices hidden in the source image carry keypoints."""
    free_centre_vertices: bool = False
    """The symmetric mesh's centre vertices may leave the symmetry plane."""

    @classmethod
    def original(cls) -> "Quirks":
        """Every switch on: the original code."""
        return cls(**{name: True for name in QUIRK_NAMES})

    @classmethod
    def from_names(cls, names: Iterable[str], compat: bool = False) -> "Quirks":
        """``compat``: all on; else the ``names`` given (unknown names raise ValueError)."""
        names = [n.strip() for n in names if n.strip()]
        unknown = [n for n in names if n not in QUIRK_NAMES]
        if unknown:
            raise ValueError(f"unknown quirk(s) {', '.join(unknown)}; the quirks are: {', '.join(QUIRK_NAMES)}")
        base = cls.original() if compat else cls()
        return replace(base, **{n: True for n in names})

    @classmethod
    def from_flags(cls, flags) -> "Quirks":
        """From ``--compat`` and ``--quirks``."""
        return cls.from_names(getattr(flags, "quirks", None) or [], compat=bool(getattr(flags, "compat", False)))

    def enabled(self) -> list:
        """Names of the switches that are on."""
        return [name for name in QUIRK_NAMES if getattr(self, name)]

    def model_quirks(self) -> dict:
        """The switches that change what trained weights compute (:data:`MODEL_QUIRKS`)."""
        return {name: getattr(self, name) for name in MODEL_QUIRKS}

    def with_model_quirks(self, recorded: Mapping[str, bool]) -> "Quirks":
        """These switches with the model quirks replaced by a checkpoint's ``recorded`` ones."""
        return replace(self, **{k: bool(v) for k, v in recorded.items() if k in MODEL_QUIRKS})

    def to_dict(self) -> dict:
        return asdict(self)


QUIRK_NAMES = tuple(f.name for f in fields(Quirks))
# What trained weights mean: recorded in checkpoints, taken from them on load.
MODEL_QUIRKS = ("q5_linear_shape_mlp", "q7_biases_unused", "free_centre_vertices")
ORIGINAL_MODEL_QUIRKS = {name: True for name in MODEL_QUIRKS}
