"""Prompt sampling and text-to-image generation: the first stages of the candidate stream.

Every stage is a callable class (load in ``__init__``, transform one batch in ``__call__``) that
works in plain Python and as a Ray Data ``map_batches`` stage. A batch is a dict of equal-length
numpy columns; one row is one candidate. This package must not import annotators, trainer or ray.

Columns (docs/contracts.md, Candidate; names in :mod:`generators.columns`)
--------------------------------------------------------------------------
Set by :class:`PromptSampler` (the input rows of the Ray graph):

- ``sample_id`` str: BLAKE2b of (run id, class id, prompt, seed, generator name); deterministic.
- ``class_id`` int64: LVIS category id the prompt asks for.
- ``class_name`` str: its LVIS name.
- ``prompt`` str: the text prompt.
- ``prompt_option`` int64: which of the class's prompt options (templates, then extra prompts)
  it is; a closed-loop run steers these (:mod:`generators.allocation`).
- ``seed`` int64: per-sample seed in [0, 2**53); the generator reproduces the image from it.

Added by a generator (:class:`ProceduralGenerator`, :class:`StableDiffusionGenerator`):

- ``generator`` str: name + version/hash, e.g. ``"procedural@1"``,
  ``"sd:stable-diffusion-v1-5@1a2b3c4d"`` (hash of the pipeline's configs and the settings).
- ``image`` uint8 [B, H, W, 3]: RGB in [0, 255], fixed H, W within a run.
- ``truth_failure`` str: built-in generator only, ``"none"``, ``"wrong_class"``, ``"broken"``,
  ``"clutter"``, ``"noise"``; ``""`` when unknown (Stable Diffusion). The selector never reads it.
- ``truth_class_id`` int64: built-in generator only, the class actually drawn (-1: none/unknown).
- ``truth_mask`` bool [B, H, W]: built-in generator only and only with ``emit_truth_mask=True``.
- ``status`` str: ``"ok"`` or ``"invalid_<why>"`` (``invalid_generation_error``,
  ``invalid_unknown_class``, ``invalid_nsfw``); a row that came in invalid is passed through.
- ``error`` str: ``""`` or a short message for invalid rows.

A failing row never raises and is never dropped: it keeps flowing with its ``invalid_*`` status.
Stages never write into their input arrays, so ``map_batches(..., zero_copy_batch=True)``
is safe. Ray Data costs roughly 10-40 ms per batch on a small CPU machine
(``benchmarks/stages.py``): give cheap CPU stages batches of ~128 rows.

Backends
--------
:data:`GENERATORS` (a :class:`generators.backends.BackendRegistry`) holds the backends by name;
each backend module has its stage class, ``build(section, categories=...)`` from the
``generation`` config section and the checks of the keys it reads. A new generator is one new
module with those plus one line in :data:`GENERATORS` (``GENERATORS.register`` from elsewhere
reaches only the process that calls it: a test, not a run's Ray actors).
"""

from __future__ import annotations

from generators.backends import BackendRegistry
from generators.columns import lazy_attribute
from generators.prompts import DEFAULT_TEMPLATE, PromptSampler, make_sample_id
from generators.vocabulary import ClassInfo, ClassVocabulary, UnknownClassError

#: The generator backends: name -> module (imported on use, so the procedural path never loads
#: torch). ``generation.backend: pool`` is not a generator: the pool is the other source
#: (pipeline/run/pool_source.py).
GENERATORS = BackendRegistry("generator", "generation", {
    "procedural": "generators.procedural",
    "stable_diffusion": "generators.stable_diffusion",
})


def generator_class(backend: str) -> type:
    """The stage class registered for ``backend``."""
    return GENERATORS.get(backend).STAGE


def build_generator(backend: str, **kwargs):
    """Construct the generator stage for ``backend`` with its keyword arguments."""
    return generator_class(backend)(**kwargs)


def build_generator_stage(backend: str, section, categories=()):
    """The generator stage of ``backend`` from the ``generation`` section (a mapping) and the
    training set's category dicts (what Ray Data actors call)."""
    return GENERATORS.build(backend, section, categories=list(categories))


#: Lazy re-exports: importing the package must stay cheap (no torch/diffusers).
_LAZY = {
    "ProceduralGenerator": "generators.procedural",
    "StableDiffusionGenerator": "generators.stable_diffusion",
    "ModelNotFoundError": "generators.stable_diffusion",
}


def __getattr__(name: str):
    return lazy_attribute("generators", _LAZY, name)


__all__ = [
    "DEFAULT_TEMPLATE",
    "GENERATORS",
    "ClassInfo",
    "ClassVocabulary",
    "ModelNotFoundError",
    "ProceduralGenerator",
    "PromptSampler",
    "StableDiffusionGenerator",
    "UnknownClassError",
    "build_generator",
    "build_generator_stage",
    "generator_class",
    "make_sample_id",
]
