"""What a split protocol is and how it is checked, importable without Spark.

The protocols themselves run as Spark expressions in ``udfs.spark.splits`` (one shuffle by user
over a catalog-sized frame); this module holds their names, the source-label mapping and
``SplitSpec``, so a config can be checked before a session starts.
"""
from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("label", "leave_one_out", "temporal_ratio", "global_time", "random_ratio")
LABELS = {"0": "train", "1": "valid", "2": "test", "train": "train", "valid": "valid",
          "validation": "valid", "val": "valid", "test": "test"}


class SplitError(ValueError):
    pass


@dataclass(frozen=True)
class SplitSpec:
    protocol: str = "temporal_ratio"
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    valid_cut: float = 0.8
    test_cut: float = 0.9
    min_user_interactions: int = 3

    def validate(self) -> "SplitSpec":
        if self.protocol not in PROTOCOLS:
            raise SplitError(f"split protocol '{self.protocol}' is not one of {', '.join(PROTOCOLS)}")
        if len(self.ratios) != 3 or any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1) > 1e-6:
            raise SplitError(f"split ratios {list(self.ratios)} must be three non-negative shares "
                             "(train, valid, test) summing to 1, e.g. [0.8, 0.1, 0.1]")
        if self.protocol == "global_time" and not self.valid_cut <= self.test_cut:
            raise SplitError(f"global_time needs valid_cut <= test_cut, got {self.valid_cut} > {self.test_cut}")
        return self
