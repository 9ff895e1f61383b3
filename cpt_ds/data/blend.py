"""Weighted blends of corpora: which component every global sample position comes from.

``data_path`` takes Megatron's weighted form (``0.8 data/zh 0.2 data/general``) or a plain list of
prefixes (one stream, documents back to back). Each component gets a name: the shortest trailing
part of its path that no other component shares (``data/zh/train``, ``data/en/train`` -> ``zh/train``,
``en/train``).

The schedule is a binary tree over the components (built like a Huffman code, so heavy components
sit near the root). A node whose children weigh ``a`` and ``b`` sends the ``m``-th position that
reaches it to the left child iff ``L(m + 1) > L(m)`` with

    L(m) = floor(m * a / (a + b) + 1/2)      (positions among the first m that went left)

so a child's position count is within 1/2 of its share, and the ``m``-th position's index inside
the left child is ``L(m)`` (right: ``m - L(m)``). Descending the tree gives, for any global position
``k``, its component and its index within that component in O(depth) integer operations: resuming at
sample 10^9 costs what sample 1 costs, and nothing sized by the run is ever built. The count error
adds at most 1/2 per level, scaled by the shares below, so after ``k`` positions every component's
count is within ``depth / 2`` of ``weight * k`` (1.5 for up to 8 components). Weights become integers
over 2**20 so the arithmetic is exact (numpy int64; positions up to 2**40).
"""

from __future__ import annotations

import contextlib
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

WEIGHT_UNITS = 2**20
MAX_POSITION = 2**40


@dataclass(frozen=True)
class ComponentSpec:
    """One ``data_path`` component as the user wrote it."""

    name: str
    paths: tuple[str, ...]
    """Token-file prefixes read back to back as this component."""
    weight: float | None
    """Normalized weight (weights sum to 1), or None for the unweighted stream."""


def _is_number(text: str) -> bool:
    with contextlib.suppress(ValueError):
        float(text)
        return True
    return False


def component_names(paths: Sequence[str]) -> list[str]:
    """The shortest trailing part of each path that no other path ends with (glob parts dropped)."""
    parts = []
    for path in paths:
        pieces = [piece for piece in PurePath(path).parts if piece not in ("/", ".")]
        if len(pieces) > 1 and any(char in pieces[-1] for char in "*?["):
            pieces = pieces[:-1]  # data/zh/part-* is the zh corpus
        parts.append(pieces or [path])
    names = []
    for index, pieces in enumerate(parts):
        for take in range(1, len(pieces) + 1):
            candidate = pieces[-take:]
            if all(other[-take:] != candidate for other_index, other in enumerate(parts) if other_index != index):
                names.append("/".join(candidate))
                break
        else:
            names.append("/".join(pieces))
    return names


def is_weighted(entries: Sequence[str]) -> bool:
    """Megatron's weighted form is recognized by any entry that is a number."""
    return any(_is_number(str(entry)) for entry in entries)


def parse_data_path(entries: Sequence[str]) -> tuple[list[ComponentSpec], list[str]]:
    """``(components, problems)`` of a ``data_path`` list: weighted pairs or plain prefixes.

    A plain list is one unweighted component holding every prefix (named after them, joined by '+').
    """
    problems: list[str] = []
    entries = [str(entry) for entry in entries]
    if not entries:
        return [], []
    if not is_weighted(entries):
        paths = list(entries)
        duplicates = sorted({path for path in paths if paths.count(path) > 1})
        problems += [f"data_path names {path} twice; name each prefix once" for path in duplicates]
        return [ComponentSpec(name="+".join(component_names(paths)), paths=tuple(paths), weight=None)], problems

    weights: list[float] = []
    paths = []
    for index in range(0, len(entries), 2):
        weight_text = entries[index]
        path = entries[index + 1] if index + 1 < len(entries) else None
        if not _is_number(weight_text):
            problems.append(f"data_path entry {index + 1} {weight_text!r} should be a weight before a prefix: "
                            "weight every prefix ('0.8 data/zh 0.2 data/en') or none of them")
            continue
        weight = float(weight_text)
        if path is None:
            problems.append(f"data_path weight {weight_text} (entry {index + 1}) has no prefix after it")
            continue
        if _is_number(path):
            problems.append(f"data_path entry {index + 2} {path!r} should be a prefix after weight {weight_text}, "
                            "got a number")
            continue
        if not (math.isfinite(weight) and weight > 0):
            problems.append(f"data_path weight {weight_text} of {path} must be a positive number")
        weights.append(weight)
        paths.append(path)
    duplicates = sorted({path for path in paths if paths.count(path) > 1})
    problems += [f"data_path names {path} twice; give each prefix one weight" for path in duplicates]
    if problems:
        return [], problems
    total = sum(weights)
    names = component_names(paths)
    return [ComponentSpec(name=name, paths=(path,), weight=weight / total)
            for name, path, weight in zip(names, paths, weights, strict=True)], problems


