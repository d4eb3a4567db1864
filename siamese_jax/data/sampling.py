"""On-the-fly pair, triplet and m-per-class sampling, deterministic from (seed, step).

Every batch is a pure function of (seed, step): `np.random.default_rng([seed, step])` draws the record
indices of the whole *global* batch, vectorised over examples (no Python loop per example). A process of
a multi-process run then keeps its own rows, so one process and N processes see the same global batch,
and a resumed run sees the same batches as one that never stopped.

Samplers return record indices `[B, k]`; `data/pipeline.py` turns them into the batch contract
`{"images": uint8 [B,k,H,W,C], "labels": int32 [B,k]}`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from siamese_jax.errors import UserError

KINDS = ("pairs", "triplets", "m_per_class")


def _padded_table(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Ragged lists -> (table [len, max_len] padded with 0, counts [len])."""
  counts = np.array([len(g) for g in groups], np.int64)
  table = np.zeros((len(groups), max(1, counts.max(initial=0))), np.int64)
  for row, members in enumerate(groups):
    table[row, : len(members)] = members
  return table, counts


@dataclasses.dataclass(frozen=True)
class ClassIndex:
  """Which records belong to which class, and which classes to which group, as padded arrays.

  Padded arrays let a whole batch be drawn with a few vectorised numpy calls: the j-th member of class c
  is `members[c, j]` for `j < member_counts[c]`.
  """

  members: np.ndarray  # int64 [C, max_members]: record indices of each class
  member_counts: np.ndarray  # int64 [C]
  class_groups: np.ndarray  # int64 [C]: group of each class
  group_classes: np.ndarray  # int64 [G, max_classes]: classes of each group
  group_counts: np.ndarray  # int64 [G]
  class_names: tuple[str, ...]

  @classmethod
  def from_labels(cls, labels: np.ndarray, class_groups: np.ndarray, class_names) -> "ClassIndex":
    labels = np.asarray(labels)
    class_groups = np.asarray(class_groups)
    num_classes = len(class_groups)
    order = np.argsort(labels, kind="stable")
    boundaries = np.searchsorted(labels[order], np.arange(num_classes + 1))
    members = [order[boundaries[c] : boundaries[c + 1]] for c in range(num_classes)]
    num_groups = int(class_groups.max(initial=-1)) + 1
    classes_of_group = [np.flatnonzero(class_groups == g) for g in range(num_groups)]
    member_table, member_counts = _padded_table(members)
    group_table, group_counts = _padded_table(classes_of_group)
    return cls(member_table, member_counts, class_groups.astype(np.int64), group_table, group_counts,
               tuple(class_names))

  @property
  def num_classes(self) -> int:
    return len(self.member_counts)

  def require(self, min_members: int, min_classes: int, what: str) -> None:
    """Fails with the first class that cannot feed the sampler, named, before training starts."""
    if self.num_classes < min_classes:
      raise UserError(f"{what} needs at least {min_classes} classes; the dataset has {self.num_classes}.")
    short = np.flatnonzero(self.member_counts < min_members)
    if short.size:
      c = int(short[0])
      raise UserError(
          f"class '{self.class_names[c]}' has {self.member_counts[c]} image(s); {what} needs at least "
          f"{min_members} per class ({short.size} class(es) are short). Remove or fill these classes.")


def _member(rng: np.random.Generator, index: ClassIndex, classes: np.ndarray) -> np.ndarray:
  """One uniformly random member of each class in `classes`."""
  return index.members[classes, rng.integers(0, index.member_counts[classes])]


