"""Omniglot from its original files: alphabets, characters, drawers, and Lake's 20 one-shot runs.

Layout of the official release (github.com/brendenlake/omniglot, `python/`):

  images_background.zip   images_background/<Alphabet>/characterNN/XXXX_YY.png   30 alphabets, 964 chars
  images_evaluation.zip   images_evaluation/<Alphabet>/characterNN/XXXX_YY.png   20 alphabets, 659 chars
  all_runs.zip            runNN/{training/classKK.png, test/itemMM.png, class_labels.txt}

XXXX is the global character id, YY the drawer (1..20: each character was drawn once by 20 people).
Files are looked up in `data_dir`, else $OMNIGLOT_DIR, else ~/.cache/siamese_jax/omniglot; an image
zip may also be extracted there (`images_background/`). Missing files are downloaded when allowed.

Pixels are normalised by meaning: ink = 255, background = 0. The PNGs are 1-bit with a white
background (PIL reads background as 1/True), so they are inverted after conversion to grayscale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import tempfile
import urllib.request
from collections.abc import Sequence
from http.client import HTTPException
from typing import Literal

import numpy as np
import tqdm

from siamese_jax.data import sources
from siamese_jax.errors import UserError

# Where missing files come from; an argument everywhere so tests (and mirrors) can point elsewhere.
OMNIGLOT_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

# File name in data_dir -> (path below the base URL, md5 of the official file).
OMNIGLOT_FILES: dict[str, tuple[str, str]] = {
    "images_background.zip": ("images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation.zip": ("images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
    "all_runs.zip": ("one-shot-classification/all_runs.zip", "e8996daecdf12afeeb4a53a179f06b19"),
}

DEFAULT_OMNIGLOT_DIR = pathlib.Path("~/.cache/siamese_jax/omniglot")
DOWNLOAD_TIMEOUT_S = 60.0  # Per socket operation: an offline machine fails fast instead of hanging.

# Drawers held out by validation="drawers": Koch et al. (2015) trained on 12 of the 20 drawers.
KOCH_VALIDATION_DRAWERS = tuple(range(13, 21))

_DRAWER_PATTERN = re.compile(r"^\d+_(\d+)\.[A-Za-z]+$")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`data_dir` if given, else $OMNIGLOT_DIR, else ~/.cache/siamese_jax/omniglot."""
  if data_dir is not None:
    return pathlib.Path(data_dir).expanduser()
  if os.environ.get("OMNIGLOT_DIR"):
    return pathlib.Path(os.environ["OMNIGLOT_DIR"]).expanduser()
  return DEFAULT_OMNIGLOT_DIR.expanduser()


def _where(data_dir: str | os.PathLike | None) -> str:
  """Says where the folder came from, so a user knows which knob to turn.

  A caller that resolved the folder itself (the pipeline calls `resolve_data_dir` first) passes the
  same path $OMNIGLOT_DIR or the default gave; that is reported as such, not as a data_dir argument.
  """
  environment = os.environ.get("OMNIGLOT_DIR")
  if data_dir is not None:
    given = pathlib.Path(data_dir).expanduser()
    if environment and given == pathlib.Path(environment).expanduser():
      return "$OMNIGLOT_DIR"
    if not environment and given == DEFAULT_OMNIGLOT_DIR.expanduser():
      return "the default (OMNIGLOT_DIR is not set)"
    return "the data_dir argument, config field data.data_dir"
  if environment:
    return "$OMNIGLOT_DIR"
  return "the default (OMNIGLOT_DIR is not set)"


def file_url(filename: str, base_url: str = OMNIGLOT_BASE_URL) -> str:
  return f"{base_url.rstrip('/')}/{OMNIGLOT_FILES[filename][0]}"


