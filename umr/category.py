"""What the library knows about an object category, in one place (birds being the one instance).

A :class:`CategorySpec` holds the keypoint names and their left/right mirror, the semantic parts
(the SCOPS channels after the background), the colour each part is drawn with and how many image
points each part gives the vertex-correspondence loss (docs/method.md §9.4). The loaders, the
losses, ``avg_uv``, ``test_kp``, the pictures and the synthetic generator read them from here; a
new category is a new instance (and, for its data, a loader that yields its keypoints and parts
in this order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CategorySpec", "BIRDS", "CATEGORIES"]


@dataclass(frozen=True)
class CategorySpec:
    """One category's names, mirror permutation and part layout.

    Attributes:
        name: e.g. ``"bird"``.
        keypoint_names: K names, in the order of the data's keypoint arrays (K, 3).
        keypoint_mirror: K indices: keypoint k of a mirrored image is keypoint
            ``keypoint_mirror[k]`` of the original (left and right swapped); an involution.
        part_names: P semantic parts, SCOPS channels 1..P (channel 0 is the background).
        part_colours: (P + 1, 3) RGB in [0, 1], background first: every picture of parts.
        part_points: per part, the image points sampled for the vertex-correspondence loss.
        part_loss_weights: per part, its weight in the part-matching loss (docs/method.md §8.8);
            a part not named weighs 0 (the background always does).
        vertex_loss_weights: per part, its weight in the vertex-correspondence loss (§8.9); a
            part not named weighs 0 but still counts in the normaliser.
    """

    name: str
    keypoint_names: tuple
    keypoint_mirror: tuple
    part_names: tuple
    part_colours: tuple
    part_points: dict = field(default_factory=dict)
    part_loss_weights: dict = field(default_factory=dict)
    vertex_loss_weights: dict = field(default_factory=dict)

    def __post_init__(self):
        k = len(self.keypoint_names)
        mirror = tuple(int(i) for i in self.keypoint_mirror)
        if sorted(mirror) != list(range(k)) or any(mirror[mirror[i]] != i for i in range(k)):
            raise ValueError(f"category {self.name!r}: keypoint_mirror must be a permutation of 0..{k - 1} that is its "
                             f"own inverse (left ↔ right), got {mirror}")
        colours = tuple(tuple(float(c) for c in rgb) for rgb in self.part_colours)
        if len(colours) != self.num_parts + 1 or any(len(rgb) != 3 for rgb in colours):
            raise ValueError(f"category {self.name!r}: part_colours needs {self.num_parts + 1} RGB triples "
                             "(background first, then one per part)")
        if set(self.part_points) != set(self.part_names):
            raise ValueError(f"category {self.name!r}: part_points must name every part {self.part_names}, "
                             f"got {sorted(self.part_points)}")
        for what in ("part_loss_weights", "vertex_loss_weights"):
            unknown = set(getattr(self, what)) - set(self.part_names)
            if unknown:
                raise ValueError(f"category {self.name!r}: {what} names unknown part(s) {sorted(unknown)}; "
                                 f"the parts are {self.part_names}")
        object.__setattr__(self, "keypoint_mirror", mirror)
        object.__setattr__(self, "part_colours", colours)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def num_parts(self) -> int:
        """P, the semantic parts without the background."""
        return len(self.part_names)

    @property
    def part_labels(self) -> tuple:
        """Names of the P + 1 part-map channels (and labels of a semantic template), background first."""
        return ("background", *self.part_names)

    def part_weight_vector(self) -> tuple:
        """P + 1 part-matching weights, background (0) first, in channel order."""
        return (0.0, *(float(self.part_loss_weights.get(p, 0.0)) for p in self.part_names))

    @property
    def part_colour_array(self) -> np.ndarray:
        """(P + 1, 3) float64 copy of :attr:`part_colours`."""
        return np.array(self.part_colours, dtype=np.float64)

    @property
    def keypoint_mirror_array(self) -> np.ndarray:
        return np.array(self.keypoint_mirror, dtype=np.int64)


BIRDS = CategorySpec(
    name="bird",
    # CUB-200-2011's 15 keypoints, in its order
    keypoint_names=("Back", "Beak", "Belly", "Breast", "Crown", "Forehead", "LEye", "LLeg", "LWing", "Nape", "REye",
                    "RLeg", "RWing", "Tail", "Throat"),
    keypoint_mirror=(0, 1, 2, 3, 4, 5, 10, 11, 12, 9, 6, 7, 8, 13, 14),
    # SCOPS' four bird parts as UMR names them
    part_names=("head", "neck", "back", "belly"),
    # background grey, head red, neck yellow, back blue, belly green
    part_colours=((0.85, 0.85, 0.85), (0.9, 0.24, 0.24), (0.94, 0.78, 0.16), (0.24, 0.55, 0.94),
                  (0.31, 0.78, 0.35)),
    part_points={"head": 10, "neck": 10, "back": 30, "belly": 30},
    # the semantic losses look at the two parts SCOPS finds most reliably
    part_loss_weights={"head": 5.0, "belly": 5.0},
    vertex_loss_weights={"head": 1.0, "belly": 1.0},
)

CATEGORIES = {BIRDS.name: BIRDS}
