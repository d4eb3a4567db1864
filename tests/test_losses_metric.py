"""The cosine, pair-weighting and proxy losses, checked independently of their vectorised code:

  * values worked out by hand on tiny 2-D batches (unit vectors at 0, 60, 90 and 180 degrees, so every
    cosine is 1, 1/2, sqrt3/2, 0, -1/2 or -1; the arithmetic is in the comments);
  * plain numpy references written from each paper's formula with explicit loops over anchors and pairs,
    in float64, on random batches (several seeds, m-per-class and mixed labels), and their finite
    differences against the gradients;
  * the edge cases a training batch can hit (no positives, one class, all-equal or all-zero embeddings):
    the loss equals its defined value and it and its gradient stay finite.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from siamese_jax import losses
from siamese_jax.errors import UserError

IN_BATCH = ("multi_similarity", "circle", "lifted_structure", "supcon")
PROXY = ("proxy_anchor", "arcface", "cosface")
NEW_LOSSES = IN_BATCH + PROXY

DEFAULTS = {
    "multi_similarity": {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1, "mining": True},
    "circle": {"margin": 0.25, "gamma": 256.0},
    "lifted_structure": {"margin": 1.0},
    "supcon": {"temperature": 0.1, "supervised": True},
    "proxy_anchor": {"margin": 0.1, "alpha": 32.0},
    "arcface": {"scale": 64.0, "margin": 0.5},
    "cosface": {"scale": 64.0, "margin": 0.35},
}

SQRT3 = math.sqrt(3.0)


def unit(degrees: float, norm: float = 1.0) -> list[float]:
  """A 2-D vector at `degrees` with length `norm` (cosine losses must not see the norm)."""
  radians = math.radians(degrees)
  return [norm * math.cos(radians), norm * math.sin(radians)]


def rows(*vectors) -> np.ndarray:
  """Vectors as an m-per-class batch [B, 1, D]."""
  return np.asarray(vectors, np.float32)[:, None, :]


def column(*labels: int) -> np.ndarray:
  return np.asarray(labels, np.int32)[:, None]


def softplus(x: float) -> float:
  return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def logsumexp(values) -> float:
  values = list(values)
  peak = max(values)
  return peak + math.log(sum(math.exp(v - peak) for v in values))


def cross_entropy(logits, target: int) -> float:
  return logsumexp(logits) - logits[target]


# ------------------------------------------------------------------------------------------------
# Calling the losses: jitted as in the train step, value and gradient in one compilation per (loss, options,
# shape); the tests share shapes, since compiling dominates this file's time.


@functools.lru_cache(maxsize=None)
def _compiled(name: str, options: tuple):
  """(loss, metrics) and the gradient with respect to the embeddings and, for proxy losses, the proxies."""
  loss_fn = losses.get_loss(name)
  argnums = (0, 2) if name in PROXY else (0,)
  return jax.jit(jax.value_and_grad(lambda *inputs: loss_fn(*inputs, **dict(options)), argnums, has_aux=True))


def evaluate(name: str, embeddings, labels, proxies=None, **options):
  """(loss, metrics, gradients) of loss `name`, as Python floats and numpy arrays."""
  inputs = (jnp.asarray(embeddings, jnp.float32), jnp.asarray(labels, jnp.int32))
  if proxies is not None:
    inputs = (*inputs, jnp.asarray(proxies, jnp.float32))
  (loss, metrics), grads = _compiled(name, tuple(sorted(options.items())))(*inputs)
  return float(loss), {key: float(value) for key, value in metrics.items()}, tuple(np.asarray(g) for g in grads)


def run(name: str, embeddings, labels, proxies=None, **options) -> tuple[float, dict[str, float]]:
  return evaluate(name, embeddings, labels, proxies, **options)[:2]


def gradients(name: str, embeddings, labels, proxies=None, **options) -> tuple[np.ndarray, ...]:
  return evaluate(name, embeddings, labels, proxies, **options)[2]


# ------------------------------------------------------------------------------------------------
# numpy references: loops over anchors, pairs and proxies, straight from each paper's formula, float64.
# Every reference takes the flattened rows x [N, D], labels y [N], the batch element of each row (for
# NT-Xent's views) and the proxies [C, D] (None for in-batch losses); it returns (loss, metrics).


def cosine(u: np.ndarray, v: np.ndarray) -> float:
  """Cosine of two vectors; 0 when either is the zero vector (its normalisation is 0, not NaN)."""
  nu, nv = float(np.sqrt(u @ u)), float(np.sqrt(v @ v))
  return 0.0 if nu == 0.0 or nv == 0.0 else float(u @ v) / (nu * nv)


def positives_of(i, y):
  return [j for j in range(len(y)) if j != i and y[j] == y[i]]


def negatives_of(i, y):
  return [j for j in range(len(y)) if y[j] != y[i]]


def reference_multi_similarity(x, y, element, proxies, *, alpha, beta, base, epsilon, mining):
  """Wang et al. 2019, eq. (the MS loss) with the pair mining of their section 4.2."""
  del element, proxies
  total, anchors = 0.0, 0
  kept_positive = kept_negative = all_positive = all_negative = 0
  for i in range(len(y)):
    positives, negatives = positives_of(i, y), negatives_of(i, y)
    all_positive += len(positives)
    all_negative += len(negatives)
    if not positives:
      continue
    anchors += 1
    s = {j: cosine(x[i], x[j]) for j in range(len(y))}
    if mining:
      hardest_negative = max((s[n] for n in negatives), default=-math.inf)
      easiest_positive = min(s[p] for p in positives)
      positives = [p for p in positives if s[p] < hardest_negative + epsilon]
      negatives = [n for n in negatives if s[n] > easiest_positive - epsilon]
    kept_positive += len(positives)
    kept_negative += len(negatives)
    total += 1 / alpha * math.log(1 + sum(math.exp(-alpha * (s[p] - base)) for p in positives))
    total += 1 / beta * math.log(1 + sum(math.exp(beta * (s[n] - base)) for n in negatives))
  metrics = {"mined_positive_fraction": kept_positive / max(all_positive, 1),
             "mined_negative_fraction": kept_negative / max(all_negative, 1)}
  return total / max(anchors, 1), metrics


def reference_circle(x, y, element, proxies, *, margin, gamma, frozen=None):
  """Sun et al. 2020, eq. 6 with the weights and margins of eq. 8 (pair-label form).

  `frozen`: rows at which the weights alpha_p, alpha_n are evaluated (they are constants to the
  gradient); the rows themselves by default.
  """
  del element, proxies
  frozen = x if frozen is None else frozen
  total, anchors = 0.0, 0
  for i in range(len(y)):
    positives, negatives = positives_of(i, y), negatives_of(i, y)
    if not positives or not negatives:
      continue
    anchors += 1
    positive_logits = []
    for p in positives:
      alpha_p = max(0.0, 1 + margin - cosine(frozen[i], frozen[p]))
      positive_logits.append(-gamma * alpha_p * (cosine(x[i], x[p]) - (1 - margin)))
    negative_logits = []
    for n in negatives:
      alpha_n = max(0.0, cosine(frozen[i], frozen[n]) + margin)
      negative_logits.append(gamma * alpha_n * (cosine(x[i], x[n]) - margin))
    total += softplus(logsumexp(negative_logits) + logsumexp(positive_logits))
  return total / max(anchors, 1), {}


def reference_lifted_structure(x, y, element, proxies, *, margin):
  """Oh Song et al. 2016, eq. 4: Euclidean distances of the raw embeddings, over unordered positive pairs."""
  del element, proxies
  distance = lambda a, b: float(np.sqrt((x[a] - x[b]) @ (x[a] - x[b])))  # noqa: E731
  squared_hinges = []
  for i in range(len(y)):
    for j in positives_of(i, y):
      if j < i:
        continue
      terms = [math.exp(margin - distance(i, k)) for k in negatives_of(i, y)]
      terms += [math.exp(margin - distance(j, l)) for l in negatives_of(j, y)]
      if not terms:
        continue
      squared_hinges.append(max(0.0, math.log(sum(terms)) + distance(i, j)) ** 2)
  return (sum(squared_hinges) / (2 * len(squared_hinges)) if squared_hinges else 0.0), {}


def reference_supcon(x, y, element, proxies, *, temperature, supervised):
  """Khosla et al. 2020, L_out (eq. 2), averaged over anchors with a positive; NT-Xent when unsupervised."""
  del proxies
  total, anchors = 0.0, 0
  for i in range(len(y)):
    if supervised:
      positives = positives_of(i, y)
    else:
      positives = [j for j in range(len(y)) if j != i and element[j] == element[i]]
    if not positives:
      continue
    anchors += 1
    logits = {a: cosine(x[i], x[a]) / temperature for a in range(len(y)) if a != i}
    denominator = logsumexp(logits.values())
    total += -sum(logits[p] - denominator for p in positives) / len(positives)
  return total / max(anchors, 1), {}


def reference_proxy_anchor(x, y, element, proxies, *, margin, alpha):
  """Kim et al. 2020, eq. 4."""
  del element
  present = sorted(set(int(label) for label in y))
  positive_term = sum(
      math.log(1 + sum(math.exp(-alpha * (cosine(x[i], proxies[c]) - margin)) for i in range(len(y)) if y[i] == c))
      for c in present) / len(present)
  negative_term = sum(
      math.log(1 + sum(math.exp(alpha * (cosine(x[i], proxies[c]) + margin)) for i in range(len(y)) if y[i] != c))
      for c in range(len(proxies))) / len(proxies)
  return positive_term + negative_term, {}


def scale_softmax(x, y, proxies, scale, target):
  """Mean cross-entropy of the logits scale * cos_j, with the target class's replaced by target(cos_y)."""
  total, correct = 0.0, 0
  for i in range(len(y)):
    cosines = [cosine(x[i], proxy) for proxy in proxies]
    logits = [scale * c for c in cosines]
    logits[y[i]] = target(cosines[y[i]])
    total += cross_entropy(logits, y[i])
    correct += int(np.argmax(cosines) == y[i])
  return total / len(y), {"accuracy": correct / len(y)}


