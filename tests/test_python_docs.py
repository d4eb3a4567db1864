"""docs/python.md's examples run as written: every ```python block, in order, in one fresh process.

The process starts in a folder holding what the page says it holds: `a.png` and `b.png` (two drawings of
one Omniglot character), `gallery/<character>/` (2 drawings each of 3 characters) and `queries/<character>/`
(2 other drawings of those 3 and of 1 character the gallery lacks), from the real images_evaluation.zip.
The page trains `omniglot:smoke` on real Omniglot, exports that model and serves it, so this is also the
end-to-end check of the public API after a fresh `import siamese_jax`.
"""

import os
import pathlib
import re
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "python.md"


def python_blocks(text: str) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def write_images(omniglot_dir: pathlib.Path, root: pathlib.Path) -> None:
  with zipfile.ZipFile(omniglot_dir / "images_evaluation.zip") as archive:
    names = sorted(n for n in archive.namelist() if n.startswith("images_evaluation/Angelic/") and n.endswith(".png"))
    drawings = {c: [n for n in names if f"/character{c:02d}/" in n] for c in range(1, 5)}
    (root / "a.png").write_bytes(archive.read(drawings[1][0]))
    (root / "b.png").write_bytes(archive.read(drawings[1][1]))
    for c, files in drawings.items():
      for part, chosen in (("gallery", files[2:4] if c < 4 else []), ("queries", files[4:6])):
        for name in chosen:
          target = root / part / f"character{c:02d}" / pathlib.Path(name).name
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(archive.read(name))


def test_the_page_has_the_examples_it_promises():
  blocks = python_blocks(PAGE.read_text())
  assert len(blocks) >= 5
  code = "\n".join(blocks)
  for call in ("siamese_jax.train(", "siamese_jax.load(", ".embed(", ".compare(", "GalleryIndex", ".search(",
               ".classify(", ".save(", "siamese_jax.export_model(", "siamese_jax.evaluate("):
    assert call in code, f"docs/python.md shows no {call}"


def test_every_example_runs_in_a_fresh_process(omniglot_dir, tmp_path):
  write_images(omniglot_dir, tmp_path)
  script = tmp_path / "examples.py"
  script.write_text("\n".join(python_blocks(PAGE.read_text())))
  env = {**os.environ, "OMNIGLOT_DIR": str(omniglot_dir)}
  env.pop("XLA_FLAGS", None)  # the package sets what the CPU needs itself
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = result.stdout.splitlines()
  assert "'omniglot'" in lines[0] and "'ablations/omniglot_triplet'" in lines[0]  # config_names()
  assert (tmp_path / "runs" / "smoke" / "eval" / "threshold.json").is_file()
  assert (tmp_path / "runs" / "smoke" / "eval" / "model.zip").is_file()
  assert (tmp_path / "runs" / "smoke" / "eval" / "index" / "index.json").is_file()
  # The served model reproduces the trained one (printed: the largest difference of their embeddings).
  difference = float(lines[-2])
  assert difference <= 1e-5, result.stdout
  assert lines[-1] in ("True", "False")
