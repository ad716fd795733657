"""Stable Diffusion text-to-image generation (diffusers) as a Ray Data stage.

Loads any diffusers text-to-image pipeline folder or hub id through
``AutoPipelineForText2Image`` (SD 1.x, 2.x, SDXL), swaps the scheduler, and generates a batch of
prompts in one call with one ``torch.Generator`` per sample, so that every image is reproducible
from its row's seed alone (the initial latents of a sample depend only on its own generator).

Offline by default: unless ``offline=False`` or the environment sets ``HF_HUB_OFFLINE=0``, the
model must already be on disk (a local folder, or the Hugging Face cache). A missing model is a
:class:`ModelNotFoundError` that names the id or path and says how to provide it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from generators.columns import (
    ERROR,
    GENERATOR,
    IMAGE,
    INVALID_GENERATION_ERROR,
    INVALID_NSFW,
    PROMPT,
    SEED,
    STATUS,
    STATUS_OK,
    TRUTH_CLASS_ID,
    TRUTH_FAILURE,
    batch_length,
    incoming_status,
    require_columns,
    short_error,
    string_column,
)
from generators.hub import check_hub_model, hub_offline, looks_like_path

SCHEDULERS = {
    "dpm_multistep": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "default": None,
}
DTYPES = ("auto", "float16", "bfloat16", "float32")


class ModelNotFoundError(FileNotFoundError):
    """The model folder or hub id could not be loaded; the message says how to provide it."""


def missing_model_message(model: str, offline: bool, cause: BaseException | None) -> str:
    why = f" ({short_error(cause, 200)})" if cause is not None else ""
    if looks_like_path(model):
        return (
            f"Stable Diffusion model folder {model!r} cannot be loaded{why}. Pass "
            "generation.model=<a folder written by a diffusers pipeline's save_pretrained "
            "(it holds model_index.json)> or a Hugging Face hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    how = (
        f"download it once where there is network (`hf download {model}`, or "
        f"`huggingface-cli download {model}`) into the cache this machine reads (HF_HOME), "
        "or save the pipeline to a folder and pass that folder as generation.model"
    )
    if offline:
        how += "; to let bsgal download it, set HF_HUB_OFFLINE=0"
    return f"Stable Diffusion model {model!r} is not available{why}: {how}"


def _config_dict(component: object) -> dict | None:
    config = getattr(component, "config", None)
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        k: v for k, v in data.items()
        if not k.startswith("_name_or_path") and k not in ("transformers_version",)
    }


def pipeline_fingerprint(pipe: object, settings: Mapping) -> str:
    """8 hex digits over the pipeline's component configs and the generation settings."""
    parts = {"pipeline": _config_dict(pipe), "settings": dict(settings)}
    for name, component in sorted(getattr(pipe, "components", {}).items()):
        parts[name] = _config_dict(component) if component is not None else None
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class StableDiffusionGenerator:
    """Ray Data stage: prompt rows in, rows with a generated ``image`` out.

    Input columns: ``prompt`` (str), ``seed`` (int64); every other column passes through.
    Output adds ``generator`` ("sd:<model>@<hash8>"), ``image`` (uint8 B x R x R x 3, RGB),
    ``truth_failure`` (""), ``truth_class_id`` (-1), ``status``, ``error``.

    Args:
        model: hub id or local folder of a diffusers text-to-image pipeline.
        scheduler: one of :data:`SCHEDULERS` (``default`` keeps the pipeline's own).
        steps: denoising steps.
        guidance: classifier-free guidance scale.
        resolution: image side in pixels (a multiple of 8).
        dtype: ``auto`` (float16 on CUDA, float32 on CPU), ``float16``, ``bfloat16``, ``float32``.
        device: torch device; default ``cuda`` when available, else ``cpu``.
        safety_checker: keep the pipeline's safety checker (off by default, as in the
            reference); flagged images become ``invalid_nsfw`` rows.
        negative_prompt: optional negative prompt for every sample.
        max_batch_size: at most this many prompts per pipeline call (None: the whole batch).
        offline: load from local files only (default: ``HF_HUB_OFFLINE``, offline when unset).
        weights: ``pretrained`` (load ``model``), or ``random`` / ``random_tiny``: build SD
            1.5's architecture (or the tiny test one) with random weights instead, for
            throughput and memory runs (:mod:`generators.random_weights`; the version says
            ``random``).
    """

    name = "sd"

    def __init__(
        self,
        *,
        model: str,
        scheduler: str = "dpm_multistep",
        steps: int = 50,
        guidance: float = 7.5,
        resolution: int = 512,
        dtype: str = "auto",
        device: str | None = None,
        safety_checker: bool = False,
        negative_prompt: str | None = None,
        max_batch_size: int | None = None,
        offline: bool | None = None,
        weights: str = "pretrained",
    ) -> None:
        import torch

        from generators.random_weights import WEIGHTS, architecture_of

        if scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {list(SCHEDULERS)}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
        if resolution <= 0 or resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if weights not in WEIGHTS:
            raise ValueError(f"unknown weights {weights!r}; expected one of {list(WEIGHTS)}")
        self.weights = weights
        self.model = str(model) if weights == "pretrained" else \
            f"random-{architecture_of(weights)}"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        self.steps = int(steps)
        self.guidance = float(guidance)
        self.resolution = int(resolution)
        self.negative_prompt = negative_prompt
        self.max_batch_size = max_batch_size
        self.offline = hub_offline(offline)
        self.pipe = self._load(safety_checker) if weights == "pretrained" else \
            self._build_random(architecture_of(weights))
        # Fingerprint the configs as loaded (before the scheduler swap) plus the settings.
        settings = {"scheduler": scheduler, "steps": self.steps, "guidance": self.guidance,
                    "resolution": self.resolution, "dtype": dtype}
        fingerprint = pipeline_fingerprint(self.pipe, settings)
        if SCHEDULERS[scheduler] is not None:
            import diffusers

            cls = getattr(diffusers, SCHEDULERS[scheduler])
            self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        short = Path(self.model.rstrip("/")).name or self.model
        self.version = f"{self.name}:{short}@{fingerprint}"

    def _build_random(self, architecture: str):
        from generators.random_weights import build_random_pipeline

        pipe = build_random_pipeline(architecture, device=self.device)
        import torch

        for name in ("unet", "vae", "text_encoder"):
            # torch's own cast: diffusers' warns about keeping modules in float32, which is
            # about loading weights saved in another precision (there are none here).
            torch.nn.Module.to(getattr(pipe, name), dtype=self.dtype)
        return pipe

    def _load(self, safety_checker: bool):
        from diffusers import AutoPipelineForText2Image

        model = os.path.expanduser(self.model)
        if looks_like_path(self.model) and not os.path.isdir(model):
            raise ModelNotFoundError(
                missing_model_message(self.model, self.offline, None)
                + f" (no folder at {os.path.abspath(model)})"
            )
        try:
            # model_index.json says which components the pipeline has (SDXL has no checker).
            index = AutoPipelineForText2Image.load_config(model, local_files_only=self.offline)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(missing_model_message(self.model, self.offline, exc)) from exc
        kwargs: dict = {"local_files_only": self.offline, _dtype_keyword(): self.dtype}
        if importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # the default would only warn and fall back
        if not safety_checker and "safety_checker" in index:
            kwargs["safety_checker"] = None
            kwargs["requires_safety_checker"] = False
        try:
            return AutoPipelineForText2Image.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(missing_model_message(self.model, self.offline, exc)) from exc

    def generate(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, list[bool]]:
        """Images for ``prompts`` (uint8 N x R x R x 3) and the safety checker's NSFW flags.

        Raises ``FloatingPointError`` when a decoded image is not finite (fp16 overflow).
        """
        import torch

        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        kwargs = {}
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(prompts)
        with torch.inference_mode():
            result = self.pipe(
                prompt=list(prompts),
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                height=self.resolution,
                width=self.resolution,
                generator=generators,
                output_type="np",
                **kwargs,
            )
        images = np.asarray(result.images, dtype=np.float32)
        if not np.isfinite(images).all():
            raise FloatingPointError("decoded image is not finite (NaN/Inf; fp16 overflow?)")
        nsfw = getattr(result, "nsfw_content_detected", None) or [False] * len(prompts)
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), [bool(x) for x in nsfw]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, (PROMPT, SEED), "StableDiffusionGenerator")
        n = batch_length(batch)
        status, error = incoming_status(batch, n)
        r = self.resolution
        images = np.zeros((n, r, r, 3), dtype=np.uint8)
        todo = [i for i in range(n) if status[i] == STATUS_OK]
        step = self.max_batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            self._fill(batch, todo[start : start + step], images, status, error)
        out = dict(batch)
        out[GENERATOR] = string_column([self.version] * n)
        out[IMAGE] = images
        out[TRUTH_FAILURE] = string_column([""] * n)
        out[TRUTH_CLASS_ID] = np.full(n, -1, dtype=np.int64)
        out[STATUS] = status
        out[ERROR] = error
        return out

    def _fill(self, batch, rows: list[int], images, status, error) -> None:
        """Generate ``rows`` together; if that fails, one by one to isolate the bad row."""
        prompts = [str(batch[PROMPT][i]) for i in rows]
        seeds = [int(batch[SEED][i]) for i in rows]
        try:
            generated, nsfw = self.generate(prompts, seeds)
        except Exception as exc:
            if len(rows) > 1:
                for i in rows:
                    self._fill(batch, [i], images, status, error)
                return
            status[rows[0]] = INVALID_GENERATION_ERROR
            error[rows[0]] = short_error(exc)
            return
        for j, i in enumerate(rows):
            images[i] = generated[j]
            if nsfw[j]:
                status[i] = INVALID_NSFW
                error[i] = "the safety checker flagged this image"


