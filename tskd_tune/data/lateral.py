"""Left/right classes under a horizontal flip: which classes swap, and whether flipping is safe at all.

A mirrored image shows the left kidney where the right one was. Unless the labels swap with it, a flip
teaches the model that side does not matter, which ruins every class whose name says which side it is.
So a flip maps each label through a permutation that swaps the paired lateral classes, and where a class
looks lateral but its partner is unknown, flips are switched off (:func:`flip_plan` says why).

Pairs come from, in this order: ``data.lateral_pairs``, the adapter's ``lateral_pairs`` (its default class
names, taken by index so renamed classes keep them), and class names. A name looks lateral when one of its
words (split at ``_``, ``-``, spaces, dots and camelCase) is ``left`` or ``right``, or when it starts with
``l``/``r`` or ends with ``r``/``l`` as a word of its own (``l_kidney``, ``kidney_R``), case-insensitive.
Two names pair when they are the same apart from that side word (``left_kidney`` / ``Kidney-Right``).
A name with both sides in it (``left_right_boundary``) is taken as not lateral.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tskd_tune.config.schema import AugmentConfig, DataConfig
from tskd_tune.data.registry import adapter_options, class_names, get_adapter

_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_SIDE = {"left": "left", "right": "right"}
_END_SIDE = {"l": "left", "r": "right"}


def lateral_side(name: str) -> tuple[str, tuple[str, ...]] | None:
    """``(side, the other words in lower case)`` of a lateral-looking class name, else None."""
    words = [w.lower() for w in _WORD.findall(name)]
    sides = [(i, _SIDE[w]) for i, w in enumerate(words) if w in _SIDE]
    # a lone l/r only at either end: in the middle it is more often an index or unit than a side
    sides += [
        (i, _END_SIDE[words[i]]) for i in {0, len(words) - 1} if len(words) > 1 and words[i] in _END_SIDE
    ]
    if len({side for _, side in sides}) != 1:
        return None
    marks = {i for i, _ in sides}
    return sides[0][1], tuple(w for i, w in enumerate(words) if i not in marks)


def pair_problems(
    classes: Sequence[str], pairs: Sequence[Sequence[str]], field: str = "data.lateral_pairs"
) -> list[str]:
    """Problems of explicit ``pairs`` of class names: unknown names, a class paired with itself or twice."""
    problems, seen = [], set()
    for a, b in pairs:
        for name in (a, b):
            if name not in classes:
                problems.append(f"{field}: {name!r} is not a class (classes: {', '.join(classes)})")
        if a == b:
            problems.append(f"{field}: {a!r} cannot pair with itself")
        elif seen & {a, b}:
            twice = sorted(seen & {a, b})[0]
            problems.append(f"{field}: {twice!r} is in more than one pair")
        seen |= {a, b}
    return problems


def find_pairs(
    classes: Sequence[str], explicit: Sequence[tuple[int, int]] = ()
) -> tuple[list[tuple[int, int]], list[str]]:
    """``(pairs of class indices that swap, lateral-looking classes left without a partner)``.

    ``explicit`` pairs come first; the classes they leave out are paired by name. Two classes of the same
    side and words (``left_kidney`` and ``Left-Kidney``) are ambiguous, so neither is paired.
    """
    pairs = list(explicit)
    taken = {i for pair in pairs for i in pair}
    groups: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for i, name in enumerate(classes):
        found = lateral_side(name)
        if i not in taken and found is not None:
            side, rest = found
            groups.setdefault(rest, {"left": [], "right": []})[side].append(i)
    unpaired = []
    for sides in groups.values():
        if len(sides["left"]) == 1 and len(sides["right"]) == 1:
            pairs.append((sides["left"][0], sides["right"][0]))
        else:
            unpaired += sides["left"] + sides["right"]
    return pairs, [classes[i] for i in sorted(unpaired)]


def swap_permutation(num_classes: int, pairs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The label map of a flip: ``perm[k]`` is what class ``k`` becomes (the pairs swapped, the rest kept).

    It is its own inverse, so it also reorders channels: ``flipped[:, k] = original[:, perm[k]]``."""
    perm = list(range(num_classes))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


def flip_permutation(
    classes: Sequence[str], explicit: Sequence[tuple[int, int]] = ()
) -> tuple[int, ...] | None:
    """The class permutation a horizontal flip applies, or None when flipping is unsafe (a lateral-looking
    class without a partner). Without lateral classes it is the identity."""
    pairs, unpaired = find_pairs(classes, explicit)
    return None if unpaired else swap_permutation(len(classes), pairs)


@dataclass(frozen=True)
class FlipPlan:
    """How a dataset's classes may be flipped: the augmentation in effect, the label swap, and why not."""

    augment: AugmentConfig
    """``data.augment`` with ``flip`` off where flipping is unsafe."""
    swap: tuple[int, ...]
    """``perm[k]``: the class that class ``k`` becomes when an image is flipped (identity: nothing swaps)."""
    pairs: tuple[tuple[str, str], ...]
    """The paired class names (for messages)."""
    note: str | None = None
    """One line saying why flips were switched off, or None."""

    @property
    def label_swap(self) -> tuple[int, ...] | None:
        """The permutation to apply with a flip, or None when flips are off or nothing swaps."""
        identity = self.swap == tuple(range(len(self.swap)))
        return None if identity or not (self.augment.enabled and self.augment.flip) else self.swap

    def cache_key(self) -> dict:
        """What of augmentation determines an output: the effective settings, and the swap where there is
        one (absent otherwise, so datasets without lateral classes keep their earlier keys)."""
        swap = self.label_swap
        return {"augment": self.augment.model_dump()} | ({"flip_swap": list(swap)} if swap else {})


def declared_pairs(data: DataConfig, classes: Sequence[str]) -> list[tuple[int, int]]:
    """Index pairs from ``data.lateral_pairs`` and, for classes those leave out, from the adapter."""
    index = {name: i for i, name in enumerate(classes)}
    pairs = [(index[a], index[b]) for a, b in data.lateral_pairs if a in index and b in index]
    taken = {i for pair in pairs for i in pair}
    adapter = get_adapter(data.dataset)
    defaults = adapter.classes(adapter_options(data))
    if len(defaults) == len(
        classes
    ):  # the adapter's names mean its class indices, whatever data.classes calls them
        at = {name: i for i, name in enumerate(defaults)}
        for a, b in adapter.lateral_pairs:
            if a in at and b in at and not {at[a], at[b]} & taken:
                pairs.append((at[a], at[b]))
    return pairs


def flip_plan(data: DataConfig, classes: Sequence[str] | None = None) -> FlipPlan:
    """The flips ``data`` may use for ``classes`` (default: the class names in effect)."""
    classes = list(class_names(data) if classes is None else classes)
    pairs, unpaired = find_pairs(classes, declared_pairs(data, classes))
    names = tuple((classes[a], classes[b]) for a, b in pairs)
    aug = data.augment
    if not unpaired:
        return FlipPlan(aug, swap_permutation(len(classes), pairs), names)
    note = None
    if aug.enabled and aug.flip:
        quoted = ", ".join(repr(n) for n in unpaired)
        looks = "looks lateral but has no pair" if len(unpaired) == 1 else "look lateral but have no pair"
        note = (
            f"note: data.augment.flip: off: class{'es' if len(unpaired) > 1 else ''} {quoted} {looks} "
            "(set data.lateral_pairs)"
        )
    return FlipPlan(aug.model_copy(update={"flip": False}), tuple(range(len(classes))), names, note)
