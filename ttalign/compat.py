"""The runtime-feature compatibility matrix: every method (and the plain call) on every family, with each of the
speed / memory features people turn on (VAE tiling and slicing, offloading, attention backends, `torch.compile`, a
LoRA, quantized weights), run on the tiny components of :mod:`ttalign.testing`.

A cell runs a method on fresh copies of one family's tiny pipeline, with and without the feature (or against the
equivalent plain model where the feature changes the model: a LoRA merged, quantized weights dequantized), and
compares the images; :class:`Cell` lists the outcomes. `tests/test_runtime_features.py` runs the cells (the quick run
a subset, `-m slow` the rest); `benchmarks/compat_matrix.py` writes the table that `docs/runtime.md` quotes.

    from ttalign.compat import run_cell
    run_cell("flux", "vae_slicing", "attend_and_excite")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttalign.pipelines.base import diffusers_errors_only

PROMPTS = ["a cat and a dog", "a red car and a dog"]
#: Where the cells run: a GPU where there is one (the features then run for real), else the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Features that place the components themselves (the pipeline stays on the CPU until they act).
PLACES_COMPONENTS = frozenset(
    {"model_cpu_offload", "sequential_cpu_offload", "group_offload_block", "group_offload_leaf"}
)
RIGHT = (0.5, 0.0, 1.0, 1.0)  # a region: the right half


@dataclass
class Cell:
    family: str
    feature: str
    method: str
    #: `same` (within the feature's own tolerance), `reselects` (a selection method chose other candidates because
    #: the feature changed the pixels it scores), `refused` (a `ValueError` / `NotImplementedError` naming the
    #: conflict), `gpu` (the feature needs an accelerator, whatever the method), `n/a` (the feature does not exist
    #: for this family), `differs` or `error` (bugs).
    status: str
    #: The largest absolute pixel difference to the run without the feature (`None` when a run did not finish).
    max_diff: float | None = None
    #: The feature's own tolerance for this comparison.
    tolerance: float | None = None
    message: str = ""
    #: Wall time of the cell (its runs with the feature and the ones it compares with).
    seconds: float = 0.0


# --- methods ------------------------------------------------------------------------------------------------------


def method_factories() -> dict[str, Callable[[], list]]:
    """Each method of :data:`METHODS` as a factory of its alignment list, at the matrix's settings (a cheap
    differentiable reward, two candidates or particles, one noise-optimization step)."""
    from ttalign.methods import (
        AttendAndExcite,
        BestOfN,
        NoiseOptimization,
        ParticleSteering,
        RegionReweight,
        RewardGuidance,
    )
    from ttalign.testing import Redness

    return {
        "plain": lambda: [],
        "best_of_n": lambda: [BestOfN(reward=Redness(), n=2)],
        "noise_optimization": lambda: [NoiseOptimization(reward=Redness(), steps=1, lr=1.0)],
        "reward_guidance": lambda: [RewardGuidance(reward=Redness(), scale=20.0)],
        "particle_steering": lambda: [ParticleSteering(reward=Redness(), particles=2, resample_every=1)],
        "attend_and_excite": lambda: [
            AttendAndExcite(tokens=lambda p: [p.split()[1], p.split()[-1]], max_iter_to_alter=2, thresholds={0: 0.9})
        ],
        "region_reweight": lambda: [RegionReweight(regions={"dog": RIGHT})],
    }


METHODS = (
    "plain",
    "best_of_n",
    "noise_optimization",
    "reward_guidance",
    "particle_steering",
    "attend_and_excite",
    "region_reweight",
)


# --- features -----------------------------------------------------------------------------------------------------
# Each feature is `apply(pipe, family) -> tolerance` (raising `NotApplicable` where the family has no such thing);
# it is applied to a fresh pipeline, so none needs undoing. A negative tolerance: relative to the plain call's change.


class NotApplicable(Exception):
    """The feature does not exist for this family (for example an attention backend its processors ignore)."""


class NeedsAccelerator(Exception):
    """The feature cannot run on a machine without a GPU, whatever the method (diffusers' own plain call fails)."""


#: Methods that choose among candidates by a reward: a feature that changes the decoded images itself (VAE tiling)
#: may change their choice, which is their right behaviour (`reselects`).
SELECTS = frozenset({"best_of_n", "particle_steering"})


def _denoiser(pipe):
    return pipe.family.denoiser


def _vae_tiling(pipe, family: str) -> float:
    vae = pipe.vae
    vae.enable_tiling()
    # Tiles smaller than the tiny images, so the tiled path runs (the defaults exceed them).
    vae.tile_sample_min_size = 16
    vae.tile_latent_min_size = 16 // (2 ** (len(vae.config.block_out_channels) - 1))
    if hasattr(vae, "tile_sample_min_height"):
        vae.tile_sample_min_height = vae.tile_sample_min_width = 16
    return -1.0  # relative: see `run_cell`


def _vae_slicing(pipe, family: str) -> float:
    pipe.vae.enable_slicing()
    return 1e-4


def _model_cpu_offload(pipe, family: str) -> float:
    pipe.enable_model_cpu_offload(device=DEVICE)
    return 1e-4


def _sequential_cpu_offload(pipe, family: str) -> float:
    if not torch.cuda.is_available():
        raise NeedsAccelerator(
            "without a GPU diffusers' own plain call fails with it (accelerate cannot put the buffers on "
            "`meta`); group offloading with `offload_type='leaf_level'` is its CPU-testable counterpart"
        )
    pipe.enable_sequential_cpu_offload()
    return 1e-4


def _group_offload(offload_type: str) -> Callable:
    def apply(pipe, family: str) -> float:
        _denoiser(pipe).enable_group_offload(
            onload_device=torch.device(DEVICE), offload_type=offload_type, num_blocks_per_group=1
        )
        return 1e-4

    return apply


def _attention_backend(pipe, family: str) -> float:
    denoiser = _denoiser(pipe)
    listening = [p for p in denoiser.attn_processors.values() if hasattr(p, "_attention_backend")]
    if not listening:
        raise NotApplicable("its attention processors call SDPA directly and ignore the backend switch")
    with diffusers_errors_only():  # "attention backends are an experimental feature"
        denoiser.set_attention_backend("_native_math")
    return 1e-4


def _sdpa_memory_efficient_attention(query, key, value, attn_bias=None, op=None, scale=None, p=0.0):
    """xformers' `memory_efficient_attention` (`[B, M, K]` or `[B, M, H, K]` inputs) computed by PyTorch's SDPA: the
    kernel's stand-in where xformers cannot run (no GPU), so the rest of the path runs as it does on a GPU."""
    if query.ndim == 4:  # [B, M, H, K] -> [B, H, M, K] and back
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_bias, scale=scale
        )
        return out.transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_bias, scale=scale)