def _dtype_keyword() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); use what it takes."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


# ------------------------------------------------------------------ the backend (generators)

STAGE = StableDiffusionGenerator


def build(section: Mapping[str, Any], *, categories: Any = ()) -> StableDiffusionGenerator:
    """The stage from the ``generation`` section (``model``, ``scheduler``, ``steps``,
    ``guidance``, ``resolution``, ``dtype``, ``safety_checker``)."""
    return StableDiffusionGenerator(
        model=section["model"], scheduler=section["scheduler"], steps=int(section["steps"]),
        guidance=float(section["guidance"]), resolution=int(section["resolution"]),
        dtype=section["dtype"], safety_checker=bool(section["safety_checker"]),
        weights=str(section.get("weights", "pretrained")))


def check_section(section: Mapping[str, Any]) -> list[str]:
    """The problems of the ``generation`` keys this backend reads."""
    problems = []
    resolution, steps = section.get("resolution"), section.get("steps")
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 8:
        problems.append(f"generation.resolution: must be a positive multiple of 8 px, got "
                        f"{resolution!r}")
    if not isinstance(steps, int) or steps < 1:
        problems.append(f"generation.steps: must be >= 1 denoising step, got {steps!r}")
    guidance = section.get("guidance")
    if not isinstance(guidance, (int, float)) or not guidance == guidance or guidance < 0:
        problems.append(f"generation.guidance: must be a number >= 0, got {guidance!r}")
    return problems


def check_weights(section: Mapping[str, Any], report: Any) -> None:
    """``generation.model``: a diffusers folder holding model_index.json, or a cached hub id
    (nothing to check with ``generation.weights: random``: no file is read)."""
    if section.get("weights", "pretrained") != "pretrained":
        report.passed.append(f"generation.weights: {section['weights']} (no weight file read; "
                             "throughput and memory only)")
        return
    check_hub_model(report, "generation.model", section["model"], "model_index.json",
                    lambda m: missing_model_message(m, True, None))
