"""The gallery index (siamese_jax/index.py) and its modes (siamese_jax/modes/index.py): exact top-k against
brute force at chunk boundaries, add / remove / save / load, damaged files, classification with open-set
rejection, the approximate backend's recall, and an index of a folder of PNGs from the session's trained
workdir (tests/trained_workdir.py), built and searched through launch.py in this process."""

import csv
import dataclasses
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from siamese_jax import index as index_module
from siamese_jax.errors import UserError
from siamese_jax.index import GalleryIndex, exact_search, gallery_distance_threshold
from siamese_jax.metrics.retrieval import gallery_class_similarities
from siamese_jax.modes.index import build_index
from siamese_jax.trained import load_trained_model
from test_evaluate_modes import run_launch
from trained_workdir import trained_workdir


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(rows, distances) [Q, k] of the k nearest by float64 distances, ties to the lower row (a stable sort)."""
  distances = np.sqrt(((queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64))**2).sum(-1))
  order = np.argsort(distances, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(distances, order, axis=1)


def clustered(rng, classes: int, per_class: int, dim: int, spread: float = 0.3):
  """Embeddings of `classes` classes: a random centre each, plus noise; (embeddings, labels, centres)."""
  centres = rng.standard_normal((classes, dim)).astype(np.float32)
  labels = np.repeat(np.arange(classes), per_class)
  return centres[labels] + spread * rng.standard_normal((len(labels), dim)).astype(np.float32), labels, centres


# ------------------------------------------------------------------------------------------------
# Exact search


@pytest.mark.parametrize("num, queries, k, gallery_chunk, query_chunk", [
    (37, 5, 37, 8, 4),  # k = the whole gallery; 37 rows = 4 chunks of 8 and a padded one of 5
    (100, 13, 7, 16, 8),  # neither the gallery nor the queries a multiple of their chunk
    (64, 9, 10, 16, 8),  # the gallery an exact multiple of the chunk
    (33, 3, 1, 32, 4),  # one row past a chunk: the last chunk holds one valid row
    (20, 2, 19, 16, 4),  # k above the chunk: the chunk grows to hold k
])
def test_exact_search_equals_brute_force_at_chunk_boundaries(num, queries, k, gallery_chunk, query_chunk):
  rng = np.random.default_rng(num)
  gallery = rng.standard_normal((num, 6)).astype(np.float32)
  query = rng.standard_normal((queries, 6)).astype(np.float32)
  expected, _ = brute_force(gallery, query, k)
  found = exact_search(gallery, query, k, gallery_chunk=gallery_chunk, query_chunk=query_chunk)
  np.testing.assert_array_equal(found, expected)


def test_search_returns_ids_labels_and_exact_distances_over_several_query_passes(monkeypatch):
  rng = np.random.default_rng(0)
  embeddings, labels, _ = clustered(rng, 5, 30, 8)
  query = rng.standard_normal((40, 8)).astype(np.float32)
  index = GalleryIndex.from_embeddings(embeddings, labels, class_names=list("abcde"))
  monkeypatch.setattr(index_module, "QUERIES_PER_PASS", 16)  # 40 queries: passes of 16, 16 and 8
  found = index.search(query, 12)
  rows, distances = brute_force(embeddings, query, 12)
  np.testing.assert_array_equal(found.indices, rows)
  np.testing.assert_array_equal(found.ids, rows.astype(str))  # default ids: "0".."N-1"
  np.testing.assert_array_equal(found.labels, np.array(list("abcde"))[labels[rows]])
  assert found.distances.dtype == np.float32 and (found.distances >= 0).all()
  np.testing.assert_allclose(found.distances, distances, rtol=1e-6)  # recomputed from the differences
  # An item queried with itself is at distance 0 exactly (no cancellation from the norm expansion).
  assert (index.search(embeddings[:5], 1).distances == 0).all()
  # One query [D] is a batch of one; k above the size is lowered to it, with a note.
  whole = index.search(query[0], 1000)
  assert whole.ids.shape == (1, 150) and "k=1000 is more than the index's 150 items" in whole.note
  with pytest.raises(UserError, match=r"k=0: expected a positive integer"):
    index.search(query, 0)
  with pytest.raises(UserError, match=r"queries: shape \(40, 7\); expected \[N, 8\] embeddings"):
    index.search(query[:, :7], 3)


# ------------------------------------------------------------------------------------------------
# Changes, files


def test_add_remove_save_load_round_trip_searches_the_same(tmp_path):
  rng = np.random.default_rng(1)
  embeddings, labels, _ = clustered(rng, 4, 10, 5)
  names = np.array(["cat", "dog", "eel", "fox"])[labels]
  ids = [f"img{i:02d}" for i in range(40)]
  index = GalleryIndex.from_embeddings(embeddings, names, ids=ids, threshold=1.5, metadata={"source": "test"})
  index.add(embeddings[:3] + 0.1, ["gnu", "gnu", "cat"], ids=["n0", "n1", "n2"])
  index.remove(["img00", "img05", "n1"])
  index.remove([f"img{i:02d}" for i in range(30, 40)])  # every "fox": its class goes too
  assert len(index) == 30 and index.class_names == ["cat", "dog", "eel", "gnu"]
  query = rng.standard_normal((7, 5)).astype(np.float32)
  before = index.search(query, 6)
  index.save(tmp_path / "index")
  loaded = GalleryIndex.load(tmp_path / "index")
  assert isinstance(loaded.embeddings, np.memmap)  # read as used, not into memory
  after = loaded.search(query, 6)
  for field in ("ids", "labels", "distances", "indices"):
    np.testing.assert_array_equal(getattr(after, field), getattr(before, field))
  assert (loaded.threshold, loaded.metadata, loaded.class_names) == (1.5, {"source": "test"}, index.class_names)
  # The same through brute force on what is left.
  kept = [i for i in range(40) if i not in (0, 5) and i < 30]
  rows, _ = brute_force(np.concatenate([embeddings[kept], embeddings[[0, 2]] + 0.1]), query, 6)
  np.testing.assert_array_equal(after.ids, np.array([ids[i] for i in kept] + ["n0", "n2"])[rows])
  # A loaded index changes and saves over itself; default ids continue after the last default one.
  loaded.add(embeddings[:2], [0, 1], ids=None)  # integer labels without class_names: "0", "1"
  assert loaded.ids[-2:].tolist() == ["40", "41"] and loaded.labels[-2:].tolist() == ["0", "1"]
  loaded.save(tmp_path / "index")
  assert len(GalleryIndex.load(tmp_path / "index")) == 32


def test_ids_must_be_unique_and_known():
  index = GalleryIndex.from_embeddings(np.eye(3, dtype=np.float32), ["a", "b", "c"], ids=["x", "y", "z"])
  with pytest.raises(UserError, match=r"remove: id 'w' is not in the index \(1 of the 2 ids given are not"):
    index.remove(["w", "x"])
  assert len(index) == 3  # nothing removed
  with pytest.raises(UserError, match=r"add: id 'y' is already in the index"):
    index.add(np.ones((2, 3), np.float32), ["a", "a"], ids=["v", "y"])
  with pytest.raises(UserError, match=r"ids: 'q' is given 2 times"):
    GalleryIndex.from_embeddings(np.eye(2, dtype=np.float32), ["a", "b"], ids=["q", "q"])
  with pytest.raises(UserError, match=r"labels: integers in \[0, 3\] index class_names of 2 names"):
    GalleryIndex.from_embeddings(np.eye(2, dtype=np.float32), [0, 3], class_names=["a", "b"])
  with pytest.raises(UserError, match=r"embeddings: values that are not finite"):
    GalleryIndex.from_embeddings(np.array([[np.nan, 1.0]]), ["a"])


def write_index(tmp_path) -> pathlib.Path:
  rng = np.random.default_rng(2)
  return GalleryIndex.from_embeddings(rng.standard_normal((6, 4)), list("aabbcc")).save(tmp_path / "index")


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "embeddings.npy").write_bytes((p / "embeddings.npy").read_bytes()[:100]),
     r"embeddings\.npy: not a readable \.npy array .*the index is damaged: rebuild it"),
    (lambda p: (p / "labels.npy").unlink(), r"labels\.npy: missing; the index is damaged"),
    (lambda p: np.save(p / "labels.npy", np.zeros(5, np.int32)),
     r"labels\.npy: int32 of shape \(5,\); expected integers of shape \(6,\) \(index\.json's size and dim\)"),
    (lambda p: np.save(p / "labels.npy", np.full(6, 7, np.int32)), r"labels\.npy: labels outside the 3 classes"),
    (lambda p: np.save(p / "ids.npy", np.array([{"a": 1}] * 6, object), allow_pickle=True),
     r"ids\.npy: not a readable \.npy array"),  # a pickle is never loaded
    (lambda p: (p / "index.json").write_text("{not json"), r"index\.json: not readable JSON"),
    (lambda p: (p / "index.json").write_text('{"format": "something.else"}'),
     r"index\.json: not a siamese_jax gallery index"),
    (lambda p: (p / "index.json").write_text(json.dumps({**json.loads((p / "index.json").read_text()), "version": 9})),
     r"index format version 9; this siamese_jax reads version 1"),
    (lambda p: (p / "index.json").write_text(json.dumps({**json.loads((p / "index.json").read_text()), "dim": 5})),
     r"embeddings\.npy: float32 of shape \(6, 4\); expected floats of shape \(6, 5\)"),
    (lambda p: (p / "index.json").unlink(), r"not a gallery index \(no index\.json\)"),
])
def test_damaged_or_foreign_index_files_are_one_clear_error(tmp_path, damage, message):
  path = write_index(tmp_path)
  damage(path)
  with pytest.raises(UserError, match=message):
    GalleryIndex.load(path)


def test_save_refuses_a_folder_of_other_files(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  index = GalleryIndex.from_embeddings(np.eye(2, dtype=np.float32), ["a", "b"])
  with pytest.raises(UserError, match=r"a folder with other files in it and no index\.json"):
    index.save(tmp_path)


# ------------------------------------------------------------------------------------------------
# Classification and open set


def test_classify_rejects_far_queries_and_accepts_near_ones():
  rng = np.random.default_rng(3)
  embeddings, labels, centres = clustered(rng, 3, 8, 16, spread=0.1)  # noise norm ~0.4; centres ~5.7 apart
  index = GalleryIndex.from_embeddings(embeddings, labels, class_names=["x", "y", "z"], threshold=1.0)
  near = centres + 0.05 * rng.standard_normal(centres.shape).astype(np.float32)
  far = centres + 3.0  # 3 * sqrt(16) = 12 from every centre
  queries = np.concatenate([near, far])
  for method in ("nearest", "centroid", "medoid"):
    decided = index.classify(queries, method=method)
    assert decided.labels.tolist() == ["x", "y", "z", "unknown", "unknown", "unknown"], method
    assert decided.accepted.tolist() == [True] * 3 + [False] * 3 and decided.threshold == 1.0
    # The class is the one of highest similarity in the dense reference (metrics.retrieval), accepted or not.
    reference = gallery_class_similarities(queries, embeddings, labels, 3, method)
    assert decided.predicted.tolist() == np.array(["x", "y", "z"])[reference.argmax(1)].tolist()
    np.testing.assert_allclose(decided.distances, -reference.max(1), rtol=1e-5)
  assert index.classify(far, reject=False).labels.tolist() == index.classify(far).predicted.tolist()
  assert index.classify(far, threshold=20.0).accepted.all()  # a threshold given for this call
  medoids = index.classify(near, method="medoid")
  assert set(medoids.ids) <= set(index.ids) and index.classify(near, method="centroid").ids is None
  no_threshold = GalleryIndex.from_embeddings(embeddings, labels)
  assert no_threshold.classify(far).accepted.all() and no_threshold.classify(far).threshold is None


def test_gallery_distance_threshold_reads_the_threshold_record():
  record = {"scoring": "distance", "threshold": 0.9, "gallery_threshold": 0.7}
  assert gallery_distance_threshold(record) == pytest.approx(0.7)
  assert gallery_distance_threshold({"scoring": "distance", "threshold": 0.9}) == pytest.approx(0.9)
  assert gallery_distance_threshold({"scoring": "pair_head", "threshold": 0.5}) is None  # a probability
  assert gallery_distance_threshold(None) is None


# ------------------------------------------------------------------------------------------------
# The approximate backend


def test_usearch_recall_against_exact_and_its_saved_graph(tmp_path):
  # 2,000 items in 200 classes (32-d) and 200 queries of those classes: the graph's search beam (usearch's
  # default expansion 64) is 6x k on a small graph, and recall@10 measured 0.9975-1.0 over five seeds (0.99
  # even without classes); 0.95 leaves room for usearch releases without letting a broken backend pass.
  rng = np.random.default_rng(4)
  embeddings, labels, centres = clustered(rng, 200, 10, 32, spread=0.5)
  queries = centres[rng.integers(0, 200, 200)] + 0.5 * rng.standard_normal((200, 32)).astype(np.float32)
  index = GalleryIndex.from_embeddings(embeddings, labels, backend="usearch")
  approximate = index.search(queries, 10)
  exact = index.search(queries, 10, backend="exact")
  recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approximate.indices, exact.indices)])
  assert recall >= 0.95
  found = approximate.indices >= 0
  np.testing.assert_allclose(approximate.distances[found], np.linalg.norm(
      embeddings[approximate.indices[found]] - np.repeat(queries, 10, axis=0).reshape(200, 10, 32)[found], axis=1),
      rtol=1e-5)  # distances are Euclidean, recomputed like the exact backend's
  np.testing.assert_array_equal(index.search(queries[0], 10).indices, approximate.indices[:1])  # one query
  wider = index.search(queries, 10, expansion=256).indices  # a wider beam: at least as close to exact here
  assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(wider, exact.indices)]) >= recall
  with pytest.raises(UserError, match=r"expansion=0: expected a positive integer"):
    index.search(queries, 10, expansion=0)
  index.save(tmp_path / "index")
  assert (tmp_path / "index" / "ann.usearch").is_file()
  loaded = GalleryIndex.load(tmp_path / "index")
  np.testing.assert_array_equal(loaded.search(queries, 10).indices, approximate.indices)  # the saved graph
  (tmp_path / "index" / "ann.usearch").write_bytes(b"damaged")  # rebuilt from the embeddings, with a warning
  rebuilt = GalleryIndex.load(tmp_path / "index").search(queries, 10).indices
  assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(rebuilt, exact.indices)]) >= 0.95
  loaded.remove(["0"])  # rows move: the graph is rebuilt when next needed, and not saved stale
  loaded.backend = "exact"
  loaded.save(tmp_path / "index")
  assert not (tmp_path / "index" / "ann.usearch").exists()


def test_usearch_missing_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "usearch.index", None)  # import fails as if not installed
  index = GalleryIndex.from_embeddings(np.eye(3, dtype=np.float32), ["a", "b", "c"])
  with pytest.raises(UserError, match=r"backend='usearch' needs the usearch package: pip install "
                                      r"'siamese-jax\[ann\]'"):
    index.search(np.eye(3, dtype=np.float32), 1, backend="usearch")


# ------------------------------------------------------------------------------------------------
# From a trained model and a folder; the index and search modes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory) -> pathlib.Path:
  """gallery/<class>/ with 2 PNGs each of 3 classes of random 28x28 patterns; queries/<class>/ the same
  images plus one of a class the gallery lacks."""
  root = tmp_path_factory.mktemp("index_pngs")
  rng = np.random.default_rng(5)
  for name in ("circle", "square", "zigzag", "other"):
    pattern = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    for i in range(2):
      image = Image.fromarray(np.clip(pattern.astype(int) + rng.integers(-20, 20, (28, 28)), 0, 255).astype(np.uint8))
      for part in ("gallery", "queries") if name != "other" else ("queries",):
        (root / part / name).mkdir(parents=True, exist_ok=True)
        image.save(root / part / name / f"{i}.png")
  return root


def test_index_from_folder_with_the_trained_model(workdir, png_folders):
  model = load_trained_model(workdir)
  index = GalleryIndex.from_folder(model, png_folders / "gallery")
  assert len(index) == 6 and index.class_names == ["circle", "square", "zigzag"]
  assert sorted(index.ids) == sorted(f"{c}/{i}.png" for c in index.class_names for i in range(2))
  assert index.threshold == pytest.approx(gallery_distance_threshold(model.threshold))  # training calibrated it
  assert index.model["config_hash"] == model.config_hash and index.model["step"] == model.step
  # A gallery image as a query finds itself first, at distance 0 up to float32 rounding across batch sizes.
  images = np.stack([np.asarray(Image.open(png_folders / "gallery" / i))[..., None] for i in index.ids])
  found = index.search(model.embed(images), 2)
  assert found.ids[:, 0].tolist() == index.ids.tolist()
  assert found.distances[:, 0].max() < 1e-4
  np.testing.assert_array_equal(GalleryIndex.from_images(model, images, index.labels).embeddings.shape, (6, 64))
  with pytest.raises(UserError, match=r"the index was built with the model of config \w+ at step \d+; this one is"):
    index.check_model(dataclasses.replace(model, step=model.step + 1))  # another checkpoint of the same run


def test_index_and_search_modes(workdir, png_folders, tmp_path, capsys):
  summary = build_index(workdir, png_folders / "gallery", output=tmp_path / "index", backend="usearch")
  assert summary["items"] == 6 and summary["classes"] == 3 and (tmp_path / "index" / "ann.usearch").is_file()
  output = tmp_path / "search.csv"
  code, out, err = run_launch(["--mode=search", f"--workdir={workdir}", f"--index={tmp_path / 'index'}",
                               f"--queries={png_folders / 'queries'}", "--k=2", f"--output={output}"], capsys)
  assert code == 0, err
  assert "accuracy_at_1: 1\n" in out and "recall_at_2: 1\n" in out and "unknown_class_queries: 2" in out
  assert "backend: usearch" in out
  rows = list(csv.DictReader(output.open()))
  assert len(rows) == 8 * 2 and list(rows[0]) == ["query", "true_class", "rank", "id", "label", "distance"]
  firsts = [row for row in rows if row["rank"] == "1" and row["true_class"] != "other"]
  assert all(row["label"] == row["true_class"] and row["id"] == row["query"] for row in firsts)
  code, _, err = run_launch(["--mode=search", f"--workdir={workdir}", f"--index={tmp_path}",
                             f"--queries={png_folders / 'queries'}"], capsys)
  assert code == 2 and err.startswith("error: index ") and "not a gallery index" in err
