"""Every method (and the plain call) on every family's tiny components with each runtime feature people turn on
(`ttalign.compat`): the same images as without the feature, or a refusal that names the conflict. The table in
docs/runtime.md comes from the same cells (`python benchmarks/run.py compat_matrix`)."""

import pytest

from ttalign.compat import FEATURES, METHODS, run_cell
from ttalign.pipelines import FAMILIES

#: Cells that must refuse, `(family or "*", feature, method or "*")` -> a phrase of the message.
REFUSALS: dict[tuple[str, str, str], str] = {}

#: Cells where the family has no such feature.
NOT_APPLICABLE = {("sd", "attention_backend"), ("sdxl", "attention_backend"), ("sd3", "attention_backend")}

_REFERENCE: dict[str, dict] = {}


def _expected(family: str, feature: str, method: str) -> str | None:
    for key in ((family, feature, method), ("*", feature, method), (family, feature, "*"), ("*", feature, "*")):
        if key in REFUSALS:
            return REFUSALS[key]
    return None


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_with_the_feature(family, feature):
    reference = _REFERENCE.setdefault(family, {})
    failures = []
    for method in METHODS:
        cell = run_cell(family, feature, method, reference)
        refusal = _expected(family, feature, method)
        if (family, feature) in NOT_APPLICABLE:
            ok = cell.status == "n/a"
        elif refusal is not None:
            ok = cell.status == "refused" and refusal in cell.message
        else:
            ok = cell.status == "same"
        if not ok:
            failures.append(f"{method}: {cell.status} (diff {cell.max_diff}, tol {cell.tolerance}) {cell.message}")
    assert not failures, f"{family} with {feature}:\n" + "\n".join(failures)