def parse_named_paths(entries: Sequence[str], field_name: str) -> tuple[list[tuple[str, str]], list[str]]:
    """``[(name, prefix)]`` of ``PREFIX`` / ``NAME=PREFIX`` entries (eval sets, evaluate.py --data)."""
    problems = []
    explicit: list[str | None] = []
    paths = []
    for entry in entries:
        name, separator, path = str(entry).partition("=")
        if separator and "/" not in name and not (name and path):
            # '=x' or 'a=' is a NAME=PREFIX with a part missing, not a prefix spelled with '='.
            missing = "NAME" if not name else "PREFIX"
            problems.append(f"{field_name} entry {str(entry)!r} is not NAME=PREFIX: its {missing} is empty; "
                            "write NAME=PREFIX or just PREFIX")
            continue
        if separator and "/" not in name:
            explicit.append(name)
            paths.append(path)
        else:
            explicit.append(None)
            paths.append(str(entry))
    derived = component_names(paths)
    named = [(name if name is not None else derived_name, path)
             for name, derived_name, path in zip(explicit, derived, paths, strict=True)]
    names = [name for name, _ in named]
    problems += [f"{field_name} names the set {name!r} twice; give each set its own NAME=PREFIX"
                 for name in sorted({name for name in names if names.count(name) > 1})]
    return named, problems


# --------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    weight: int
    leaf: int | None = None
    left: _Node | None = None
    right: _Node | None = None

    @property
    def depth(self) -> int:
        return 0 if self.leaf is not None else 1 + max(self.left.depth, self.right.depth)


def _left_count(m: np.ndarray | int, left: int, total: int) -> np.ndarray | int:
    """Positions among the first ``m`` at a node that went to its left child: floor(m*left/total + 1/2)."""
    return (2 * m * left + total) // (2 * total)


class BlendSchedule:
    """Global sample position -> (component, index within the component), a pure function of the weights."""

    def __init__(self, weights: Sequence[float]):
        assert weights and all(weight > 0 for weight in weights), weights
        total = sum(weights)
        self.weights = [weight / total for weight in weights]
        self.num_components = len(weights)
        integers = [max(1, round(weight * WEIGHT_UNITS)) for weight in self.weights]
        # Huffman order: merge the two lightest (ties by first leaf) until one tree is left.
        heap = [(weight, index, _Node(weight=weight, leaf=index)) for index, weight in enumerate(integers)]
        heapq.heapify(heap)
        counter = len(heap)
        while len(heap) > 1:
            weight_a, _, node_a = heapq.heappop(heap)
            weight_b, _, node_b = heapq.heappop(heap)
            heapq.heappush(heap, (weight_a + weight_b, counter,
                                  _Node(weight=weight_a + weight_b, left=node_a, right=node_b)))
            counter += 1
        self.root = heap[0][2]
        self.depth = self.root.depth

    def counts(self, num_positions: int) -> np.ndarray:
        """How many of the first ``num_positions`` positions each component received (int64[C])."""
        assert 0 <= num_positions < MAX_POSITION
        out = np.zeros(self.num_components, dtype=np.int64)
        stack = [(self.root, num_positions)]
        while stack:
            node, count = stack.pop()
            if node.leaf is not None:
                out[node.leaf] = count
                continue
            to_left = int(_left_count(count, node.left.weight, node.weight))
            stack += [(node.left, to_left), (node.right, count - to_left)]
        return out

    def assign(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(component, index within component)`` of positions ``[start, stop)``, each int64."""
        assert 0 <= start <= stop < MAX_POSITION
        positions = np.arange(start, stop, dtype=np.int64)
        component = np.zeros(len(positions), dtype=np.int64)
        index = np.zeros(len(positions), dtype=np.int64)
        stack = [(self.root, np.arange(len(positions)), positions)]
        while stack:
            node, where, at_node = stack.pop()
            if node.leaf is not None:
                component[where] = node.leaf
                index[where] = at_node
                continue
            before = _left_count(at_node, node.left.weight, node.weight)
            goes_left = _left_count(at_node + 1, node.left.weight, node.weight) > before
            stack.append((node.left, where[goes_left], before[goes_left]))
            stack.append((node.right, where[~goes_left], (at_node - before)[~goes_left]))
        return component, index


@dataclass(frozen=True)
class PhaseBlend:
    """One campaign phase as the data layer sees it: its length and which run components it draws."""

    name: str
    steps: int
    components: tuple[int, ...]
    """Indices into the run's training components (each corpus once per run, whatever phases use it)."""
    weights: tuple[float, ...] | None
    """Normalized weights of ``components``, or None for one unweighted component."""
