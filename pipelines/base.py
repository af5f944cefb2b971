"""What every aligned pipeline shares beside its family's `__call__`: default methods, and sampling defaults that
travel with a model folder.

A model folder may hold `ttalign_sampling.json`, keyword arguments of the call the model was trained and evaluated
with (for the embedded flow shapes model: its steps, guidance scale and T5 sequence length). `from_pretrained` of an
aligned pipeline reads it into `sampling_defaults`, `save_pretrained` writes it, `from_pipe` carries it over, and a
call takes each of them for an argument it leaves out; an argument the caller gives always wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import os
from dataclasses import dataclass

#: The file of a model folder holding its sampling defaults.
SAMPLING_DEFAULTS_FILE = "ttalign_sampling.json"

#: True while `AlignedPipelineMixin.from_pipe` builds a pipeline for a caller who asked for no dtype: the cast to
#: float32 that diffusers' `from_pipe` ends with is skipped.
_KEEP_DTYPES = contextvars.ContextVar("ttalign_keep_dtypes", default=False)


def read_sampling_defaults(folder) -> dict:
    """The sampling defaults a local model folder holds (`{}` for a hub id or a folder without them); `ValueError`
    for a file that is not a JSON object."""
    path = os.path.join(folder, SAMPLING_DEFAULTS_FILE) if isinstance(folder, (str, os.PathLike)) else None
    if path is None or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            defaults = json.load(f)
        except ValueError:
            defaults = None
    if not isinstance(defaults, dict) or not all(isinstance(k, str) for k in defaults):
        raise ValueError(f"{path} must hold a JSON object of call arguments.")
    return defaults


def write_sampling_defaults(folder, defaults: dict) -> None:
    with open(os.path.join(folder, SAMPLING_DEFAULTS_FILE), "w", encoding="utf-8") as f:
        json.dump(dict(defaults), f, indent=2, sort_keys=True)


def uses_sampling_defaults(call):
    """Decorates an aligned `__call__`: the pipeline's `sampling_defaults` fill the arguments a call leaves out."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        defaults = self.sampling_defaults
        if defaults:
            given = signature.bind_partial(self, *args, **kwargs).arguments
            unknown = sorted(set(defaults) - set(signature.parameters))
            if unknown:
                raise TypeError(f"sampling_defaults name {unknown}, which {type(self).__name__} does not take.")
            kwargs.update({k: v for k, v in defaults.items() if k not in given})
        return call(self, *args, **kwargs)

    return wrapper


def call_default(pipe, name: str, fallback=None):
    """The value a call of `pipe` takes for argument `name` when it leaves it out: the pipeline's sampling default,
    else its `__call__` signature's default, else `fallback`."""
    defaults = getattr(pipe, "sampling_defaults", None) or {}
    if name in defaults:
        return defaults[name]
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


@dataclass(frozen=True)
class ParentCall:
    """The diffusers `__call__` an aligned `__call__` is a copy of: the diffusers version it mirrors and the SHA-256 of
    that method's source there. `changed(parent)` says what to re-check when the installed parent's source differs."""

    version: str
    sha256: str

    @staticmethod
    def fingerprint(parent: type) -> str:
        return hashlib.sha256(inspect.getsource(parent.__call__).encode()).hexdigest()

    def changed(self, parent: type, aligned: type) -> str | None:
        import diffusers

        if self.fingerprint(parent) == self.sha256:
            return None
        return (
            f"diffusers {diffusers.__version__}'s {parent.__name__}.__call__ is not the one "
            f"{aligned.__name__}.__call__ mirrors (diffusers {self.version}): compare the two line by line, port "
            f"the parent's changes into the copy, rerun the parity tests, then record the new version and "
            f"fingerprint ({self.fingerprint(parent)}) in {aligned.__name__}.parent_call."
        )


class AlignedPipelineMixin:
    """Put first among an aligned pipeline's bases (before its diffusers parent).

    Attributes:
        alignment (`list[AlignmentMethod]`):
            Methods used when a call passes no `alignment` (set by [`ttalign.align`]); empty by default.
        sampling_defaults (`dict`):
            Call arguments used when a call leaves them out, read from the model folder's `ttalign_sampling.json`;
            empty by default (the parent's defaults).
    """

    alignment: list = []
    sampling_defaults: dict = {}
    #: The parent `__call__` this class's `__call__` mirrors (set by each family).
    parent_call: ParentCall | None = None

    @property
    def family(self):
        """This pipeline's [`~ttalign.pipelines.family.ModelFamily`], from the registry: what alignment methods know of
        the model."""
        from .family import family_entry

        return family_entry(self).family(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        defaults = read_sampling_defaults(pretrained_model_name_or_path)
        if defaults:
            pipe.sampling_defaults = defaults
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe` (the new pipeline shares `pipeline`'s components), keeping the components' dtypes
        unless `torch_dtype` (or `dtype`) asks for one.

        diffusers' own `from_pipe` casts every component to float32 when no dtype is given
        ([diffusers#12754](https://github.com/huggingface/diffusers/issues/12754)); since the components are shared,
        that would silently double the memory of a float16 or bfloat16 pipeline, the caller's own included, and a
        quantized denoiser refuses the cast. Here the components stay as they are, each in its own dtype.
        """
        keep = kwargs.get("torch_dtype") is None and kwargs.get("dtype") is None
        token = _KEEP_DTYPES.set(keep)
        try:
            pipe = super().from_pipe(pipeline, **kwargs)
        finally:
            _KEEP_DTYPES.reset(token)
        defaults = getattr(pipeline, "sampling_defaults", None)
        if defaults:
            pipe.sampling_defaults = dict(defaults)
        return pipe

    def to(self, *args, **kwargs):
        # the cast diffusers' `from_pipe` ends with, `to(dtype=...)`, when its caller asked for no dtype
        if _KEEP_DTYPES.get() and not args and set(kwargs) == {"dtype"}:
            return self
        return super().to(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.sampling_defaults:
            write_sampling_defaults(save_directory, self.sampling_defaults)


@contextlib.contextmanager
def diffusers_errors_only():
    """diffusers logs errors only inside the block (its warnings about what the caller does on purpose)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
