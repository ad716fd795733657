"""Prompt sampling: which class to generate next, with which prompt and which seed.

The sampler turns a class vocabulary into an endless, deterministic stream of prompt rows::

    sampler = PromptSampler.from_lvis_json("data/builtin/train.json", run_id="demo", seed=0)
    rows = sampler.sample(8)               # list of dicts, stream positions 0..7
    batch = sampler.sample_batch(8, 8)     # dict of numpy columns, positions 8..15
    ds = ray.data.from_items(sampler.sample(1000))
    ds = ray.data.range(1000).map_batches(PromptSampler, fn_constructor_kwargs=..., ...)

Row ``i`` of the stream is a pure function of (seed, run id, i) and the current class weights:
each position draws its own uniforms from a counter-based hash, so ``sample(n, start)`` returns
exactly positions ``start .. start+n-1`` no matter what was sampled before. A resumed run
continues with ``start=offset``. :meth:`PromptSampler.set_weights` changes the weights for the
positions sampled afterwards (trainer feedback), :meth:`PromptSampler.set_option_weights`
the probabilities of each class's prompt options (its templates, then its extra prompts).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from generators.columns import (
    CLASS_ID,
    CLASS_NAME,
    PROMPT,
    PROMPT_OPTION,
    SAMPLE_ID,
    SEED,
    batch_length,
    string_column,
)
from generators.vocabulary import ClassInfo, ClassVocabulary
from generators.weighting import (
    DEFAULT_GROUP_WEIGHTS,
    check_weights,
    class_weights,
    mapped_weights,
)

#: DiverGen's prompt (docs/algorithm.md, Reference training set-up); X-Paste's is
#: "a photo of a single {name}".
DEFAULT_TEMPLATE = "a photo of a single {name}, {definition}, in a white background"
TEMPLATE_FIELDS = ("name", "definition")
#: Per-sample seeds are drawn in [0, 2**53): exact in float64 and in every integer type.
SEED_LIMIT = 2**53


def make_sample_id(run_id: str, class_id: int, prompt: str, seed: int, generator: str = "") -> str:
    """Deterministic id of a candidate: 20 hex digits of BLAKE2b over its defining fields."""
    text = "\x1f".join((str(run_id), str(int(class_id)), str(prompt), str(int(seed)), generator))
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def check_template(template: str) -> str:
    """Return ``template`` if it only uses the fields ``{name}`` and ``{definition}``."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"prompt template {template!r} is malformed: {exc}") from None
    unknown = fields - set(TEMPLATE_FIELDS)
    if unknown or "" in fields:
        raise ValueError(
            f"prompt template {template!r} uses unknown field(s) "
            f"{', '.join('{' + f + '}' for f in sorted(unknown)) or '{}'}; allowed: "
            + ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        )
    return template


def render_template(template: str, cls: ClassInfo) -> str:
    """The prompt for ``cls``; a missing definition leaves no dangling comma."""
    text = template.format(name=cls.display_name, definition=cls.definition.strip())
    text = re.sub(r"\s*,\s*(?=,|$)", "", text)  # ", ," or a trailing ", " from an empty field
    return re.sub(r"\s{2,}", " ", text).strip()


def load_extra_prompts(
    source: str | Path | Mapping, vocab: ClassVocabulary
) -> dict[int, list[str]]:
    """Extra prompts per class from a JSON file (or dict) ``{class name or id: [prompt, ...]}``.

    Returns ``{class id: [prompt, ...]}``. Every error names the file and the offending entry.
    """
    where = "extra prompts" if isinstance(source, Mapping) else f"extra prompts file {source}"
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{where} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{where} is not valid JSON ({exc}); expected "
                '{"class name": ["prompt", ...], ...}'
            ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{where}: top level must be a JSON object "
            '{"class name": ["prompt", ...]}, got ' + type(data).__name__
        )
    out: dict[int, list[str]] = {}
    for key, prompts in data.items():
        cls = vocab.get(key)  # UnknownClassError names the class and lists the valid ones
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(
            isinstance(p, str) and p.strip() for p in prompts
        ):
            raise ValueError(
                f"{where}: the entry for {key!r} must be a list of non-empty strings, "
                f"got {str(prompts)[:80]}"
            )
        out.setdefault(cls.id, []).extend(p.strip() for p in prompts)
    return out


def _stream_key(*parts: object) -> np.uint64:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mix (uint64 in, uint64 out, wraps on overflow)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_u64(key: np.uint64, positions: np.ndarray) -> np.ndarray:
    """Counter-based random 64-bit words: one per stream position, independent per ``key``."""
    with np.errstate(over="ignore"):
        return _splitmix64(_splitmix64(positions.astype(np.uint64)) ^ key)