def _xformers(pipe, family: str) -> float:
    """`pipe.enable_xformers_memory_efficient_attention()` where xformers runs (a GPU); elsewhere the processors that
    call installs (`XFormersAttnProcessor`, SD3's `XFormersJointAttnProcessor`), with the kernel computed by SDPA for
    the cell. FLUX takes xformers through the attention-backend switch, which needs the package and a GPU."""
    import types

    import diffusers.models.attention_processor as processors

    denoiser = _denoiser(pipe)
    if torch.cuda.is_available() and processors.xformers is not None:
        pipe.enable_xformers_memory_efficient_attention()
        return 1e-3
    if any(hasattr(p, "_attention_backend") for p in denoiser.attn_processors.values()):
        raise NeedsAccelerator("xformers reaches this family through the attention-backend switch, which needs a GPU")
    joint = {
        name: processors.XFormersJointAttnProcessor()
        if isinstance(p, processors.JointAttnProcessor2_0)
        else processors.XFormersAttnProcessor()
        for name, p in denoiser.attn_processors.items()
    }
    denoiser.set_attn_processor(joint)
    if processors.xformers is None:
        stand_in = types.SimpleNamespace(
            ops=types.SimpleNamespace(memory_efficient_attention=_sdpa_memory_efficient_attention)
        )
        processors.xformers = stand_in
        _CLEANUP.callback(setattr, processors, "xformers", None)
    return 1e-4


