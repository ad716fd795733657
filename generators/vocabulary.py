"""The class vocabulary that prompts are drawn from: LVIS categories or the built-in classes.

A :class:`ClassVocabulary` is plain, picklable data (it travels to Ray actors as a constructor
argument). Load it from any LVIS-format JSON (LVIS v1, or the built-in set's ``train.json``)
with :meth:`ClassVocabulary.from_lvis_json`, or get the built-in classes without a file with
:meth:`ClassVocabulary.builtin`.
"""

from __future__ import annotations

import difflib
import json
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from generators.looks import BUILTIN_GROUPS, builtin_class_name, make_looks


@dataclass(frozen=True)
class ClassInfo:
    """One category.

    Attributes:
        id: LVIS category id (need not be contiguous).
        name: LVIS name, e.g. ``"bow_(weapon)"``.
        synonyms: alternative names (LVIS ``synonyms``).
        definition: one-line definition (LVIS ``def``), "" when absent.
        frequency: LVIS frequency group ``"r"``, ``"c"`` or ``"f"``; "" when absent.
        image_count: training images that contain the class (LVIS ``image_count``); None if absent.
        look: the built-in appearance (``ObjectLook.to_dict()``) or None for a real vocabulary.
    """

    id: int
    name: str
    synonyms: tuple[str, ...] = ()
    definition: str = ""
    frequency: str = ""
    image_count: int | None = None
    look: dict | None = field(default=None, compare=False, hash=False)

    @property
    def display_name(self) -> str:
        """The name as it reads in a prompt: underscores become spaces (``"bow (weapon)"``)."""
        return self.name.replace("_", " ").strip()


class UnknownClassError(KeyError):
    """A class name or id that the vocabulary does not have; the message lists valid ones."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


@dataclass(frozen=True)
class ClassVocabulary:
    """An ordered set of :class:`ClassInfo` with look-up by id and by name."""

    classes: tuple[ClassInfo, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError(f"class vocabulary {self.source or ''} has no categories".strip())
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"class vocabulary {self.source}: duplicate category ids {dup}")

    def __len__(self) -> int:
        return len(self.classes)

    def __iter__(self):
        return iter(self.classes)

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.classes]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @cached_property
    def _by_id(self) -> dict[int, int]:
        return {c.id: i for i, c in enumerate(self.classes)}

    @cached_property
    def _by_name(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, c in enumerate(self.classes):
            for synonym in c.synonyms:
                out.setdefault(synonym, i)
        for i, c in enumerate(self.classes):  # a class's own name wins over synonyms
            out[c.name] = i
        return out

    def index_of(self, key: int | str) -> int:
        """Position of the class with this id (int, or a string of digits) or name/synonym."""
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            found = self._by_id.get(int(key))
        elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
            found = self._by_id.get(int(key))
        elif isinstance(key, str):
            found = self._by_name.get(key)
        else:
            found = None
        if found is None:
            raise UnknownClassError(self._unknown_message(key))
        return found

    def get(self, key: int | str) -> ClassInfo:
        """The class with this id or name; :class:`UnknownClassError` listing valid ones if none."""
        return self.classes[self.index_of(key)]

    def _unknown_message(self, key: object) -> str:
        names = self.names
        close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listed = ", ".join(f"{c.id}:{c.name}" for c in self.classes[:30])
        more = f", ... ({len(self.classes) - 30} more)" if len(self.classes) > 30 else ""
        where = f" of {self.source}" if self.source else ""
        return f"unknown class {key!r}{hint} (valid classes{where}: {listed}{more})"

    def subset(self, keys: Iterable[int | str]) -> "ClassVocabulary":
        """The classes named by ``keys`` (ids or names), in vocabulary order."""
        wanted = {self.index_of(k) for k in keys}
        return ClassVocabulary(
            tuple(c for i, c in enumerate(self.classes) if i in wanted), self.source
        )

    @classmethod
    def from_categories(
        cls, categories: Sequence[Mapping], source: str = "categories"
    ) -> "ClassVocabulary":
        """From LVIS ``categories`` dicts (``id`` and ``name`` required, the rest optional)."""
        out = []
        for i, cat in enumerate(categories):
            if not isinstance(cat, Mapping) or "id" not in cat or "name" not in cat:
                raise ValueError(
                    f"{source}: category #{i} must be an object with at least 'id' and 'name', "
                    f"got {str(cat)[:80]}"
                )
            count = cat.get("image_count")
            out.append(
                ClassInfo(
                    id=int(cat["id"]),
                    name=str(cat["name"]),
                    synonyms=tuple(str(s) for s in cat.get("synonyms", ()) or ()),
                    definition=str(cat.get("def", cat.get("definition", "")) or ""),
                    frequency=str(cat.get("frequency", "") or ""),
                    image_count=None if count is None else int(count),
                    look=dict(cat["look"]) if cat.get("look") is not None else None,
                )
            )
        return cls(tuple(out), source)

    @classmethod
    def from_lvis_json(
        cls, path: str | Path, storage_options: Mapping | None = None
    ) -> "ClassVocabulary":
        """Read the ``categories`` of an LVIS-format JSON (local path or fsspec URI)."""
        import fsspec

        try:
            with fsspec.open(str(path), "r", **dict(storage_options or {})) as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"LVIS-format JSON {path} does not exist; pass the annotation file of the "
                "dataset (e.g. lvis_v1_train.json, or data/builtin/train.json written by "
                "`bsgal data synth`)"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("categories"), list):
            raise ValueError(f"{path} has no 'categories' list; is it an LVIS-format JSON?")
        return cls.from_categories(doc["categories"], source=str(path))

    @classmethod
    def builtin(cls, num_classes: int = 12) -> "ClassVocabulary":
        """The built-in set's classes (ids 1..K, names, groups and looks) without reading a file.

        ``image_count`` is unknown here (it depends on the written set); read the set's JSON for
        inverse-frequency weighting.
        """
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        classes = []
        for k, look in enumerate(make_looks(num_classes)):
            name = builtin_class_name(k, look)
            classes.append(
                ClassInfo(
                    id=k + 1,
                    name=name,
                    synonyms=(name, name.replace("_", " ")),
                    definition=look.describe(),
                    frequency=BUILTIN_GROUPS[k % len(BUILTIN_GROUPS)],
                    look=look.to_dict(),
                )
            )
        return cls(tuple(classes), source=f"built-in ({num_classes} classes)")
