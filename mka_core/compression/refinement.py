"""How a plan's layers are built beyond its composition: the merge mode and the compensation of
each cut, and the calibration data both are estimated on. Pure data, recorded in the plan file
(`plan.Plan.refine`); `rebuild.refine` carries it out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mka_core.errors import MkaInputError
from mka_core.jsonfields import is_int, kind, want_object, want_str

MERGE_MODES = ("average", "flatten")
MERGE_HELP = {
    "average": "merged layers' weights averaged with the plan's weights (MKA, Liu et al. 2024)",
    "flatten": "merged layers side by side in one wide block, pruned back to the standard width by "
    "activations, output projections refitted by least squares (FlattenGPT, arXiv 2602.08858)",
}
COMPENSATIONS = ("none", "linear", "scale")
COMPENSATION_HELP = {
    "none": "no compensation",
    "linear": "a d×d least-squares map of the MLP output below each cut, fused into down_proj "
    "(ReplaceMe, arXiv 2505.02819)",
    "scale": "the residual stream rescaled at each cut by the measured shrink of its norm, fused "
    "into the projections that write to it (Prune&Comp, AAAI 2026)",
}
_KEYS = ("merge", "compensation", "calibration")
_CALIB_KEYS = ("data", "samples", "tokens")


@dataclass(frozen=True)
class Refine:
    """merge: how merged layers are built; compensation: what corrects each cut; calibration:
    the data both are estimated on ({"data", "samples", "tokens"}, as the CLI's options), None
    when the default calibration is meant."""

    merge: str = "average"
    compensation: str = "none"
    calibration: dict | None = None

    def __post_init__(self):
        if self.merge not in MERGE_MODES:
            raise MkaInputError(
                f"merge mode {self.merge!r}: expected one of {', '.join(MERGE_MODES)}"
            )
        if self.compensation not in COMPENSATIONS:
            raise MkaInputError(
                f"compensation {self.compensation!r}: expected one of {', '.join(COMPENSATIONS)}"
            )

    @property
    def is_default(self) -> bool:
        return self.merge == "average" and self.compensation == "none"

    def needs_data(self, composition) -> bool:
        """Whether building `composition` this way needs calibration data."""
        flat = self.merge == "flatten" and any(len(g) > 1 for g in composition)
        return flat or self.compensation != "none"

    @property
    def label(self) -> str:
        """e.g. ":flatten+linear" ("" for the default), as compare's specs write it."""
        return (":flatten" if self.merge == "flatten" else "") + (
            f"+{self.compensation}" if self.compensation != "none" else ""
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["calibration"] is None:
            del d["calibration"]
        return d

    @classmethod
    def from_dict(cls, d: Any, path: str = "refine") -> Refine:
        want_object(d, path, _KEYS, ("merge", "compensation"))
        merge = want_str(d["merge"], f"{path}.merge")
        comp = want_str(d["compensation"], f"{path}.compensation")
        calib = d.get("calibration")
        if calib is not None:
            want_object(calib, f"{path}.calibration", _CALIB_KEYS, _CALIB_KEYS)
            want_str(calib["data"], f"{path}.calibration.data")
            for key in ("samples", "tokens"):
                if not is_int(calib[key]) or calib[key] < 2:
                    raise MkaInputError(
                        f"{path}.calibration.{key}: expected an integer >= 2, got {kind(calib[key])}"
                    )
        try:
            return cls(merge, comp, dict(calib) if calib is not None else None)
        except MkaInputError as e:
            raise MkaInputError(f"{path}: {e}") from None