def reference_arcface(x, y, element, proxies, *, scale, margin):
  """Deng et al. 2019, eq. 3, with insightface's fallback cos_y - m sin(pi - m) where theta_y + m > pi."""
  del element

  def target(c):
    if c > math.cos(math.pi - margin):
      return scale * math.cos(math.acos(min(max(c, -1.0), 1.0)) + margin)
    return scale * (c - margin * math.sin(math.pi - margin))

  return scale_softmax(x, y, proxies, scale, target)


def reference_cosface(x, y, element, proxies, *, scale, margin):
  """Wang et al. 2018 (CosFace / LMCL), eq. 4."""
  del element
  return scale_softmax(x, y, proxies, scale, lambda c: scale * (c - margin))


REFERENCES = {
    "multi_similarity": reference_multi_similarity,
    "circle": reference_circle,
    "lifted_structure": reference_lifted_structure,
    "supcon": reference_supcon,
    "proxy_anchor": reference_proxy_anchor,
    "arcface": reference_arcface,
    "cosface": reference_cosface,
}


def reference(name: str, embeddings, labels, proxies=None, **options) -> tuple[float, dict[str, float]]:
  """The reference on [B, k, D] inputs (float32 arrays as the loss sees them, in float64), defaults filled in."""
  embeddings = np.asarray(embeddings, np.float64)
  batch, k, dim = embeddings.shape
  x = embeddings.reshape(batch * k, dim)
  y = np.asarray(labels).reshape(-1)
  element = np.repeat(np.arange(batch), k)
  if proxies is not None:
    proxies = np.asarray(proxies, np.float64)
  return REFERENCES[name](x, y, element, proxies, **{**DEFAULTS[name], **options})