def _compile(pipe, family: str) -> float:
    denoiser = _denoiser(pipe)
    if getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(fullgraph=True, backend="eager")
    else:
        denoiser.compile(backend="eager")
    return 1e-4


def _add_lora(pipe) -> None:
    """A LoRA adapter with seeded random weights (so the images change) through diffusers' PEFT integration."""
    from peft import LoraConfig

    targets = list(pipe.family.lora_target_modules)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
        _denoiser(pipe).add_adapter(config)


def _lora(pipe, family: str) -> float:
    """A LoRA loaded the way users load one: saved in the family's diffusers format, then `load_lora_weights`."""
    import tempfile

    from peft.utils import get_peft_model_state_dict

    from ttalign.testing import get_tiny_family_pipeline

    source = get_tiny_family_pipeline(family)
    _add_lora(source)
    # "no LoRA keys for the text encoder": this LoRA has none
    with diffusers_errors_only(), tempfile.TemporaryDirectory() as folder:
        source.family.save_lora(folder, get_peft_model_state_dict(_denoiser(source)))
        pipe.load_lora_weights(folder)
    return 1e-4


def _torchao_int8(pipe, family: str) -> float:
    """The denoiser saved and loaded back through diffusers with `TorchAoConfig(Int8WeightOnlyConfig())`, as users
    load a quantized checkpoint."""
    import tempfile

    from diffusers import TorchAoConfig

    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as err:
        raise ImportError("torchao is not installed (`pip install ttalign[quant]`)") from err
    attribute = pipe.family.denoiser_attribute
    denoiser = getattr(pipe, attribute)
    # "only bfloat16 is supported": float32 runs too, and compares exactly
    with diffusers_errors_only(), tempfile.TemporaryDirectory() as folder:
        denoiser.save_pretrained(folder)
        quantized = type(denoiser).from_pretrained(
            folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=denoiser.dtype
        )
    pipe.register_modules(**{attribute: quantized.to(denoiser.device)})
    return 1e-4


def _gguf_q8(pipe, family: str) -> float:
    """The denoiser written as a GGUF file (its matrices with rows of a multiple of 32 in Q8_0 blocks, the rest in
    F32, as GGUF checkpoints keep their small tensors) and loaded with `from_single_file(...,
    quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))`."""
    import os
    import tempfile

    from diffusers import GGUFQuantizationConfig

    try:
        import gguf
    except ImportError as err:
        raise ImportError("gguf is not installed (`pip install ttalign[quant]`)") from err
    attribute = pipe.family.denoiser_attribute
    denoiser = getattr(pipe, attribute)
    q8 = gguf.GGMLQuantizationType.Q8_0
    with tempfile.TemporaryDirectory() as folder:
        denoiser.save_config(folder)
        path = os.path.join(folder, "denoiser.gguf")
        writer = gguf.GGUFWriter(path, arch="ttalign-test")
        for name, tensor in denoiser.state_dict().items():
            array = tensor.detach().float().numpy()
            if tensor.ndim == 2 and array.shape[-1] % 32 == 0:  # [out, in]: Q8_0 blocks of 32 along `in`
                writer.add_tensor(name, gguf.quants.quantize(array, q8), raw_dtype=q8)
            else:
                writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        config = GGUFQuantizationConfig(compute_dtype=torch.float32)
        loaded = type(denoiser).from_single_file(path, config=folder, quantization_config=config)
    pipe.register_modules(**{attribute: loaded.to(denoiser.device)})
    return 1e-4


