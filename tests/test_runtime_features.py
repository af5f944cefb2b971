"""Every method (and the plain call) on every family's tiny components with each runtime feature people turn on
(`ttalign.compat`): the same images as without the feature, or a refusal that names the conflict. The table in
docs/runtime.md comes from the same cells (`python benchmarks/run.py compat_matrix`)."""

import pytest
import torch

from ttalign.compat import FEATURES, METHODS, SELECTS, run_cell
from ttalign.pipelines import FAMILIES

#: Cells that must refuse, `(family or "*", feature, method or "*")` -> a phrase of the message.
REFUSALS: dict[tuple[str, str, str], str] = {}

#: Cells where the family has no such feature: the UNet and SD3 processors call SDPA directly.
NOT_APPLICABLE = {("sd", "attention_backend"), ("sdxl", "attention_backend"), ("sd3", "attention_backend")}

#: Features that need an accelerator whatever the method, `(family or "*", feature)`: on a CPU-only machine the cell
#: says so; with a GPU it runs. (xformers on the other families runs on CPU with the kernel computed by SDPA.)
GPU_ONLY = {("*", "sequential_cpu_offload"), ("flux", "xformers")}

#: Features that change the decoded pixels themselves: a selection method may then choose other candidates.
CHANGES_PIXELS = {"vae_tiling"}

_REFERENCE: dict[str, dict] = {}


def _expected(family: str, feature: str, method: str) -> str | None:
    for key in ((family, feature, method), ("*", feature, method), (family, feature, "*"), ("*", feature, "*")):
        if key in REFUSALS:
            return REFUSALS[key]
    return None


#: The methods the quick run checks with every feature: the one that reads attention through the control processors
#: and the one that backpropagates through the denoiser and the VAE; on one UNet family and one joint-attention
#: family (SDXL shares SD's processors, SD3 FLUX's). `-m slow` runs the rest (the docs' table has every cell).
QUICK = ("attend_and_excite", "noise_optimization")
QUICK_FAMILIES = ("sd", "flux")
#: bitsandbytes' LLM.int8 loads through the same quantizer steps as NF4 (`ttalign.compat._bnb`): its cells, the quick
#: ones included, run with `-m slow`.
QUICK_FEATURES = [f for f in FEATURES if f != "bnb_int8"]


def _check(family: str, feature: str, methods) -> None:
    reference = _REFERENCE.setdefault(family, {})
    failures = []
    for method in methods:
        cell = run_cell(family, feature, method, reference)
        refusal = _expected(family, feature, method)
        if (family, feature) in NOT_APPLICABLE:
            ok = cell.status == "n/a"
        elif ({(family, feature), ("*", feature)} & GPU_ONLY) and not torch.cuda.is_available():
            ok = cell.status == "gpu" and "GPU" in cell.message
        elif refusal is not None:
            ok = cell.status == "refused" and refusal in cell.message
        else:
            allowed = {"same", "reselects"} if feature in CHANGES_PIXELS and method in SELECTS else {"same"}
            ok = cell.status in allowed
        if not ok:
            failures.append(f"{method}: {cell.status} (diff {cell.max_diff}, tol {cell.tolerance}) {cell.message}")
    assert not failures, f"{family} with {feature}:\n" + "\n".join(failures)


@pytest.mark.parametrize("feature", QUICK_FEATURES)
@pytest.mark.parametrize("family", QUICK_FAMILIES)
def test_the_methods_that_reach_into_the_model_with_the_feature(family, feature):
    _check(family, feature, QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_with_the_feature(family, feature):
    quick = family in QUICK_FAMILIES and feature in QUICK_FEATURES
    _check(family, feature, [m for m in METHODS if not (quick and m in QUICK)])


def test_attention_methods_keep_the_users_backend_on_the_layers_they_do_not_read(monkeypatch):
    """FLUX with `_native_math`: Attend-and-Excite reads the double-stream blocks; every single-stream block still
    dispatches its attention through the user's backend, in the call and in the refinement passes."""
    import diffusers.models.transformers.transformer_flux as flux_module

    from ttalign.methods import AttendAndExcite
    from ttalign.testing import get_tiny_family_pipeline

    pipe = get_tiny_family_pipeline("flux")
    transformer = pipe.transformer
    transformer.set_attention_backend("_native_math")
    seen = []
    real = flux_module.dispatch_attention_fn

    def counting(*args, backend=None, **kwargs):
        seen.append(str(getattr(backend, "value", backend)))
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(flux_module, "dispatch_attention_fn", counting)
    method = AttendAndExcite(tokens=["cat", "dog"], max_iter_to_alter=2, thresholds={0: 0.9})
    pipe(["a cat and a dog"], num_inference_steps=3, height=32, width=32, output_type="pt", alignment=[method])
    single = len(transformer.single_transformer_blocks)
    assert len(seen) >= 3 * single and set(seen) == {"_native_math"}
    processors = transformer.attn_processors.values()
    assert all(str(getattr(p._attention_backend, "value", p._attention_backend)) == "_native_math" for p in processors)