# ------------------------------------------------------------------------------------------------
# Hand-worked values. The in-batch cases share four 2-D rows (norms vary; cosine losses must not see them):
#   a = 0 deg (norm 1), b = 60 deg (norm 2), c = 90 deg (norm 1), d = 180 deg (norm 3); labels [0, 0, 1, 1].
# Cosines: ab 1/2, ac 0, ad -1, bc sqrt3/2, bd -1/2, cd 0.
#   anchor a: positive b 1/2;  negatives c 0,       d -1
#   anchor b: positive a 1/2;  negatives c sqrt3/2, d -1/2
#   anchor c: positive d 0;    negatives a 0,       b sqrt3/2
#   anchor d: positive c 0;    negatives a -1,      b -1/2

FOUR = rows(unit(0), unit(60, 2.0), unit(90), unit(180, 3.0))
FOUR_LABELS = column(0, 0, 1, 1)


def test_multi_similarity_by_hand():
  # Mining (epsilon 0.1): keep negative n iff S_in > min_p S_ip - 0.1; positive p iff S_ip < max_n S_in + 0.1.
  #   a: negatives must exceed 0.4: none; the positive must be below 0.1: 1/2 is not        -> 0
  #   b: negatives above 0.4: c (sqrt3/2); positive below sqrt3/2 + 0.1: a                 -> both kept
  #   c: negatives above -0.1: a (0), b (sqrt3/2); positive below sqrt3/2 + 0.1: d (0)      -> all kept
  #   d: negatives above -0.1: none; positive below -1/2 + 0.1: 0 is not                    -> 0
  # alpha 2, beta 50, base 1/2: exp(-2 (S - 1/2)) per positive, exp(50 (S - 1/2)) per negative:
  #   b: 1/2 log(1 + e^0) + 1/50 log(1 + e^(25 (sqrt3 - 1)))
  #   c: 1/2 log(1 + e^1) + 1/50 log(1 + e^-25 + e^(25 (sqrt3 - 1)))
  # Mean over the 4 anchors (each has a positive). Kept: 2 of 4 positive pairs, 3 (bc, ca, cb) of 8 negatives.
  hard = 25 * (SQRT3 - 1)
  b = 0.5 * math.log(2) + math.log1p(math.exp(hard)) / 50
  c = 0.5 * math.log1p(math.e) + math.log(1 + math.exp(-25) + math.exp(hard)) / 50
  loss, metrics = run("multi_similarity", FOUR, FOUR_LABELS)
  assert loss == pytest.approx((b + c) / 4, rel=1e-5)
  assert metrics["mined_positive_fraction"] == pytest.approx(0.5)
  assert metrics["mined_negative_fraction"] == pytest.approx(3 / 8)
  # Without mining every pair counts: a adds 1/2 log 2 + 1/50 log(1 + e^-25 + e^-75), b's negatives gain
  # d's e^-50, and d adds 1/2 log(1 + e) + 1/50 log(1 + e^-75 + e^-50).
  a = 0.5 * math.log(2) + math.log(1 + math.exp(-25) + math.exp(-75)) / 50
  b = 0.5 * math.log(2) + math.log(1 + math.exp(hard) + math.exp(-50)) / 50
  d = 0.5 * math.log1p(math.e) + math.log(1 + math.exp(-75) + math.exp(-50)) / 50
  loss, _ = run("multi_similarity", FOUR, FOUR_LABELS, mining=False)
  assert loss == pytest.approx((a + b + c + d) / 4, rel=1e-5)