def download_omniglot_file(filename: str, directory: str | os.PathLike, *,
                           base_url: str = OMNIGLOT_BASE_URL,
                           timeout: float = DOWNLOAD_TIMEOUT_S) -> pathlib.Path:
  """Downloads one official file into `directory`, checks its md5, and renames it into place.

  The bytes go to a temporary file in the same folder first: an interrupted or corrupt download
  never leaves a file under the final name for the next run to trust.
  """
  if filename not in OMNIGLOT_FILES:
    raise ValueError(f"unknown Omniglot file {filename!r}; known: {sorted(OMNIGLOT_FILES)}")
  directory = pathlib.Path(directory)
  target = directory / filename
  url = file_url(filename, base_url)
  expected_md5 = OMNIGLOT_FILES[filename][1]
  advice = (f"Download {url} yourself and put it at {target}, or set OMNIGLOT_DIR to a folder that "
            f"holds {filename}")
  temporary = None
  try:
    directory.mkdir(parents=True, exist_ok=True)
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, tempfile.NamedTemporaryFile(
        dir=directory, prefix=f".{filename}.", suffix=".part", delete=False) as file:
      temporary = file.name
      total = int(response.headers.get("Content-Length") or 0) or None
      with tqdm.tqdm(total=total, desc=f"Downloading {filename}", unit="B", unit_scale=True,
                     leave=False) as progress:
        while chunk := response.read(1 << 20):
          file.write(chunk)
          md5.update(chunk)
          progress.update(len(chunk))
    if md5.hexdigest() != expected_md5:
      raise UserError(f"Omniglot download {url}: md5 {md5.hexdigest()} does not match the official "
                      f"{expected_md5} (a proxy page or a changed file?). {advice}.")
    os.replace(temporary, target)
    temporary = None
  except (OSError, HTTPException, ValueError) as error:  # URLError and timeouts are OSErrors.
    raise UserError(f"Omniglot: {filename} is missing and downloading it failed "
                    f"({type(error).__name__}: {error}) from {url}. {advice}.") from error
  finally:
    if temporary is not None and os.path.exists(temporary):
      os.remove(temporary)
  return target


def find_omniglot_file(filename: str, *, data_dir: str | os.PathLike | None = None,
                       download: bool = True, base_url: str = OMNIGLOT_BASE_URL,
                       timeout: float = DOWNLOAD_TIMEOUT_S) -> pathlib.Path:
  """The path of `filename` (e.g. "all_runs.zip") in the Omniglot folder, downloaded if allowed."""
  directory = resolve_data_dir(data_dir)
  path = directory / filename
  if path.is_file():
    return path
  if not download:
    raise UserError(
        f"Omniglot: {path} not found (folder from {_where(data_dir)}). Put {filename} there "
        f"(from {file_url(filename, base_url)}), set OMNIGLOT_DIR to the folder that holds it, or "
        "allow download=True (config field data.download)")
  return download_omniglot_file(filename, directory, base_url=base_url, timeout=timeout)


def _parse_drawer(filename: str) -> int:
  match = _DRAWER_PATTERN.match(filename)
  return int(match.group(1)) if match else -1


