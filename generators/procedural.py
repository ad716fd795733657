"""The built-in procedural generator: the embedded stand-in for Stable Diffusion.

It draws the prompted class's object (with the look the built-in dataset uses for that class)
roughly centred on a plain near-white background, like "a photo of a single {name}, in a white
background". Like a real generator it sometimes fails, at configurable rates:

- ``wrong_class``: the object of another class;
- ``broken``: a partial object (cut by a line, or half out of the frame) or the right shape in
  the wrong colours;
- ``clutter``: several small objects of random classes plus scattered junk blobs;
- ``noise``: the right object under heavy pixel noise.

What it really drew is recorded in ``truth_failure`` ("none" when it succeeded) and
``truth_class_id`` (the class drawn; -1 for clutter), which the selector never reads, so that
experiments can measure the precision and recall of acceptance. With ``emit_truth_mask=True`` a
``truth_mask`` column (bool B x H x W, the drawn object's pixels; the union of all objects for
clutter) is added as well. Every image is a pure function of (class id, seed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from generators.columns import (
    CLASS_ID,
    ERROR,
    GENERATOR,
    IMAGE,
    INVALID_GENERATION_ERROR,
    INVALID_UNKNOWN_CLASS,
    PROMPT_OPTION,
    SEED,
    STATUS,
    STATUS_OK,
    TRUTH_CLASS_ID,
    TRUTH_FAILURE,
    TRUTH_MASK,
    batch_length,
    incoming_status,
    require_columns,
    short_error,
    string_column,
)
from generators.looks import ObjectLook, render_object
from generators.vocabulary import ClassVocabulary

VERSION = 1
FAILURES = ("wrong_class", "broken", "clutter", "noise")
DEFAULT_FAILURE_RATES = {"wrong_class": 0.1, "broken": 0.1, "clutter": 0.1, "noise": 0.1}
# Fraction of the image the object covers on a successful sample (the issue asks ~15-60 %).
COVERAGE = (0.18, 0.5)

#: The smallest image side the built-in generator draws (px).
MIN_IMAGE_SIZE = 16


@dataclass(frozen=True)
class ProceduralSample:
    """One rendered sample.

    Attributes:
        image: H x W x 3 uint8 RGB.
        truth_mask: H x W bool, the pixels of the drawn object(s).
        failure: ``"none"`` or one of :data:`FAILURES`.
        truth_class_id: the class actually drawn (-1 for clutter).
    """

    image: np.ndarray
    truth_mask: np.ndarray
    failure: str
    truth_class_id: int


def check_failure_rates(rates: Mapping[str, float] | None) -> dict[str, float]:
    """Validated copy of a ``{failure: rate}`` dict (missing failures get rate 0)."""
    rates = dict(DEFAULT_FAILURE_RATES if rates is None else rates)
    out = {name: 0.0 for name in FAILURES}
    for name, rate in rates.items():
        if name not in FAILURES:
            raise ValueError(f"failure_rates: unknown failure {name!r}; expected {FAILURES}")
        if not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"failure_rates[{name!r}] must be a number in [0, 1], got {rate!r}")
        out[name] = float(rate)
    if sum(out.values()) > 1.0 + 1e-9:
        raise ValueError(f"failure_rates must sum to at most 1, got {sum(out.values()):.3f}")
    return out


def _looks_from_vocabulary(vocab: ClassVocabulary) -> dict[int, ObjectLook]:
    without = [c.name for c in vocab if c.look is None]
    if without:
        raise ValueError(
            f"the procedural generator only knows the built-in classes (categories with a "
            f"'look' field); {vocab.source or 'the vocabulary'} has {len(without)} class(es) "
            f"without one (e.g. {', '.join(without[:3])}). For a real vocabulary such as LVIS "
            "use the Stable Diffusion generator (generation.backend=stable_diffusion)"
        )
    return {c.id: ObjectLook.from_dict(c.look) for c in vocab}


def _seed_sequence(seed: int, class_id: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) % 2**64, int(class_id) % 2**64, VERSION])


class ProceduralGenerator:
    """Ray Data stage: prompt rows in, rows with a rendered ``image`` out.

    Input columns: ``class_id`` (int64), ``seed`` (int64); every other column passes through.
    Output adds ``generator`` ("procedural@1"), ``image`` (uint8 B x S x S x 3),
    ``truth_failure``, ``truth_class_id``, ``status``, ``error`` (and ``truth_mask``).

    Args:
        lvis_json: the built-in set's JSON (its categories carry ``"look"``), or
        categories: LVIS category dicts with ``"look"``, or
        num_classes: use the built-in classes 1..K without a file (default 12 when none given).
        image_size: side of the square images in pixels.
        failure_rates: ``{wrong_class, broken, clutter, noise}`` -> probability (sum <= 1).
        failure_by_class: ``{class name or id: total failure rate}``: these classes fail that
            often in all, the kinds in the proportions of ``failure_rates`` (benchmarks of
            closed-loop generation, where some classes are harder to draw than others).
        failure_by_option: one multiplier per prompt option (``prompt_option`` column: a
            class's templates, then its extra prompts) on the row's total failure rate
            (capped at 1): some prompts work better than others.
        emit_truth_mask: also output ``truth_mask``.
    """

    name = "procedural"

    def __init__(
        self,
        *,
        lvis_json: str | Path | None = None,
        categories: Sequence[Mapping] | None = None,
        num_classes: int | None = None,
        image_size: int = 128,
        failure_rates: Mapping[str, float] | None = None,
        failure_by_class: Mapping[str | int, float] | None = None,
        failure_by_option: Sequence[float] | None = None,
        emit_truth_mask: bool = False,
        storage_options: Mapping | None = None,
    ) -> None:
        given = sum(x is not None for x in (lvis_json, categories, num_classes))
        if given > 1:
            raise ValueError("give at most one of lvis_json, categories and num_classes")
        if lvis_json is not None:
            vocab = ClassVocabulary.from_lvis_json(lvis_json, storage_options)
        elif categories is not None:
            vocab = ClassVocabulary.from_categories(categories)
        else:
            vocab = ClassVocabulary.builtin(12 if num_classes is None else num_classes)
        self.looks = _looks_from_vocabulary(vocab)
        self.class_ids = sorted(self.looks)
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}")
        self.image_size = int(image_size)
        self.failure_rates = check_failure_rates(failure_rates)
        self.failure_by_class = {}
        for key, total in (failure_by_class or {}).items():
            if not isinstance(total, (int, float)) or not 0.0 <= float(total) <= 1.0:
                raise ValueError(f"failure_by_class[{key!r}] must be a number in [0, 1], "
                                 f"got {total!r}")
            self.failure_by_class[vocab.get(key).id] = float(total)
        self.failure_by_option = [float(m) for m in (failure_by_option or [])]
        if any(not m >= 0 for m in self.failure_by_option):
            raise ValueError(f"failure_by_option: multipliers must be >= 0, got "
                             f"{self.failure_by_option}")
        self.emit_truth_mask = bool(emit_truth_mask)
        self.version = f"{self.name}@{VERSION}"

    # ------------------------------------------------------------------ drawing

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        base = rng.uniform(240, 253) + rng.uniform(-2, 2, size=3)
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = base
        img += rng.normal(0, 1.5, size=img.shape).astype(np.float32)
        return img

    def _paste(
        self,
        canvas: np.ndarray,
        look: ObjectLook,
        rng: np.random.Generator,
        coverage: float,
        centre: tuple[float, float],
        fit: bool = True,
    ) -> np.ndarray:
        """Draw ``look`` covering ~``coverage`` of the image around ``centre`` (y, x in px).

        With ``fit`` the object's box is shrunk and shifted to lie inside the image; without
        it the object may hang over the edge (the part outside is not drawn).
        """
        size = self.image_size
        theta = rng.uniform(0, 2 * math.pi)
        # Fill fraction of the shape in its box does not depend on the box size (the shape is
        # stretched with it), so probe it on a small box to size the real one.
        _, probe = render_object(look, 32, 32, np.random.default_rng(0), rotation=theta)
        fill = max(float(probe.mean()), 0.05)
        area = coverage * size * size / fill
        aspect = rng.uniform(0.8, 1.25)
        h = int(np.clip(round(math.sqrt(area * aspect)), 4, 2 * size))
        w = int(np.clip(round(math.sqrt(area / aspect)), 4, 2 * size))
        if fit:
            h, w = min(h, int(0.94 * size)), min(w, int(0.94 * size))
        rgb, local = render_object(look, h, w, rng, rotation=theta)
        y0, x0 = int(round(centre[0] - h / 2)), int(round(centre[1] - w / 2))
        if fit:
            y0, x0 = int(np.clip(y0, 1, size - h - 1)), int(np.clip(x0, 1, size - w - 1))
        # Clip the object's box to the canvas (an object may hang over the edge).
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + h, size), min(x0 + w, size)
        mask = np.zeros((size, size), dtype=bool)
        if ye <= ys or xe <= xs:
            return mask
        sub = local[ys - y0 : ye - y0, xs - x0 : xe - x0]
        mask[ys:ye, xs:xe] = sub
        canvas[ys:ye, xs:xe][sub] = rgb[ys - y0 : ye - y0, xs - x0 : xe - x0][sub]
        return mask

    def _centre(self, rng: np.random.Generator) -> tuple[float, float]:
        size = self.image_size
        return tuple(size / 2 + rng.uniform(-0.06, 0.06, size=2) * size)

    def failure_rates_for(self, class_id: int, option: int = -1) -> dict[str, float]:
        """The failure rate of each kind for a class drawn with prompt option ``option``."""
        rates = dict(self.failure_rates)
        total = sum(rates.values())
        want = self.failure_by_class.get(int(class_id), total)
        if 0 <= option < len(self.failure_by_option):
            want *= self.failure_by_option[option]
        want = min(want, 1.0)
        if total <= 0:
            return {name: want / len(FAILURES) for name in FAILURES}
        return {name: rate * want / total for name, rate in rates.items()}

    def _pick_failure(self, rng: np.random.Generator, rates: Mapping[str, float]) -> str:
        u = rng.random()
        edge = 0.0
        for name in FAILURES:
            edge += rates[name]
            if u < edge:
                return name
        return "none"

    def render(self, class_id: int, seed: int, option: int = -1) -> ProceduralSample:
        """Draw the sample for (``class_id``, ``seed``) asked for with prompt option
        ``option`` (-1: unknown); KeyError if the class has no look."""
        class_id = int(class_id)
        if class_id not in self.looks:
            raise KeyError(class_id)
        rng = np.random.default_rng(_seed_sequence(seed, class_id))
        failure = self._pick_failure(rng, self.failure_rates_for(class_id, option))
        canvas = self._background(rng)
        look = self.looks[class_id]
        drawn = class_id
        coverage = rng.uniform(*COVERAGE)
        if failure == "wrong_class":
            others = [c for c in self.class_ids if c != class_id]
            if others:
                drawn = int(rng.choice(others))
                look = self.looks[drawn]
            else:  # a one-class vocabulary has no other class: draw a stranger
                look = _recoloured(look, rng)
            mask = self._paste(canvas, look, rng, coverage, self._centre(rng))
        elif failure == "broken":
            mask = self._broken(canvas, look, rng, coverage)
        elif failure == "clutter":
            drawn = -1
            mask = self._clutter(canvas, rng)
        else:
            mask = self._paste(canvas, look, rng, coverage, self._centre(rng))
            if failure == "noise":
                canvas = _heavy_noise(canvas, rng)
        image = np.clip(canvas, 0, 255).astype(np.uint8)
        return ProceduralSample(image, mask, failure, drawn)

    def _broken(
        self, canvas: np.ndarray, look: ObjectLook, rng: np.random.Generator, coverage: float
    ) -> np.ndarray:
        kind = rng.integers(3)
        if kind == 0:  # wrong colours and texture, right shape
            return self._paste(canvas, _recoloured(look, rng), rng, coverage, self._centre(rng))
        if kind == 1:  # half out of the frame
            size = self.image_size
            side = rng.integers(4)
            centre = [size / 2, size / 2]
            axis, sign = side // 2, 1 if side % 2 else -1
            centre[axis] += sign * size * rng.uniform(0.45, 0.55)
            return self._paste(canvas, look, rng, coverage, (centre[0], centre[1]), fit=False)
        # Cut by a line: the part beyond a random chord is painted over with background.
        before = canvas.copy()
        mask = self._paste(canvas, look, rng, coverage, self._centre(rng))
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            return mask
        phi = rng.uniform(0, 2 * math.pi)
        proj = ys * math.sin(phi) + xs * math.cos(phi)
        cut = np.quantile(proj, rng.uniform(0.4, 0.65))
        gone = np.zeros_like(mask)
        gone[ys[proj > cut], xs[proj > cut]] = True
        canvas[gone] = before[gone]
        return mask & ~gone

    def _clutter(self, canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(3, 6))):
            cid = int(rng.choice(self.class_ids))
            centre = tuple(rng.uniform(0.15, 0.85, size=2) * size)
            mask |= self._paste(
                canvas, self.looks[cid], rng, rng.uniform(0.03, 0.09), centre, fit=False
            )
        yy, xx = np.mgrid[0:size, 0:size]
        for _ in range(int(rng.integers(3, 9))):  # junk: small blobs of random colour
            cy, cx = rng.uniform(0, size, size=2)
            r = rng.uniform(0.015, 0.05) * size
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            canvas[blob] = rng.uniform(0, 200, size=3)
            mask |= blob
        return mask

    # ------------------------------------------------------------------ stage

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, (CLASS_ID, SEED), "ProceduralGenerator")
        n = batch_length(batch)
        size = self.image_size
        status, error = incoming_status(batch, n)
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        truth_masks = np.zeros((n, size, size), dtype=bool)
        failures = [""] * n
        truth_ids = np.full(n, -1, dtype=np.int64)
        options = np.asarray(batch[PROMPT_OPTION]) if PROMPT_OPTION in batch else None
        for i in range(n):
            if status[i] != STATUS_OK:
                continue
            class_id = int(batch[CLASS_ID][i])
            if class_id not in self.looks:
                status[i] = INVALID_UNKNOWN_CLASS
                error[i] = (
                    f"class_id {class_id} has no look; the procedural generator only knows "
                    f"the built-in classes {self.class_ids}"
                )
                continue
            try:
                sample = self.render(class_id, int(batch[SEED][i]),
                                     int(options[i]) if options is not None else -1)
            except Exception as exc:  # one bad row must not kill the batch
                status[i] = INVALID_GENERATION_ERROR
                error[i] = short_error(exc)
                continue
            images[i] = sample.image
            truth_masks[i] = sample.truth_mask
            failures[i] = sample.failure
            truth_ids[i] = sample.truth_class_id
        out = dict(batch)
        out[GENERATOR] = string_column([self.version] * n)
        out[IMAGE] = images
        out[TRUTH_FAILURE] = string_column(failures)
        out[TRUTH_CLASS_ID] = truth_ids
        out[STATUS] = status
        out[ERROR] = error
        if self.emit_truth_mask:
            out[TRUTH_MASK] = truth_masks
        return out


def _recoloured(look: ObjectLook, rng: np.random.Generator) -> ObjectLook:
    """``look``'s shape in a far-off hue and another texture."""
    import colorsys

    h, _, _ = colorsys.rgb_to_hls(*(c / 255.0 for c in look.color))
    hue = (h + rng.uniform(0.3, 0.7)) % 1.0
    color = tuple(int(c * 255) for c in colorsys.hls_to_rgb(hue, 0.5, 0.75))
    accent = tuple(int(c * 255) for c in colorsys.hls_to_rgb(hue, 0.25, 0.6))
    textures = [t for t in ("solid", "stripes", "dots", "checker") if t != look.texture]
    return ObjectLook(look.shape, color, str(rng.choice(textures)), accent)


def _heavy_noise(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise (sigma 60-100) plus 15 % salt-and-pepper over the whole image."""
    noisy = canvas + rng.normal(0, rng.uniform(60, 100), size=canvas.shape).astype(np.float32)
    salt = rng.random(canvas.shape[:2]) < 0.15
    noisy[salt] = rng.choice([0.0, 255.0], size=(int(salt.sum()), 1))
    return noisy


# ------------------------------------------------------------------ the backend (generators)

STAGE = ProceduralGenerator


def build(section: Mapping[str, Any], *, categories: Sequence[Mapping] = ()) -> ProceduralGenerator:
    """The stage from the ``generation`` section (``image_size``, ``failure_rates``,
    ``failure_by_class``, ``failure_by_option``) and the training set's category dicts (each
    class's ``look``)."""
    return ProceduralGenerator(categories=list(categories), image_size=int(section["image_size"]),
                               failure_rates=dict(section["failure_rates"]),
                               failure_by_class=dict(section["failure_by_class"]),
                               failure_by_option=list(section["failure_by_option"]))


def check_section(section: Mapping[str, Any]) -> list[str]:
    """The problems of the ``generation`` keys this backend reads."""
    import difflib

    problems = []
    size = section.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
        problems.append(f"generation.image_size: must be >= {MIN_IMAGE_SIZE} px, got {size!r}")
    rates = section.get("failure_rates") or {}
    for kind, rate in rates.items():
        if kind not in FAILURES:
            close = difflib.get_close_matches(str(kind), FAILURES, n=1, cutoff=0.5)
            problems.append(f"generation.failure_rates: unknown failure {kind!r}"
                            + (f"; did you mean '{close[0]}'?" if close else
                               f"; use one of {list(FAILURES)}"))
        elif not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            problems.append(f"generation.failure_rates.{kind}: must be within [0, 1]")
    if all(isinstance(r, (int, float)) for r in rates.values()) and sum(rates.values()) > 1.0:
        problems.append("generation.failure_rates: the rates must sum to at most 1")
    for m in section.get("failure_by_option") or []:
        if not isinstance(m, (int, float)) or isinstance(m, bool) or not m >= 0:
            problems.append(f"generation.failure_by_option: multipliers must be numbers >= 0, "
                            f"got {m!r}")
    return problems