def test_circle_by_hand():
  # margin 1/4: O_p = 5/4, O_n = -1/4, Delta_p = 3/4, Delta_n = 1/4; gamma 4.
  #   positive s: -gamma relu(5/4 - s)(s - 3/4):  s = 1/2 -> 4 * 3/4 * 1/4 = 3/4;  s = 0 -> 4 * 5/4 * 3/4 = 15/4
  #   negative s:  gamma relu(s + 1/4)(s - 1/4):  s = 0 -> -4 * 1/16 = -1/4;  s = sqrt3/2 -> 4 (3/4 - 1/16) = 11/4;
  #                s = -1/2 or -1 -> weight 0 -> logit 0, which still adds e^0 = 1 to the sum.
  #   a: softplus(log(e^-1/4 + 1) + 3/4)        b: softplus(log(e^11/4 + 1) + 3/4)
  #   c: softplus(log(e^-1/4 + e^11/4) + 15/4)  d: softplus(log(1 + 1) + 15/4)
  # (The default gamma 256 = 64 * 4 scales every logit by 64; the loop reference checks it.)
  expected = np.mean([softplus(math.log(math.exp(-0.25) + 1) + 0.75), softplus(math.log(math.exp(2.75) + 1) + 0.75),
                      softplus(math.log(math.exp(-0.25) + math.exp(2.75)) + 3.75), softplus(math.log(2) + 3.75)])
  loss, _ = run("circle", FOUR, FOUR_LABELS, gamma=4.0)
  assert loss == pytest.approx(expected, rel=1e-5)


def test_lifted_structure_by_hand():
  # Euclidean distances of the raw rows (not normalised), here unit vectors a, b, c, d at 0, 60, 90, 180 deg:
  # ab 1, ac sqrt2, ad 2, bc 2 sin15deg, bd sqrt3, cd sqrt2 (chords: 2 sin(angle / 2)).
  # Pair (a, b): negatives of a: c sqrt2, d 2; of b: c 2 sin15, d sqrt3.  Pair (c, d): negatives of c: a sqrt2,
  # b 2 sin15; of d: a 2, b sqrt3 -- the same four distances. With margin 1, L = log(sum e^(1 - D)):
  #   J_ab = L + 1, J_cd = L + sqrt2 (both > 0); loss = (J_ab^2 + J_cd^2) / (2 * 2 pairs).
  unit_rows = rows(unit(0), unit(60), unit(90), unit(180))
  distances = [math.sqrt(2), 2.0, 2 * math.sin(math.radians(15)), SQRT3]
  shared = math.log(sum(math.exp(1 - d) for d in distances))
  loss, _ = run("lifted_structure", unit_rows, FOUR_LABELS)
  assert loss == pytest.approx(((shared + 1) ** 2 + (shared + math.sqrt(2)) ** 2) / 4, rel=1e-5)
  # Points on the x axis, x = [0, 0.5 | 5, 9]: distances 0-0.5: 0.5; 0-5: 5; 0-9: 9; 0.5-5: 4.5; 0.5-9: 8.5; 5-9: 4.
  # Both pairs share the negative distances 5, 9, 4.5, 8.5: L = log(e^-4 + e^-8 + e^-3.5 + e^-7.5) = -3.0078.
  #   J(0, 0.5) = L + 0.5 < 0 -> the hinge clips it to 0;  J(5, 9) = L + 4 = 0.9922 -> loss 0.9922^2 / 4.
  line = rows([0.0, 0.0], [0.5, 0.0], [5.0, 0.0], [9.0, 0.0])
  shared = math.log(math.exp(-4) + math.exp(-8) + math.exp(-3.5) + math.exp(-7.5))
  assert shared + 0.5 < 0 < shared + 4
  loss, _, (grad,) = evaluate("lifted_structure", line, FOUR_LABELS)
  assert loss == pytest.approx((shared + 4) ** 2 / 4, rel=1e-5)
  # Gradient: the clipped pair (0, 0.5) gives none; x0 and x1 move only through L inside J(5, 9).
  # L's terms are e^(1 - D) for D = 5 - x0, 9 - x0, 5 - x1, 9 - x1, so dL/dx0 = softmax weight of the first
  # two terms and dL/dx1 that of the last two; d loss / d J(5, 9) = 2 J(5, 9) / 4.
  weights = np.exp(-np.asarray([4.0, 8.0, 3.5, 7.5]))
  softmax = weights / weights.sum()
  scale = 2 * (shared + 4) / 4
  expected_x0 = scale * (softmax[0] + softmax[1])
  expected_x1 = scale * (softmax[2] + softmax[3])
  np.testing.assert_allclose(grad[:2, 0], [[expected_x0, 0.0], [expected_x1, 0.0]], rtol=1e-4, atol=1e-7)


