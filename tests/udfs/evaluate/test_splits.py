"""Split specs are checked without Spark: a bad protocol, ratios or cuts name the fix."""
from __future__ import annotations

import pytest

from udfs.evaluate.splits import SplitError, SplitSpec


@pytest.mark.parametrize("spec, message", [
    (SplitSpec(protocol="nope"), "not one of"),
    (SplitSpec(ratios=(0.5, 0.1, 0.1)), "summing to 1"),
    (SplitSpec(protocol="global_time", valid_cut=0.9, test_cut=0.5), "valid_cut <= test_cut"),
])
def test_bad_specs(spec, message):
    with pytest.raises(SplitError, match=message):
        spec.validate()