def _bnb(bits: int) -> Callable:
    """The denoiser in bitsandbytes' 4-bit NF4 (`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`,
    computing in the denoiser's dtype) or LLM.int8 (`load_in_8bit=True`, outliers over 6 in higher precision). On a
    GPU it is saved and loaded back with `from_pretrained`, as users load it. Without one diffusers refuses that load
    ("No GPU found"), so its bitsandbytes quantizer's own loading steps run on the CPU (linear layers replaced by
    `Linear4bit` / `Linear8bitLt`, each weight quantized by `create_quantized_param`) and bitsandbytes' CPU kernels
    compute: the same layers, weights and arithmetic."""

    def quantize(pipe, family: str) -> float:
        import tempfile

        from diffusers import BitsAndBytesConfig

        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError("bitsandbytes is not installed (`pip install ttalign[quant]`)") from err
        attribute = pipe.family.denoiser_attribute
        denoiser = getattr(pipe, attribute)
        if bits == 4:
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=denoiser.dtype
            )
        else:
            config = BitsAndBytesConfig(load_in_8bit=True)
        if torch.cuda.is_available():
            with diffusers_errors_only(), tempfile.TemporaryDirectory() as folder:
                denoiser.save_pretrained(folder)
                quantized = type(denoiser).from_pretrained(
                    folder, quantization_config=config, torch_dtype=denoiser.dtype
                )
            pipe.register_modules(**{attribute: quantized})
            return 1e-4
        from accelerate.utils import set_module_tensor_to_device
        from diffusers.quantizers.bitsandbytes import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

        state = denoiser.state_dict()
        quantizer = (BnB4BitDiffusersQuantizer if bits == 4 else BnB8BitDiffusersQuantizer)(
            config, pre_quantized=False
        )
        keep = list(getattr(denoiser, "_keep_in_fp32_modules", None) or [])
        with diffusers_errors_only():
            quantizer._process_model_before_weight_loading(denoiser, device_map=None, keep_in_fp32_modules=keep)
            for name, value in state.items():
                if quantizer.check_if_quantized_param(denoiser, value, name, state):
                    quantizer.create_quantized_param(denoiser, value, name, torch.device("cpu"), state)
                else:  # what the quantizer leaves to the loader (an 8-bit layer's bias): the tensor as it was
                    set_module_tensor_to_device(denoiser, name, "cpu", value=value)
            quantizer._process_model_after_weight_loading(denoiser)
        return 1e-4

    return quantize


def _dequantized(feature: str) -> Callable:
    """The tiny pipeline with the quantization `feature`'s denoiser, its quantized weights dequantized into ordinary
    float parameters: the same model in plain arithmetic."""

    def build(family: str):
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        pipe = _pipeline(family)
        FEATURES[feature](pipe, family)
        config = getattr(_denoiser(pipe).config, "quantization_config", None)
        if config is not None and config.quant_method == "bitsandbytes":  # Linear4bit / 8bitLt back to nn.Linear
            from diffusers.quantizers.bitsandbytes.utils import dequantize_and_replace

            dequantize_and_replace(_denoiser(pipe), [], quantization_config=config)
        for module in _denoiser(pipe).modules():
            weight = getattr(module, "weight", None)
            if hasattr(weight, "quant_type"):  # GGUF
                module.weight = torch.nn.Parameter(dequantize_gguf_tensor(weight).float(), requires_grad=False)
            elif weight is not None and hasattr(weight, "dequantize"):  # torchao
                module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
        return pipe

    return build


FEATURES: dict[str, Callable] = {
    "vae_tiling": _vae_tiling,
    "vae_slicing": _vae_slicing,
    "model_cpu_offload": _model_cpu_offload,
    "sequential_cpu_offload": _sequential_cpu_offload,
    "group_offload_block": _group_offload("block_level"),
    "group_offload_leaf": _group_offload("leaf_level"),
    "attention_backend": _attention_backend,
    "xformers": _xformers,
    "torch_compile": _compile,
    "lora": _lora,
    "torchao_int8": _torchao_int8,
    "gguf_q8": _gguf_q8,
    "bnb_nf4": _bnb(4),
    "bnb_int8": _bnb(8),
}

#: Features that change the model itself, with the plain model each one must equal: a LoRA merged into the weights,
#: int8 weights dequantized.
EXPECTED: dict[str, Callable] = {}


#: What a feature set up for one cell and must undo after it (the xformers kernel's stand-in).
_CLEANUP = contextlib.ExitStack()


# --- cells --------------------------------------------------------------------------------------------------------


