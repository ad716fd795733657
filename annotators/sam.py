"""SAM (segment-anything) mask annotation as a Ray Data stage, batched over images.

``Sam.forward`` takes a list of images: the image encoder (nearly all of SAM's cost) runs once on
the stacked batch, the prompt encoder and mask decoder run per image. :class:`SamAnnotator` feeds
it up to ``images_per_forward`` images per call, picks among the multimask outputs by predicted
IoU, and inverts the mask for background prompts (see :mod:`annotators.sam_prompts`).

Checkpoints load with ``torch.load(..., weights_only=True)``; :func:`build_sam` builds the
architecture with segment-anything's registry and loads the state dict itself (the registry's own
loader unpickles without ``weights_only``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from annotators.sam_prompts import PROMPTS, SamPrompt, make_prompt
from annotators.stage import Annotation, MaskAnnotator

MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
CHECKPOINT_NAMES = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
CHECKPOINT_HELP = (
    "download the official checkpoint (e.g. {name}, linked from "
    "https://github.com/facebookresearch/segment-anything#model-checkpoints) and pass its path "
    "as annotation.sam_checkpoint"
)


def load_sam_state_dict(model, checkpoint: str | Path) -> None:
    """Load a SAM checkpoint into ``model`` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no file at ``checkpoint`` (the message says where to get one).
        ValueError: the file is not a plain tensor state dict, or does not fit ``model``.
    """
    import torch

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {str(checkpoint)!r} does not exist; "
            + CHECKPOINT_HELP.format(name="sam_vit_h_4b8939.pth")
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals and corrupt files alike
        raise ValueError(
            f"SAM checkpoint {path} cannot be loaded as a tensor state dict with "
            f"weights_only=True ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # some fine-tuning tools wrap the state dict
    if not isinstance(state, dict):
        raise ValueError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"SAM checkpoint {path} does not fit this SAM architecture; check that "
            f"annotation.sam_model_type matches the file ({str(exc)[:300]})"
        ) from None


def build_sam(model_type: str, checkpoint: str | Path):
    """Segment-anything's ``model_type`` architecture with the weights of ``checkpoint``."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {MODEL_TYPES}")
    if not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {str(checkpoint)!r} does not exist; "
            + CHECKPOINT_HELP.format(name=CHECKPOINT_NAMES[model_type])
        )
    from segment_anything import sam_model_registry

    model = sam_model_registry[model_type](checkpoint=None)
    load_sam_state_dict(model, checkpoint)
    return model.eval()


def checkpoint_fingerprint(path: str | Path) -> str:
    """8 hex digits over a file's size and its first and last MiB (fast for GB checkpoints)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()[:8]


def module_fingerprint(model) -> str:
    """8 hex digits over a module's parameter names, shapes and values."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:8]


class SamAnnotator(MaskAnnotator):
    """Ray Data stage: SAM masks for generated single-object images.

    Give either ``checkpoint`` (with ``model_type``) or an already built ``model``
    (a ``segment_anything.modeling.Sam``, e.g. a small one for tests).

    Args:
        model: a built SAM module (takes precedence over ``checkpoint``).
        model_type: ``vit_h``, ``vit_l`` or ``vit_b``.
        checkpoint: path of the official ``.pth`` state dict.
        prompt: ``corners`` (background corner points, mask inverted; DiverGen), ``box``
            (centred box) or ``point`` (centre point).
        multimask: predict 3 masks and keep the one with the highest predicted IoU.
        images_per_forward: images per ``Sam.forward`` call (one image-encoder batch).
        box_margin: margin of the centred box, as a fraction of the image side.
        device: torch device; default ``cuda`` when available, else ``cpu``.
        version: the ``annotator`` column's value (default ``sam:<type>@<fingerprint>``).

    ``mask_score`` is SAM's predicted IoU of the kept mask, clipped to [0, 1].
    """

    def __init__(
        self,
        *,
        model=None,
        model_type: str = "vit_h",
        checkpoint: str | Path | None = None,
        prompt: str = "corners",
        multimask: bool = True,
        images_per_forward: int = 8,
        box_margin: float = 0.05,
        device: str | None = None,
        version: str | None = None,
    ) -> None:
        import torch

        if prompt not in PROMPTS:
            raise ValueError(f"unknown SAM prompt strategy {prompt!r}; expected one of {PROMPTS}")
        if images_per_forward < 1:
            raise ValueError(f"images_per_forward must be >= 1, got {images_per_forward}")
        if model is None:
            if checkpoint is None:
                raise ValueError(
                    "SamAnnotator needs checkpoint= (with model_type=) or model=; "
                    + CHECKPOINT_HELP.format(name=CHECKPOINT_NAMES.get(model_type, "sam_*.pth"))
                )
            model = build_sam(model_type, checkpoint)
            fingerprint = checkpoint_fingerprint(checkpoint)
            kind = model_type
        else:
            # A given version (random weights) spares hashing a large model's values.
            fingerprint = "" if version else module_fingerprint(model)
            kind = "custom"
        from segment_anything.utils.transforms import ResizeLongestSide

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.transform = ResizeLongestSide(self.model.image_encoder.img_size)
        self.prompt = prompt
        self.multimask = bool(multimask)
        self.images_per_forward = int(images_per_forward)
        self.box_margin = float(box_margin)
        self.version = version or f"sam:{kind}@{fingerprint}"

    @classmethod
    def from_checkpoint(cls, model_type: str, checkpoint: str | Path, **kwargs) -> "SamAnnotator":
        """Build from an official checkpoint file."""
        return cls(model_type=model_type, checkpoint=checkpoint, **kwargs)

    def _model_input(self, image: np.ndarray, prompt: SamPrompt) -> dict:
        """One ``Sam.forward`` record: resized CHW float image and transformed prompts."""
        import torch

        size = image.shape[:2]
        resized = self.transform.apply_image(image)
        record = {
            "image": torch.as_tensor(resized, device=self.device).permute(2, 0, 1).float(),
            "original_size": size,
        }
        if prompt.points is not None:
            coords = self.transform.apply_coords(prompt.points, size)
            record["point_coords"] = torch.as_tensor(
                coords[None], dtype=torch.float32, device=self.device
            )
            record["point_labels"] = torch.as_tensor(
                prompt.labels[None], dtype=torch.int64, device=self.device
            )
        if prompt.box is not None:
            box = self.transform.apply_boxes(prompt.box[None], size)
            record["boxes"] = torch.as_tensor(box, dtype=torch.float32, device=self.device)
        return record

    def _forward(self, images: Sequence[np.ndarray]) -> list[Annotation]:
        """One ``Sam.forward`` over ``images`` (the encoder sees them as one batch)."""
        prompts = [make_prompt(self.prompt, *im.shape[:2], self.box_margin) for im in images]
        records = [self._model_input(im, p) for im, p in zip(images, prompts)]
        outputs = self.model(records, multimask_output=self.multimask)
        results = []
        for out, prompt in zip(outputs, prompts):
            iou = out["iou_predictions"][0].float()
            best = int(iou.argmax())
            mask = out["masks"][0, best].cpu().numpy().astype(bool)
            if prompt.invert:
                mask = ~mask
            results.append(Annotation(mask, float(iou[best])))
        return results

    def annotate_images(self, images: Sequence[np.ndarray]) -> list[Annotation | BaseException]:
        results: list[Annotation | BaseException] = []
        step = self.images_per_forward
        for start in range(0, len(images), step):
            chunk = list(images[start : start + step])
            try:
                results.extend(self._forward(chunk))
            except Exception:
                # Isolate the failing image(s): redo this chunk one image at a time.
                for image in chunk:
                    try:
                        results.extend(self._forward([image]))
                    except Exception as exc:
                        results.append(exc)
        return results