def test_supcon_by_hand():
  # temperature 1/2: logits z_i.z_a / t are twice the cosines.
  #   a: positive b (1); others c (0), d (-2)      -> -log(e^1 / (e^1 + e^0 + e^-2)) = log(1 + e^-1 + e^-3)
  #   b: positive a (1); others c (sqrt3), d (-1)  -> log(1 + e^(sqrt3 - 1) + e^-2)
  #   c: positive d (0); others a (0), b (sqrt3)   -> log(2 + e^sqrt3)
  #   d: positive c (0); others a (-2), b (-1)     -> log(1 + e^-2 + e^-1)
  expected = np.mean([math.log(1 + math.exp(-1) + math.exp(-3)), math.log(1 + math.exp(SQRT3 - 1) + math.exp(-2)),
                      math.log(2 + math.exp(SQRT3)), math.log(1 + math.exp(-2) + math.exp(-1))])
  loss, _ = run("supcon", FOUR, FOUR_LABELS, temperature=0.5)
  assert loss == pytest.approx(expected, rel=1e-5)


def test_nt_xent_by_hand():
  # supervised=False: the views of one batch element are the positives; labels are ignored (all 7 here).
  # Elements (a, c) and (b, d), temperature 1/2:
  #   a: positive c (0); others b (1), d (-2)          -> log(e^1 + 1 + e^-2)
  #   c: positive a (0); others b (sqrt3), d (0)       -> log(2 + e^sqrt3)
  #   b: positive d (-1); others a (1), c (sqrt3)      -> log(e^-1 + e^1 + e^sqrt3) + 1
  #   d: positive b (-1); others a (-2), c (0)         -> log(e^-2 + e^-1 + 1) + 1
  # Mean 1.990; reading the labels (supervised, every other row a positive) would give 1.534.
  views = FOUR[[0, 2, 1, 3], 0].reshape(2, 2, 2)
  same = np.full((2, 2), 7, np.int32)
  expected = np.mean([math.log(math.e + 1 + math.exp(-2)), math.log(2 + math.exp(SQRT3)),
                      math.log(math.exp(-1) + math.e + math.exp(SQRT3)) + 1,
                      math.log(math.exp(-2) + math.exp(-1) + 1) + 1])
  loss, _ = run("supcon", views, same, temperature=0.5, supervised=False)
  assert loss == pytest.approx(expected, rel=1e-5)


# Proxy losses: proxies at 0 deg (norm 3), 90 deg and 180 deg (norm 2); a proxy's norm must not matter either.
PROXIES = np.asarray([unit(0, 3.0), unit(90), unit(180, 2.0)], np.float32)