def omniglot_source(subset: Literal["background", "evaluation"] = "background", *,
                    data_dir: str | os.PathLike | None = None,
                    image_shape: Sequence[int] = (105, 105, 1), in_memory: bool = True,
                    cache_dir: str | os.PathLike | None = None, download: bool = True,
                    base_url: str = OMNIGLOT_BASE_URL, resize: str = "stretch") -> sources.ImageSource:
  """Omniglot's background (training) or evaluation set as an ImageSource.

  Groups are alphabets, classes "Alphabet/characterNN", drawers the YY of `XXXX_YY.png`, file ids
  the path inside the zip ("images_background/Greek/character01/0394_01.png"), identical whether the
  zip or the extracted folder is read (the zip wins when both exist). Ink = 255, background = 0.
  `resize` (sources.RESIZE_MODES) matters only for a non-square `image_shape`.
  """
  if subset not in ("background", "evaluation"):
    raise UserError(f"subset={subset!r}: expected 'background' or 'evaluation'")
  directory = resolve_data_dir(data_dir)
  prefix = f"images_{subset}"
  zip_path, folder = directory / f"{prefix}.zip", directory / prefix
  if not zip_path.is_file() and not folder.is_dir():
    if not download:
      raise UserError(
          f"Omniglot {subset}: neither {zip_path} nor the extracted folder {folder}/ exists "
          f"(folder from {_where(data_dir)}). Put {prefix}.zip there (from "
          f"{file_url(prefix + '.zip', base_url)}), set OMNIGLOT_DIR to the folder that holds it, "
          "or allow download=True (config field data.download)")
    download_omniglot_file(f"{prefix}.zip", directory, base_url=base_url)

  if zip_path.is_file():
    with sources.open_zip(zip_path) as archive:
      names = archive.namelist()
    where = str(zip_path)
  else:
    names = sorted(path.relative_to(directory).as_posix() for path in folder.rglob("*")
                   if path.is_file())
    where = str(folder)
  file_ids, class_keys, group_keys, drawers = [], [], [], []
  for name in sorted(names):
    if name.startswith("__MACOSX/") or not sources.is_image_name(name):
      continue
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != prefix:
      raise UserError(f"{where}: unexpected image {name!r}; expected "
                      f"{prefix}/<Alphabet>/characterNN/XXXX_YY.png")
    _, alphabet, character, filename = parts
    file_ids.append(name)
    class_keys.append(f"{alphabet}/{character}")
    group_keys.append(alphabet)
    drawers.append(_parse_drawer(filename))
  if not file_ids:
    raise UserError(f"{where}: holds no Omniglot images; expected {prefix}/<Alphabet>/characterNN/"
                    "XXXX_YY.png (re-download or re-extract it)")
  if zip_path.is_file():
    reader: sources.Reader = sources.ZipReader(zip_path, file_ids)
  else:
    reader = sources.FolderReader(directory, file_ids)
  return sources.source_from_reader(
      reader, file_ids=file_ids, class_keys=class_keys, group_keys=group_keys,
      drawers=np.array(drawers, np.int32), image_shape=image_shape, invert=True,
      in_memory=in_memory, cache_dir=cache_dir, description=f"omniglot_{subset}", resize=resize)


def split_background(source: sources.ImageSource, *,
                     validation: Literal["alphabets", "drawers", "none"] = "alphabets",
                     num_validation_alphabets: int = 5,
                     validation_drawers: Sequence[int] = KOCH_VALIDATION_DRAWERS,
                     seed: int = 0) -> tuple[sources.ImageSource, sources.ImageSource | None]:
  """Splits the background set into (train, validation) for model selection.

  * "alphabets": whole alphabets, `num_validation_alphabets` of them drawn with `seed`, go to
    validation, so validation measures one-shot skill on unseen alphabets (like the evaluation set).
  * "drawers": records by the drawers in `validation_drawers` (default 13..20, as in Koch et al.)
    go to validation. Validation then has the SAME classes as training, drawn by other people: it
    measures generalisation to new drawings of known characters, an easier task than the
    evaluation set's unseen alphabets.
  * "none": (source, None).
  """
  if validation == "none":
    return source, None
  if validation == "alphabets":
    num_groups = source.num_groups
    count = num_validation_alphabets
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not (
        1 <= count < num_groups):
      raise UserError(f"num_validation_alphabets={count!r}: expected an integer in "
                      f"[1, {num_groups - 1}] (the source has {num_groups} alphabets)")
    held_groups = np.sort(np.random.default_rng(seed).permutation(num_groups)[:count])
    held = np.isin(source.class_groups, held_groups)
    return source.select_classes(np.flatnonzero(~held)), source.select_classes(np.flatnonzero(held))
  if validation == "drawers":
    drawers = np.unique(np.asarray(list(validation_drawers), dtype=np.int64))
    present = np.unique(source.drawers)
    if (present < 0).any():
      raise UserError("validation='drawers': the source has records with unknown drawers (-1); "
                      "use validation='alphabets' or a source with drawer information")
    if drawers.size == 0 or not np.isin(drawers, present).all():
      raise UserError(f"validation_drawers={tuple(validation_drawers)}: expected drawers among "
                      f"{present.tolist()}")
    if np.isin(present, drawers).all():
      raise UserError(f"validation_drawers={tuple(validation_drawers)}: holds out every drawer; "
                      "leave some for training")
    held = np.isin(source.drawers, drawers)
    return source.subset(~held), source.subset(held)
  raise UserError(f"validation={validation!r}: expected 'alphabets', 'drawers' or 'none'")