def _two_distinct_members(rng, index: ClassIndex, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Two different members of each class: j = i + 1 + u (mod count) with u < count - 1 is never i."""
  counts = index.member_counts[classes]
  first = rng.integers(0, counts)
  second = (first + 1 + rng.integers(0, counts - 1)) % counts
  return index.members[classes, first], index.members[classes, second]


def _negative_classes(rng, index: ClassIndex, classes: np.ndarray, same_group_probability: float):
  """A class different from each of `classes`; with the given probability from the same group.

  Same-group negatives are the hard case of Lake's within-alphabet test. A group with a single class
  falls back to any other class.
  """
  num_classes = index.num_classes
  anywhere = (classes + 1 + rng.integers(0, num_classes - 1, size=classes.shape)) % num_classes
  if same_group_probability <= 0:
    return anywhere
  groups = index.class_groups[classes]
  group_sizes = index.group_counts[groups]
  # Position of each class inside its group, then a different position in the same group.
  position = np.argmax(index.group_classes[groups] == classes[:, None], axis=1)
  other = (position + 1 + rng.integers(0, np.maximum(group_sizes - 1, 1))) % group_sizes
  in_group = index.group_classes[groups, other]
  use_group = (rng.random(classes.shape) < same_group_probability) & (group_sizes > 1)
  return np.where(use_group, in_group, anywhere)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Draws the record indices of global batch `step` for one sampling kind.

  kind: "pairs" (k=2, half same-class, half different, interleaved), "triplets" (k=3: anchor, positive,
  negative) or "m_per_class" (k=1: batch_size / m classes with m distinct images each).

  classes_per_group (m_per_class only): 0 draws the batch's classes from anywhere; c > 0 draws them as
  whole groups (alphabets) in a random order, at most c random classes from each, so every class meets
  other classes of its own alphabet in the batch: the in-batch negatives of Lake's within-alphabet test.
  """

  index: ClassIndex
  kind: str
  batch_size: int
  seed: int
  m_per_class: int = 4
  same_group_negative_probability: float = 0.0
  classes_per_group: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise UserError(f"sampling.kind='{self.kind}' is not one of {KINDS}.")
    if self.batch_size < 1:
      raise UserError(f"sampling.batch_size must be positive, got {self.batch_size}.")
    if not 0.0 <= self.same_group_negative_probability <= 1.0:
      raise UserError("sampling.same_group_negative_probability must lie in [0, 1], got "
                      f"{self.same_group_negative_probability}.")
    if self.kind == "m_per_class":
      if self.m_per_class < 2 or self.batch_size % self.m_per_class:
        raise UserError(f"sampling.batch_size={self.batch_size} must be a multiple of "
                        f"sampling.m_per_class={self.m_per_class} (and m_per_class >= 2).")
      classes_needed = self.batch_size // self.m_per_class
      self.index.require(self.m_per_class, classes_needed, f"m-per-class sampling with m={self.m_per_class} "
                         f"and {classes_needed} classes per batch")
      if self.classes_per_group < 0:
        raise UserError(f"sampling.classes_per_group must be >= 0 (0 = off), got {self.classes_per_group}.")
      reachable = int(np.minimum(self.index.group_counts, self.classes_per_group).sum())
      if self.classes_per_group and reachable < classes_needed:
        raise UserError(
            f"sampling.classes_per_group={self.classes_per_group} gives at most {reachable} classes from the "
            f"{len(self.index.group_counts)} groups, fewer than the {classes_needed} a batch needs "
            f"(batch_size / m_per_class); raise it.")
    else:
      self.index.require(2, 2, f"{self.kind} sampling (a same-class pair needs two images)")

  @property
  def k(self) -> int:
    return {"pairs": 2, "triplets": 3, "m_per_class": 1}[self.kind]

  def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (record indices [B, k], class labels [B, k]) of global batch `step`."""
    rng = np.random.default_rng([self.seed, int(step)])
    index = self.index
    if self.kind == "m_per_class":
      return self._m_per_class(rng)
    anchors = rng.integers(0, index.num_classes, size=self.batch_size)
    first, positive = _two_distinct_members(rng, index, anchors)
    negative_classes = _negative_classes(rng, index, anchors, self.same_group_negative_probability)
    negative = _member(rng, index, negative_classes)
    if self.kind == "triplets":
      records = np.stack([first, positive, negative], axis=1)
      labels = np.stack([anchors, anchors, negative_classes], axis=1)
    else:
      is_same = (np.arange(self.batch_size) % 2) == 0
      records = np.stack([first, np.where(is_same, positive, negative)], axis=1)
      labels = np.stack([anchors, np.where(is_same, anchors, negative_classes)], axis=1)
    return records, labels.astype(np.int32)

  def _m_per_class(self, rng) -> tuple[np.ndarray, np.ndarray]:
    index = self.index
    num_chosen = self.batch_size // self.m_per_class
    if self.classes_per_group:
      classes = self._classes_by_group(rng, num_chosen)
    else:
      classes = rng.choice(index.num_classes, size=num_chosen, replace=False)
    # m distinct members per class: rank random keys, padding slots pushed last by an infinite key.
    keys = rng.random((num_chosen, index.members.shape[1]))
    keys[np.arange(index.members.shape[1])[None, :] >= index.member_counts[classes][:, None]] = np.inf
    slots = np.argsort(keys, axis=1)[:, : self.m_per_class]
    records = index.members[classes[:, None], slots].reshape(-1, 1)
    labels = np.repeat(classes, self.m_per_class).reshape(-1, 1)
    return records, labels.astype(np.int32)

  def _classes_by_group(self, rng, num_chosen: int) -> np.ndarray:
    """`num_chosen` classes: groups in a random order, up to `classes_per_group` random ones from each.

    Sorting the classes by (rank of their group, random key) puts each group's classes in a random order
    after the previous group's; a class's place in that order minus its group's first place is its rank
    inside the group, and only ranks below classes_per_group are kept.
    """
    index = self.index
    group_rank = rng.permutation(len(index.group_counts))[index.class_groups]
    order = np.lexsort((rng.random(index.num_classes), group_rank))
    sorted_groups = group_rank[order]
    first_of_group = np.searchsorted(sorted_groups, sorted_groups, side="left")
    rank_in_group = np.arange(index.num_classes) - first_of_group
    return order[rank_in_group < self.classes_per_group][:num_chosen]