def test_proxy_anchor_by_hand():
  # Rows x1 = 0 deg (class 0), x2 = 60 deg (class 0), x3 = 90 deg (class 1). Cosines to proxies 0, 1, 2:
  #   x1: 1, 0, -1;   x2: 1/2, sqrt3/2, -1/2;   x3: 0, 1, 0.
  # alpha 4, margin 1/4. Positive term over the classes present (0, 1), exp(-4 (s - 1/4)):
  #   class 0: log(1 + e^-3 + e^-1);  class 1: log(1 + e^-3)                                   -> sum / 2
  # Negative term over all 3 proxies, exp(4 (s + 1/4)) for the rows not of that class:
  #   proxy 0: x3 (0) -> log(1 + e^1);  proxy 1: x1 (0), x2 (sqrt3/2) -> log(1 + e^1 + e^(2 sqrt3 + 1));
  #   proxy 2: x1, x2, x3 (-1, -1/2, 0) -> log(1 + e^-3 + e^-1 + e^1)                          -> sum / 3
  embeddings = rows(unit(0, 2.0), unit(60), unit(90, 0.5))
  labels = column(0, 0, 1)
  positive = (math.log(1 + math.exp(-3) + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2
  negative = (math.log(1 + math.e) + math.log(1 + math.e + math.exp(2 * SQRT3 + 1))
              + math.log(1 + math.exp(-3) + math.exp(-1) + math.e)) / 3
  loss, _ = run("proxy_anchor", embeddings, labels, PROXIES, alpha=4.0, margin=0.25)
  assert loss == pytest.approx(positive + negative, rel=1e-5)


# Rows for the softmax proxy losses: x1 = 60 deg (class 0), x2 = 180 deg (class 0), x3 = 90 deg (class 1).
# Cosines to proxies 0, 1, 2:  x1: 1/2, sqrt3/2, -1/2;  x2: -1, 0, 1;  x3: 0, 1, 0.
# Accuracy (argmax of plain cosines): x1 -> 1 (wrong), x2 -> 2 (wrong), x3 -> 1 (right) = 1/3.
SOFTMAX_ROWS = rows(unit(60), unit(180, 4.0), unit(90))
SOFTMAX_LABELS = column(0, 0, 1)


def test_arcface_by_hand():
  # scale 2, margin 0.4 (scale 2 keeps all three rows visible in the mean: at 64, x3's cross-entropy is ~e^-55).
  # x1's theta_y = pi/3 -> target cos(pi/3 + 0.4). x2's theta_y = pi > pi - 0.4 (cos -1 <= cos(pi - 0.4)), so
  # insightface's fallback: -1 - 0.4 sin(pi - 0.4) = -1 - 0.4 sin 0.4. x3's theta_y = 0 -> cos 0.4, at the
  # point where d sin(theta) / d cos(theta) is infinite: the gradient must still be finite.
  expected = np.mean([cross_entropy([2 * math.cos(math.pi / 3 + 0.4), SQRT3, -1.0], 0),
                      cross_entropy([2 * (-1 - 0.4 * math.sin(0.4)), 0.0, 2.0], 0),
                      cross_entropy([0.0, 2 * math.cos(0.4), 0.0], 1)])
  loss, metrics, grads = evaluate("arcface", SOFTMAX_ROWS, SOFTMAX_LABELS, PROXIES, scale=2.0, margin=0.4)
  assert loss == pytest.approx(expected, rel=1e-5)
  assert metrics["accuracy"] == pytest.approx(1 / 3)
  for grad in grads:
    assert np.all(np.isfinite(grad))


def test_cosface_by_hand():
  # scale 2, margin 0.25 off the target cosine: x1: 1/2 - 0.25 = 0.25; x2: -1.25; x3: 0.75.
  expected = np.mean([cross_entropy([0.5, SQRT3, -1.0], 0), cross_entropy([-2.5, 0.0, 2.0], 0),
                      cross_entropy([0.0, 1.5, 0.0], 1)])
  loss, metrics = run("cosface", SOFTMAX_ROWS, SOFTMAX_LABELS, PROXIES, scale=2.0, margin=0.25)
  assert loss == pytest.approx(expected, rel=1e-5)
  assert metrics["accuracy"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------
# Random batches against the loop references. Every batch, random or edge case, is [6, 2, 8] with 12 proxies,
# so each loss compiles once per option set: the losses flatten the rows, so pairs of rows hold any labels.

NUM_CLASSES = 12


def random_batch(seed: int, layout: str):
  """Embeddings [6, 2, 8] with uneven row norms, labels [6, 2] and proxies [12, 8].

  m_per_class: 4 classes x 3 rows, shuffled. mixed: row 0 the only one of class 5, the others drawn from
  0..4, so classes have 1 to several rows. Most proxies have no row in the batch.
  """
  rng = np.random.default_rng(seed)
  points = rng.normal(size=(12, 8)) * rng.uniform(0.5, 3.0, size=(12, 1))
  if layout == "m_per_class":
    labels = rng.permutation(np.repeat(rng.choice(6, 4, replace=False), 3))
  else:
    labels = rng.integers(0, 5, size=12)
    labels[0] = 5
  proxies = rng.normal(size=(NUM_CLASSES, 8))
  return (points.reshape(6, 2, 8).astype(np.float32), labels.reshape(6, 2).astype(np.int32),
          proxies.astype(np.float32))


NON_DEFAULT = {
    "multi_similarity": [{"mining": False}, {"alpha": 3.0, "beta": 20.0, "base": 0.2, "epsilon": 0.3}],
    "circle": [{"margin": 0.4, "gamma": 80.0}],
    "lifted_structure": [{"margin": 3.0}],
    "supcon": [{"supervised": False}],  # NT-Xent: the 2 rows of each batch element are views of one image
    "proxy_anchor": [],  # the hand-worked tests set these losses' options
    "arcface": [],
    "cosface": [],
}
CASES = [(name, options) for name in NEW_LOSSES for options in [{}] + NON_DEFAULT[name]]


def case_id(name: str, options: dict) -> str:
  return "-".join([name, *(f"{key}={value}" for key, value in options.items())])


@pytest.mark.parametrize("layout", ["m_per_class", "mixed"])
@pytest.mark.parametrize("name,options", CASES, ids=[case_id(*case) for case in CASES])
def test_matches_loop_reference(name, options, layout):
  for seed in range(3):
    embeddings, labels, proxies = random_batch(seed, layout)
    proxies = proxies if name in PROXY else None
    loss, metrics = run(name, embeddings, labels, proxies, **options)
    expected, expected_metrics = reference(name, embeddings, labels, proxies, **options)
    assert expected > 1e-3, "the batch must exercise the loss, not its empty case"
    assert loss == pytest.approx(expected, rel=1e-5), f"seed {seed}"
    if layout == "m_per_class":  # every anchor has a positive: no doubt about a fraction's denominator
      for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), f"seed {seed}: {key}"


def test_multi_similarity_mining_keeps_some_pairs_on_random_batches():
  """The reference comparison above is only informative if mining drops some pairs and keeps others."""
  for options in ({}, NON_DEFAULT["multi_similarity"][1]):
    _, metrics = reference("multi_similarity", *random_batch(0, "m_per_class")[:2], **options)
    assert 0 < metrics["mined_positive_fraction"] < 1 and 0 < metrics["mined_negative_fraction"] < 1


# ------------------------------------------------------------------------------------------------
# Edge cases: batches a training run can produce. Every loss and gradient must be finite (a NaN would
# poison the parameters) and equal the defined value: the reference's, and a closed form where there is one.

EDGE_CASES = {name: (name, {}) for name in NEW_LOSSES} | {
    "multi_similarity-no_mining": ("multi_similarity", {"mining": False}),
    "nt_xent": ("supcon", {"supervised": False}),
}
PAIRED = np.repeat(np.arange(6, dtype=np.int32), 2).reshape(6, 2)  # 6 classes, the 2 rows of each element


def edge_batch(kind: str):
  """[6, 2, 8] embeddings, [6, 2] labels and [12, 8] proxies."""
  rng = np.random.default_rng(7)
  proxies = rng.normal(size=(NUM_CLASSES, 8)).astype(np.float32)
  points = rng.normal(size=(6, 2, 8)).astype(np.float32)
  if kind == "distinct_labels":  # no positive pair anywhere
    return points, np.arange(12, dtype=np.int32).reshape(6, 2), proxies
  if kind == "one_class":  # no negative anywhere
    return points, np.full((6, 2), 4, np.int32), proxies
  if kind == "all_equal":  # every cosine 1, every distance 0
    return np.tile(points[:1, :1], (6, 2, 1)), PAIRED, proxies
  assert kind == "all_zero"  # every cosine 0 (the normalisation of 0 is 0), every distance 0
  return np.zeros_like(points), PAIRED, proxies


# Closed forms. With labels PAIRED each of the 12 rows has 1 positive and 10 negatives.
#   multi_similarity, S = 1: 1/2 log(1 + e^(-2 * 1/2)) + 1/50 log(1 + 10 e^(50 * 1/2)) (mining keeps every pair:
#     all cosines are equal, within epsilon); S = 0: 1/2 log(1 + e^1) + 1/50 log(1 + 10 e^-25). Same unmined.
#   circle, s = 1: positive logit -256 * 1/4 * 1/4 = -16, negative 256 * 5/4 * 3/4 = 240;
#           s = 0: positive -256 * 5/4 * (-3/4) = 240, negative 256 * 1/4 * (-1/4) = -16;
#     both: softplus(log 10 + 240 - 16) = softplus(224 + log 10).
#   lifted_structure, D = 0: J = log(20 e^1) = 1 + log 20 for each of the 6 pairs -> J^2 / 2.
#   supcon and NT-Xent: every logit equal -> log(1/11) for each positive -> log 11.
#   proxy_anchor, s = 0 (C = 12, classes 0..5 present with 2 rows): positive log(1 + 2 e^3.2) per present
#     class; negative log(1 + 10 e^3.2) for proxies 0..5 and log(1 + 12 e^3.2) for 6..11.
#   arcface, cos = 0: target cos(pi/2 + 1/2) = -sin(1/2), the 11 others 0 -> log(1 + 11 e^(64 sin(1/2))).
#   cosface, cos = 0: target -0.35 * 64 -> log(1 + 11 e^(64 * 0.35)).
# A batch without positives (or, for circle and lifted, without negatives) gives 0, as does
# multi_similarity's mining on one class (no negative, so no positive is kept either).
MS_EQUAL = 0.5 * math.log1p(math.exp(-1)) + math.log(1 + 10 * math.exp(25)) / 50
MS_ZERO = 0.5 * math.log1p(math.e) + math.log(1 + 10 * math.exp(-25)) / 50
CLOSED_FORMS = {
    ("multi_similarity", "all_equal"): MS_EQUAL,
    ("multi_similarity", "all_zero"): MS_ZERO,
    ("multi_similarity", "distinct_labels"): 0.0,
    ("multi_similarity", "one_class"): 0.0,
    ("multi_similarity-no_mining", "all_equal"): MS_EQUAL,
    ("multi_similarity-no_mining", "all_zero"): MS_ZERO,
    ("multi_similarity-no_mining", "distinct_labels"): 0.0,
    ("circle", "all_equal"): 224 + math.log(10),
    ("circle", "all_zero"): 224 + math.log(10),
    ("circle", "distinct_labels"): 0.0,
    ("circle", "one_class"): 0.0,
    ("lifted_structure", "all_equal"): (1 + math.log(20)) ** 2 / 2,
    ("lifted_structure", "all_zero"): (1 + math.log(20)) ** 2 / 2,
    ("lifted_structure", "distinct_labels"): 0.0,
    ("lifted_structure", "one_class"): 0.0,
    ("supcon", "all_equal"): math.log(11),
    ("supcon", "all_zero"): math.log(11),
    ("supcon", "distinct_labels"): 0.0,
    ("nt_xent", "all_equal"): math.log(11),
    ("nt_xent", "all_zero"): math.log(11),
    ("proxy_anchor", "all_zero"): math.log(1 + 2 * math.exp(3.2)) + (
        math.log(1 + 10 * math.exp(3.2)) + math.log(1 + 12 * math.exp(3.2))) / 2,
    ("arcface", "all_zero"): math.log(1 + 11 * math.exp(64 * math.sin(0.5))),
    ("cosface", "all_zero"): math.log(1 + 11 * math.exp(64 * 0.35)),
}


@pytest.mark.parametrize("kind", ["distinct_labels", "one_class", "all_equal", "all_zero"])
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_are_finite_and_defined(case, kind):
  name, options = EDGE_CASES[case]
  embeddings, labels, proxies = edge_batch(kind)
  proxies = proxies if name in PROXY else None
  loss, metrics, grads = evaluate(name, embeddings, labels, proxies, **options)
  assert math.isfinite(loss) and all(math.isfinite(value) for value in metrics.values()), (loss, metrics)
  for grad in grads:
    assert np.all(np.isfinite(grad))
  expected = reference(name, embeddings, labels, proxies, **options)[0]
  if (case, kind) in CLOSED_FORMS:
    assert expected == pytest.approx(CLOSED_FORMS[case, kind], rel=1e-9, abs=1e-12)  # the reference agrees
  assert loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_multi_similarity_one_class_without_mining_keeps_the_positive_term():
  # All 12 rows of one class, no mining: each anchor has 11 positives and no negative, so its loss is the
  # positive term alone, 1/2 log(1 + sum_p e^(-2 (S_ip - 1/2))) > 0 (with mining nothing would be kept).
  embeddings, labels, _ = edge_batch("one_class")
  loss, _ = run("multi_similarity", embeddings, labels, mining=False)
  assert loss > 0.1


# ------------------------------------------------------------------------------------------------
# Gradients against central differences of the float64 references, on the random batches above.


def directional_derivatives(f, x: np.ndarray, directions: np.ndarray, step: float = 1e-6) -> np.ndarray:
  """Central differences of f along each direction: a gradient check touching every coordinate at once."""
  return np.asarray([(f(x + step * v) - f(x - step * v)) / (2 * step) for v in directions])


@pytest.mark.parametrize("case", EDGE_CASES)
def test_gradient_matches_finite_differences(case):
  name, options = EDGE_CASES[case]
  embeddings, labels, proxies = random_batch(5, "mixed")
  proxies = proxies if name in PROXY else None
  grads = gradients(name, embeddings, labels, proxies, **options)
  base = embeddings.astype(np.float64)
  if name == "circle":  # alpha_p, alpha_n are constants to the gradient (the paper's section 3.2, stop_gradient)
    options = {**options, "frozen": base.reshape(12, 8)}
  functions = [lambda e: reference(name, e, labels, proxies, **options)[0]]
  points = [base]
  if proxies is not None:
    functions.append(lambda p: reference(name, embeddings, labels, p, **options)[0])
    points.append(proxies.astype(np.float64))
  rng = np.random.default_rng(0)
  for grad, f, point in zip(grads, functions, points, strict=True):
    directions = rng.normal(size=(4, *point.shape))
    want = directional_derivatives(f, point, directions)
    got = np.tensordot(directions, grad.astype(np.float64), axes=grad.ndim)
    scale = np.linalg.norm(grad) * np.linalg.norm(directions[0])
    assert scale > 1e-3
    np.testing.assert_allclose(got, want, atol=2e-3 * scale)


# ------------------------------------------------------------------------------------------------
# The registry and the options. (Every call above is jitted, as in the train step.)


def test_registry_defaults_and_proxies():
  assert set(NEW_LOSSES) <= set(losses.LOSSES)
  assert set(losses.PROXY_LOSSES) == set(PROXY)
  for name in NEW_LOSSES:
    assert losses.loss_option_defaults(name) == DEFAULTS[name], name
    losses.validate_loss_options(name, DEFAULTS[name])  # the defaults themselves are valid options
  for name in PROXY:
    inputs = [p.name for p in inspect.signature(losses.get_loss(name)).parameters.values()
              if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert inputs == ["embeddings", "labels", "proxies"], name


def test_validation_rejects_bad_option_names():
  typos = {"multi_similarity": "alpah", "circle": "gama", "lifted_structure": "margn", "supcon": "temprature",
           "proxy_anchor": "delta", "arcface": "s", "cosface": "m"}
  for name, typo in typos.items():
    valid = ", ".join(sorted(DEFAULTS[name]))
    with pytest.raises(UserError, match=f"'{name}' has no option '{typo}'; valid options: {valid}"):
      losses.validate_loss_options(name, {typo: 1.0})
  with pytest.raises(UserError, match="margin"):
    losses.validate_loss_options("circle", {"margin": -0.25})
  # multi_similarity's mining is a switch, not one of the triplet loss's mining modes.
  losses.validate_loss_options("multi_similarity", {"mining": False})


def test_init_loss_params():
  for name in PROXY:
    proxies = losses.init_loss_params(name, {}, num_classes=5, embedding_dim=3, key=jax.random.key(0))
    assert proxies.shape == (5, 3), name
    assert np.all(np.isfinite(np.asarray(proxies)))
    # Distinct directions: equal proxies would make every class's logit the same from the first step.
    normalized = np.asarray(proxies) / np.linalg.norm(np.asarray(proxies), axis=1, keepdims=True)
    assert np.max(np.abs(normalized @ normalized.T - np.eye(5))) < 0.999
    again = losses.init_loss_params(name, {}, num_classes=5, embedding_dim=3, key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(proxies), np.asarray(again))  # a function of the key
  for name in IN_BATCH + ("triplet", "contrastive"):
    assert losses.init_loss_params(name, {}, num_classes=5, embedding_dim=3, key=jax.random.key(0)) is None
