"""CLIP text-image similarity of a cut-out, the score X-Paste filters on (kept if >= 0.21).

``ClipScorer`` loads a transformers ``CLIPModel`` and its processor from a hub id or folder
(offline by default, like the generator) and returns the cosine similarity between each image
and its text, in [-1, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from generators.hub import hub_offline


class ClipScorer:
    """Cosine similarity of images and texts under a CLIP model.

    Args:
        model: hub id (e.g. ``openai/clip-vit-base-patch32``) or a folder holding a CLIP model
            and its processor (``save_pretrained`` of both).
        device: torch device; default ``cuda`` when available, else ``cpu``.
        offline: local files only (default: ``HF_HUB_OFFLINE``, offline when unset).
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-base-patch32",
        *,
        device: str | None = None,
        offline: bool | None = None,
    ) -> None:
        import torch
        from transformers import AutoProcessor, CLIPModel

        local = hub_offline(offline)
        where = os.path.expanduser(str(model))
        try:
            self.model = CLIPModel.from_pretrained(where, local_files_only=local)
            self.processor = AutoProcessor.from_pretrained(where, local_files_only=local)
        except (OSError, ValueError) as exc:
            folder = Path(where).is_dir()
            how = (
                "the folder must hold a CLIPModel and its processor (save_pretrained of both)"
                if folder
                else f"download it once where there is network (`hf download {model}`) into "
                "the cache this machine reads (HF_HOME), or pass a local folder"
                + ("; or set HF_HUB_OFFLINE=0 to let bsgal download it" if local else "")
            )
            raise FileNotFoundError(
                f"CLIP model {str(model)!r} for annotation.clip_score cannot be loaded "
                f"({type(exc).__name__}: {str(exc)[:200]}): {how}"
            ) from exc
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device).eval()
        self.name = str(model)

    def score(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity per (image, text) pair: float32 [N] in [-1, 1].

        Args:
            images: N RGB uint8 arrays (h x w x 3, any sizes).
            texts: N strings.
        """
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return np.zeros(0, dtype=np.float32)
        inputs = self.processor(
            text=list(texts), images=list(images), return_tensors="pt", padding=True,
            truncation=True,
        ).to(self.device)
        with torch.inference_mode():
            out = self.model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image * text).sum(-1).cpu().numpy().astype(np.float32)