def _uniform(key: np.uint64, positions: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) (53-bit) for each position."""
    return (_hash_u64(key, positions) >> np.uint64(11)).astype(np.float64) * 2.0**-53


class PromptSampler:
    """Deterministic stream of prompt rows over a class vocabulary.

    Args:
        vocabulary: the classes (:class:`ClassVocabulary`).
        run_id: name of the run; part of every ``sample_id`` and of the stream's randomness.
        seed: base seed; with ``run_id`` it fixes the whole stream.
        templates: one template or several (chosen uniformly per sample), each using
            ``{name}`` and/or ``{definition}``.
        extra_prompts: JSON file or dict ``{class name or id: [prompt, ...]}``; a class's extra
            prompts join its template prompts in the uniform choice.
        weighting: ``uniform``, ``rare_boost`` (by ``group_weights``), ``inverse_frequency``
            (1 / image_count) or ``external`` (``external_weights``; unnamed classes get 0).
        group_weights: weight per LVIS frequency group for ``rare_boost``.
        external_weights: JSON file or dict ``{class name or id: weight}``.
        groups: only classes of these frequency groups are prompted (classes without a group
            are kept).
        classes: only these classes (names or ids) are prompted.
        generator: generator name mixed into ``sample_id`` (the contract hashes it in).
    """

    def __init__(
        self,
        vocabulary: ClassVocabulary,
        *,
        run_id: str = "run",
        seed: int = 0,
        templates: str | Sequence[str] = DEFAULT_TEMPLATE,
        extra_prompts: str | Path | Mapping | None = None,
        weighting: str = "rare_boost",
        group_weights: Mapping[str, float] | None = None,
        external_weights: str | Path | Mapping | None = None,
        groups: Sequence[str] = ("r", "c", "f"),
        classes: Sequence[int | str] | None = None,
        generator: str = "",
    ) -> None:
        if not isinstance(vocabulary, ClassVocabulary):
            raise TypeError(
                "PromptSampler needs a ClassVocabulary; use PromptSampler.from_lvis_json(path) "
                "or PromptSampler.builtin()"
            )
        self.vocabulary = vocabulary
        self.run_id = str(run_id)
        self.seed = int(seed)
        self.generator = str(generator)
        if isinstance(templates, str):
            templates = [templates]
        if not templates:
            raise ValueError("PromptSampler needs at least one prompt template")
        self.templates = [check_template(t) for t in templates]
        extra = load_extra_prompts(extra_prompts, vocabulary) if extra_prompts is not None else {}
        # Prompts per class in vocabulary order: templates first, then the extra ones.
        self._prompts: list[list[str]] = [
            [render_template(t, c) for t in self.templates] + extra.get(c.id, [])
            for c in vocabulary
        ]
        self.weighting = weighting
        self.group_weights = dict(DEFAULT_GROUP_WEIGHTS if group_weights is None else group_weights)
        self._allowed = self._allowed_mask(groups, classes)
        base = class_weights(vocabulary, weighting, self.group_weights, external_weights)
        self.base_weights = base.copy()
        self._set_probabilities(base, f"{weighting} weighting")
        self._option_cdf: np.ndarray | None = None  # None: each class's options uniformly
        self._keys = {
            name: _stream_key("bsgal-prompts", self.seed, self.run_id, name)
            for name in ("class", "prompt", "seed")
        }

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_lvis_json(
        cls, path: str | Path, storage_options: Mapping | None = None, **kwargs
    ) -> "PromptSampler":
        """A sampler over the categories of an LVIS-format JSON (see ``__init__`` for kwargs)."""
        return cls(ClassVocabulary.from_lvis_json(path, storage_options), **kwargs)

    @classmethod
    def builtin(cls, num_classes: int = 12, **kwargs) -> "PromptSampler":
        """A sampler over the built-in classes (no file needed)."""
        return cls(ClassVocabulary.builtin(num_classes), **kwargs)

    def _allowed_mask(
        self, groups: Sequence[str], classes: Sequence[int | str] | None
    ) -> np.ndarray:
        groups = list(groups)
        bad = [g for g in groups if g not in ("r", "c", "f")]
        if bad:
            raise ValueError(f"groups: {bad} are not LVIS frequency groups; use 'r', 'c', 'f'")
        allowed = np.array(
            [c.frequency in groups or c.frequency == "" for c in self.vocabulary], dtype=bool
        )
        if classes is not None:
            chosen = np.zeros(len(self.vocabulary), dtype=bool)
            for key in classes:
                chosen[self.vocabulary.index_of(key)] = True
            allowed &= chosen
        if not allowed.any():
            raise ValueError(
                f"no class is left to prompt after restricting to groups={groups} and "
                f"classes={list(classes) if classes is not None else 'all'}"
            )
        return allowed

    def _set_probabilities(self, weights: np.ndarray, what: str) -> None:
        w = check_weights(weights, what) * self._allowed
        if w.sum() <= 0:
            raise ValueError(
                f"{what}: every class that may be prompted (after the groups/classes "
                "restriction) has weight 0"
            )
        self._probs = w / w.sum()
        self._cdf = np.cumsum(self._probs)
        self._cdf[-1] = 1.0

    # ------------------------------------------------------------------ weights

    @property
    def probabilities(self) -> dict[int, float]:
        """Current sampling probability of each class id."""
        return {c.id: float(p) for c, p in zip(self.vocabulary, self._probs)}

    def set_weights(
        self,
        weights: Mapping[str | int, float] | Sequence[float] | np.ndarray,
        missing: float = 0.0,
    ) -> None:
        """Replace the class weights for every position sampled from now on.

        ``weights`` maps class names or ids to non-negative weights (classes not named get
        ``missing``), or is an array with one weight per class in vocabulary order. The
        groups/classes restriction of the constructor still applies.
        """
        self._set_probabilities(
            mapped_weights(self.vocabulary, weights, missing, what="set_weights"), "set_weights"
        )

    @property
    def options_per_class(self) -> list[int]:
        """How many prompt options each class has (vocabulary order)."""
        return [len(p) for p in self._prompts]

    @property
    def allowed(self) -> np.ndarray:
        """Which classes may be prompted (bool [C], vocabulary order)."""
        return self._allowed.copy()

    def set_option_weights(self, probs: np.ndarray | None) -> None:
        """Probabilities of each class's prompt options, float [C, T] (row c's first
        ``options_per_class[c]`` entries are used and normalised); None: uniform again."""
        if probs is None:
            self._option_cdf = None
            return
        p = np.asarray(probs, dtype=np.float64)
        counts = self.options_per_class
        if p.ndim != 2 or p.shape[0] != len(counts) or p.shape[1] < max(counts):
            raise ValueError(f"set_option_weights: expected shape ({len(counts)}, >= "
                             f"{max(counts)}), got {p.shape}")
        cdf = np.ones((len(counts), max(counts)))
        for i, n in enumerate(counts):
            row = check_weights(p[i, :n], f"set_option_weights (class {i})")
            cdf[i, :n] = np.cumsum(row / row.sum())
            cdf[i, n - 1:] = 1.0
        self._option_cdf = cdf

    # ------------------------------------------------------------------ sampling

    def prompts_of(self, key: int | str) -> list[str]:
        """Every prompt the sampler may use for a class (by id or name)."""
        return list(self._prompts[self.vocabulary.index_of(key)])

    def sample_positions(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows for the given stream positions (int64 >= 0), as a batch of numpy columns."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if (pos < 0).any():
            raise ValueError(f"stream positions must be >= 0, got {pos[pos < 0][:5].tolist()}")
        class_index = np.searchsorted(
            self._cdf, _uniform(self._keys["class"], pos), side="right"
        )
        class_index = np.minimum(class_index, len(self.vocabulary) - 1)
        prompt_u = _uniform(self._keys["prompt"], pos)
        seeds = (_hash_u64(self._keys["seed"], pos) % np.uint64(SEED_LIMIT)).astype(np.int64)
        class_ids, names, prompts, ids, chosen = [], [], [], [], []
        for k, u, s in zip(class_index, prompt_u, seeds):
            cls = self.vocabulary.classes[k]
            options = self._prompts[k]
            if self._option_cdf is None:
                option = min(int(u * len(options)), len(options) - 1)
            else:
                option = min(int(np.searchsorted(self._option_cdf[k], u, side="right")),
                             len(options) - 1)
            prompt = options[option]
            chosen.append(option)
            class_ids.append(cls.id)
            names.append(cls.name)
            prompts.append(prompt)
            ids.append(make_sample_id(self.run_id, cls.id, prompt, int(s), self.generator))
        return {
            SAMPLE_ID: string_column(ids),
            CLASS_ID: np.array(class_ids, dtype=np.int64),
            CLASS_NAME: string_column(names),
            PROMPT: string_column(prompts),
            PROMPT_OPTION: np.array(chosen, dtype=np.int64),
            SEED: seeds,
        }

    def sample_batch(self, n: int, start: int = 0) -> dict[str, np.ndarray]:
        """Stream positions ``start .. start+n-1`` as a batch of numpy columns."""
        if n < 0 or start < 0:
            raise ValueError(f"need n >= 0 and start >= 0, got n={n}, start={start}")
        return self.sample_positions(np.arange(start, start + n, dtype=np.int64))

    def sample(self, n: int, start: int = 0) -> list[dict]:
        """Stream positions ``start .. start+n-1`` as a list of row dicts (for ``from_items``)."""
        batch = self.sample_batch(n, start)
        return [
            {
                SAMPLE_ID: str(batch[SAMPLE_ID][i]),
                CLASS_ID: int(batch[CLASS_ID][i]),
                CLASS_NAME: str(batch[CLASS_NAME][i]),
                PROMPT: str(batch[PROMPT][i]),
                SEED: int(batch[SEED][i]),
            }
            for i in range(n)
        ]

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data stage over ``ray.data.range(n)``: the ``id`` column holds stream positions."""
        if "id" not in batch:
            raise KeyError(
                "PromptSampler as a map_batches stage reads stream positions from the 'id' "
                f"column (ray.data.range(n)); the batch has {', '.join(sorted(batch))}"
            )
        batch_length(batch)
        return self.sample_positions(np.asarray(batch["id"]))