VINYALS_SPLITS = ("train", "val", "trainval", "test")
_VINYALS_LINE = re.compile(r"^([^/]+/character\d+)/rot(000|090|180|270)$")


def vinyals_source(split: str, characters: sources.ImageSource, *,
                   data_dir: str | os.PathLike | None = None) -> sources.ImageSource:
  """One split of Vinyals et al. (2016): listed characters, each rotated by 0/90/180/270 degrees.

  `<data_dir>/splits/vinyals/<split>.txt` lists one class per line, "Alphabet/characterNN/rotDDD"
  (train 4,112 classes, val 688, trainval 4,800 = 1,200 characters x 4, test 1,692 = 423 x 4);
  `characters` holds all 1,623 characters (background and evaluation sets, as `vinyals_characters`
  builds). A rotation makes a new class of the same alphabet (its group). Rotation is counter-clockwise
  by the given degrees on the already resized images (a quarter turn commutes with square resizing).
  """
  if split not in VINYALS_SPLITS:
    raise UserError(f"Vinyals split {split!r}: expected one of {VINYALS_SPLITS}")
  path = resolve_data_dir(data_dir) / "splits" / "vinyals" / f"{split}.txt"
  if not path.is_file():
    raise UserError(f"Vinyals split file {path} not found (folder from {_where(data_dir)}); expected "
                    f"splits/vinyals/{{train,val,trainval,test}}.txt beside the Omniglot zips, one "
                    "'Alphabet/characterNN/rotDDD' per line")
  class_of = {name: c for c, name in enumerate(characters.class_names)}
  lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  order = np.argsort(characters.labels, kind="stable")
  starts = np.searchsorted(characters.labels[order], np.arange(characters.num_classes + 1))
  images, labels, file_ids, drawers, class_names, class_groups = [], [], [], [], [], []
  group_names: list[str] = []
  for number, line in enumerate(lines, 1):
    match = _VINYALS_LINE.match(line)
    if not match or match.group(1) not in class_of:
      raise UserError(f"{path}:{number}: {line!r} is not 'Alphabet/characterNN/rotDDD' (DDD in 000, 090, "
                      "180, 270) naming an Omniglot character")
    character, degrees = match.group(1), int(match.group(2))
    records = order[starts[class_of[character]]:starts[class_of[character] + 1]]
    alphabet = character.split("/")[0]
    if alphabet not in group_names:
      group_names.append(alphabet)
    images.append(np.rot90(_record_images(characters, records), k=degrees // 90, axes=(1, 2)))
    labels.append(np.full(len(records), len(class_names), np.int32))
    file_ids += [f"{characters.file_ids[r]}#rot{degrees:03d}" for r in records]
    drawers.append(characters.drawers[records])
    class_names.append(line)
    class_groups.append(group_names.index(alphabet))
  if not class_names:
    raise UserError(f"{path}: lists no classes")
  if len(set(class_names)) != len(class_names):
    raise UserError(f"{path}: lists a class twice")
  return sources.ImageSource(
      labels=np.concatenate(labels), class_names=class_names, class_groups=class_groups,
      group_names=group_names, file_ids=file_ids, drawers=np.concatenate(drawers),
      image_shape=characters.image_shape, images=np.ascontiguousarray(np.concatenate(images)))


def _record_images(source: sources.ImageSource, records: np.ndarray) -> np.ndarray:
  if source.images is not None:
    return source.images[records]
  return np.stack([source[int(r)] for r in records])


def vinyals_characters(background: sources.ImageSource,
                       evaluation: sources.ImageSource) -> sources.ImageSource:
  """All 1,623 characters in one source (class names "Alphabet/characterNN"), for `vinyals_source`."""
  offset = background.num_classes
  group_offset = background.num_groups
  return sources.ImageSource(
      labels=np.concatenate([background.labels, evaluation.labels + offset]),
      class_names=background.class_names + evaluation.class_names,
      class_groups=np.concatenate([background.class_groups, evaluation.class_groups + group_offset]),
      group_names=background.group_names + evaluation.group_names,
      file_ids=background.file_ids + evaluation.file_ids,
      drawers=np.concatenate([background.drawers, evaluation.drawers]),
      image_shape=background.image_shape,
      images=np.concatenate([_record_images(background, np.arange(len(background))),
                             _record_images(evaluation, np.arange(len(evaluation)))]))


@dataclasses.dataclass(frozen=True)
class LakeRun:
  """One of Lake et al.'s 20-way one-shot runs: match each test item to one training image.

  training: uint8 [K, H, W, C], class01..classK (one drawing of each of K characters).
  test: uint8 [K, H, W, C], item01..itemK (another drawer's drawing of each character).
  answers: int32 [K], answers[i] = index into `training` of the right class for test[i].
  """
  name: str
  training: np.ndarray
  test: np.ndarray
  answers: np.ndarray


_RUN_LABELS = re.compile(r"^(?:(.*)/)?(run\d+)/class_labels\.txt$")


def load_lake_runs(zip_path: str | os.PathLike | None = None,
                   image_shape: Sequence[int] = (105, 105, 1), *,
                   data_dir: str | os.PathLike | None = None, download: bool = True,
                   base_url: str = OMNIGLOT_BASE_URL, resize: str = "stretch") -> list[LakeRun]:
  """Reads Lake's official one-shot benchmark (all_runs.zip) into 20 LakeRuns, sorted by name.

  `zip_path=None` looks for all_runs.zip in the Omniglot folder (downloading it if allowed). Images
  follow the same ink = 255 convention as `omniglot_source`, and the same `resize`.
  """
  image_shape = sources.check_image_shape(image_shape)
  if zip_path is None:
    zip_path = find_omniglot_file("all_runs.zip", data_dir=data_dir, download=download,
                                  base_url=base_url)
  zip_path = pathlib.Path(zip_path)
  if not zip_path.is_file():
    raise UserError(f"Lake runs {zip_path}: not found; expected all_runs.zip from "
                    f"{file_url('all_runs.zip', base_url)}")
  with sources.open_zip(zip_path) as archive:
    names = set(archive.namelist())
    runs = []
    for labels_name in sorted(names):
      match = _RUN_LABELS.match(labels_name)
      if not match:
        continue
      run_dir = labels_name[: -len("class_labels.txt")]
      run_name = match.group(2)

      def read(member: str) -> np.ndarray:
        return sources.decode_image(archive.read(member), image_shape, invert=True, resize=resize,
                                    name=f"{zip_path}:{member}")

      training_names = sorted(n for n in names if n.startswith(run_dir + "training/")
                              and sources.is_image_name(n))
      test_names = sorted(n for n in names if n.startswith(run_dir + "test/")
                          and sources.is_image_name(n))
      training_index = {n[len(run_dir):]: i for i, n in enumerate(training_names)}
      test_index = {n[len(run_dir):]: i for i, n in enumerate(test_names)}
      answers = np.full(len(test_names), -1, np.int32)
      for line in archive.read(labels_name).decode().splitlines():
        if not line.strip():
          continue
        # Lines read "runNN/test/itemMM.png runNN/training/classKK.png"; drop the run folder.
        fields = [f.split("/", 1)[1] if "/" in f else f for f in line.split()]
        test_file, training_file = (fields + ["", ""])[:2]
        if len(fields) != 2 or test_file not in test_index or training_file not in training_index:
          raise UserError(f"{zip_path}:{labels_name}: unexpected line {line!r}; expected "
                          f"'{run_name}/test/itemMM.png {run_name}/training/classKK.png'")
        answers[test_index[test_file]] = training_index[training_file]
      if not test_names or (answers < 0).any():
        raise UserError(f"{zip_path}:{labels_name}: does not give a class for every test item")
      runs.append(LakeRun(
          name=run_name,
          training=np.stack([read(n) for n in training_names]),
          test=np.stack([read(n) for n in test_names]),
          answers=answers))
  if not runs:
    raise UserError(f"{zip_path}: holds no runNN/class_labels.txt; expected Lake's all_runs.zip")
  return runs