# ------------------------------------------------------------------ the backend (annotators)

STAGE = SamAnnotator


#: ``annotation.weights``: the checkpoint's, or random weights of ``sam_model_type``'s real
#: size (``random``) or of the tiny test SAM (``random_tiny``), for throughput and memory runs.
WEIGHTS = ("pretrained", "random", "random_tiny")


def build_random_sam(model_type: str, device: Any = None) -> Any:
    """SAM of ``model_type`` (``vit_h``: 641 M parameters) or ``tiny`` with random weights,
    initialised on ``device``: it costs what the real one costs, its masks mean nothing."""
    import torch

    if model_type == "tiny":
        from annotators.tiny import build_tiny_sam

        return build_tiny_sam()
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; expected one of {MODEL_TYPES}")
    from segment_anything import sam_model_registry

    with torch.device(device or "cpu"):
        return sam_model_registry[model_type](checkpoint=None).eval()


def build(section: Mapping[str, Any]) -> SamAnnotator:
    """The stage from the ``annotation`` section (``sam_model_type``, ``sam_checkpoint``,
    ``prompt``, ``weights``)."""
    weights = section.get("weights", "pretrained")
    if weights == "pretrained":
        return SamAnnotator(model_type=section["sam_model_type"],
                            checkpoint=section["sam_checkpoint"], prompt=section["prompt"])
    if weights not in WEIGHTS:
        raise ValueError(f"annotation.weights {weights!r}: one of {list(WEIGHTS)}")
    import torch

    kind = "tiny" if weights == "random_tiny" else section["sam_model_type"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return SamAnnotator(model=build_random_sam(kind, device), prompt=section["prompt"],
                        version=f"sam:random-{kind}")


def check_section(section: Mapping[str, Any]) -> list[str]:
    """The problems of the ``annotation`` keys this backend reads."""
    if section.get("weights", "pretrained") != "pretrained":
        return []  # random weights read no checkpoint
    if not section.get("sam_checkpoint"):
        return ["annotation.sam_checkpoint: required when annotation.backend=sam; download e.g. "
                "sam_vit_h_4b8939.pth and pass annotation.sam_checkpoint=/path/to/it"]
    return []


def check_sam_checkpoint(path: str) -> str | None:
    """None when ``path`` is a tensor state dict that ``weights_only=True`` opens, else why
    not. The file is memory-mapped, not read."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        return f"{path!r} does not exist; " + CHECKPOINT_HELP.format(name="sam_vit_h_4b8939.pth")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, not a zip checkpoint, or pickled objects
        return (f"{path} cannot be opened as a tensor state dict with weights_only=True "
                f"({type(exc).__name__}: {str(exc)[:160]})")
    if not isinstance(state, dict) or not state:
        return f"{path} holds no state dict"
    return None


def check_weights(section: Mapping[str, Any], report: Any) -> None:
    """``annotation.sam_checkpoint`` opens as a tensor state dict (memory-mapped, not read)."""
    if section.get("weights", "pretrained") != "pretrained":
        report.passed.append(f"annotation.weights: {section['weights']} (no SAM checkpoint "
                             "read; throughput and memory only)")
        return
    path = section.get("sam_checkpoint")
    if not path:
        return
    problem = check_sam_checkpoint(path)
    if problem:
        report.add("annotation.sam_checkpoint", f"annotation.sam_checkpoint: {problem}")
    else:
        report.passed.append(f"SAM checkpoint {path} opens")