def _pipeline(family: str, feature: str | None = None):
    """A fresh tiny pipeline of `family`, on :data:`DEVICE` unless `feature` places the components itself."""
    from ttalign.testing import get_tiny_family_pipeline

    pipe = get_tiny_family_pipeline(family)
    return pipe if feature in PLACES_COMPONENTS or DEVICE == "cpu" else pipe.to(DEVICE)


def _render(pipe, methods: list, steps: int = 3) -> torch.Tensor:
    flow = "flow_matching" in pipe.family.features
    size = 32 if flow else pipe.family.default_image_size
    out = pipe(
        PROMPTS,
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        alignment=methods,
    )
    return out.images.cpu()


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_cell(family: str, feature: str, method: str, reference: dict | None = None) -> Cell:
    """Runs `method` on the tiny pipeline of `family` with and without `feature` (see the module docstring).
    `reference` caches the runs without a feature, keyed by `(family, method)`."""
    import time

    start = time.perf_counter()
    try:
        cell = _run_cell(family, feature, method, {} if reference is None else reference)
    finally:
        _CLEANUP.close()
    cell.seconds = time.perf_counter() - start
    return cell


def _run_cell(family: str, feature: str, method: str, reference: dict) -> Cell:
    methods = method_factories()
    if feature not in FEATURES:
        raise ValueError(f"Unknown feature {feature!r}; known: {sorted(FEATURES)}.")
    if method not in methods:
        raise ValueError(f"Unknown method {method!r}; known: {sorted(methods)}.")

    def baseline(key):
        if key not in reference:
            reference[key] = _render(_pipeline(family), methods[key[-1]]())
        return reference[key]

    pipe = _pipeline(family, feature)
    try:
        with _quiet():
            tolerance = FEATURES[feature](pipe, family)
    except NotApplicable as err:
        return Cell(family, feature, method, "n/a", message=str(err))
    except NeedsAccelerator as err:
        return Cell(family, feature, method, "gpu", message=str(err))
    except (ValueError, NotImplementedError, ImportError) as err:
        return Cell(family, feature, method, "refused", message=f"{type(err).__name__}: {err}")
    try:
        with _quiet():
            if feature == "torch_compile":
                # A one-step call compiles; the measured call (more steps, the same shapes) must not recompile.
                _render(pipe, methods[method](), steps=1)
                with torch.compiler.set_stance("fail_on_recompile"):
                    images = _render(pipe, methods[method]())
            else:
                images = _render(pipe, methods[method]())
    except (ValueError, NotImplementedError) as err:
        return Cell(family, feature, method, "refused", message=f"{type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - the matrix records what broke
        return Cell(family, feature, method, "error", message=f"{type(err).__name__}: {str(err)[:300]}")
    if feature in EXPECTED:  # the feature changes the model: the method must see what the equivalent plain model gives
        expected = _render(EXPECTED[feature](family), methods[method]())
    else:
        expected = baseline((family, method))
    diff = float((images - expected).abs().max())
    relative = tolerance < 0
    if relative:  # relative to what the feature does to the plain call
        plain_with = images if method == "plain" else _plain_with(family, feature)
        tolerance = 1.5 * float((plain_with - baseline((family, "plain"))).abs().max()) + 1e-4
    status = "same" if diff <= tolerance else "reselects" if relative and method in SELECTS else "differs"
    return Cell(family, feature, method, status, diff, tolerance)


def _plain_with(family: str, feature: str) -> torch.Tensor:
    pipe = _pipeline(family, feature)
    FEATURES[feature](pipe, family)
    return _render(pipe, [])


def _lora_merged(family: str):
    """The tiny pipeline with the `lora` feature's adapter fused into the base weights."""
    pipe = _pipeline(family)
    _add_lora(pipe)
    _denoiser(pipe).fuse_lora()
    return pipe


EXPECTED.update(
    lora=_lora_merged,
    torchao_int8=_dequantized("torchao_int8"),
    gguf_q8=_dequantized("gguf_q8"),
    bnb_nf4=_dequantized("bnb_nf4"),
    bnb_int8=_dequantized("bnb_int8"),
)
