"""UL2's Mixture-of-Denoisers: the denoiser specs, their span maths, the seqio preprocessor.

Tokenised documents become examples, each made by one denoiser drawn with the
mixture's weights from a window of raw tokens:

  span corruption (R, X)  inputs  = [mode] kept <extra_id_0> kept <extra_id_1> kept [EOS]
                          targets = <extra_id_0> span_0 <extra_id_1> span_1 [EOS]
  prefix LM (S)           inputs  = [mode] prefix [EOS]
                          targets = suffix [EOS]

The module has four layers, each usable on its own:

* `Denoiser`, `UL2_DENOISERS`: frozen specs; gin builds them (see
  gin/experiments/custom_mixture.gin).
* Kinds (`Kind`, `SpanCorruption`, `PrefixLM`, registered in `KINDS`): what a kind
  of denoiser does, in one class each: which fields it takes, its window budget
  (pure Python, in the manner of T5's `random_spans_helper`) and its layout (where
  the noise spans of a batch of windows go, in TensorFlow). A new kind (say suffix
  infilling, or a prefix plus spans) is one more subclass in `KINDS`; the shared
  machinery below turns any layout into inputs and targets.
* `make_plan(...)`: budgets for every denoiser of a mixture at the feature lengths,
  checked before any graph is built (a `ValueError` names the denoiser and numbers).
* The TensorFlow maths, vectorised over a batch (no per-example Python, maps or
  while loops): `random_composition`, `span_layout`, `noise_mask_from_spans`,
  `denoise_batch`, the windows (`merged_windows`, `chunk_documents`) and
  `random_bits`; `mixture_of_denoisers(...)` is the seqio preprocessor built on them.

Policies (each tested in tests/test_denoisers.py):

* Windows, as UL2's `ul2_objective` and T5's `span_corruption` cut them: by default
  (`merge_documents=True`) a batch of 512 documents is joined into one token stream
  (T5's `reduce_concat_tokens`; no separator unless `document_separator` is given)
  and cut in order into windows (T5's `split_tokens`), each window as long as the
  budget of the denoiser it draws. So every example fills its lengths and spans keep
  their mean even where documents are short, except the last window of each batch,
  which takes what is left. With `merge_documents=False` each document is its own
  stream: a long one is cut into near-equal chunks of at most the largest window,
  a denoiser whose window is smaller takes a window at a random offset inside the
  chunk, and a short one makes a shorter example with the same recipe on fewer
  tokens (packing then fills the rows), so spans get shorter than mu there.
* Noise masks. A window of m tokens gets M = round(m * r) noise tokens (at least 1
  and, for m >= 2, at most m - 1) in k spans, k = M / mu stochastically rounded (so
  the expected k is exactly M / mu, which keeps the realised mean span length at mu
  even when M / mu is small: X3 at 512/512 has 90 noise tokens, so 1 or 2 spans, not
  always 1 span of 90). As in T5's `random_spans_noise_mask`, the noise tokens are cut
  into k non-empty spans and the kept tokens into gaps, interleaved gap, span, gap,
  ..., span, gap; the cut points are sorted uniform draws (exponential spacings, so
  nothing is sorted and the work is per span, not per token). Unlike T5 the first and
  last gaps may be empty: spans may start or end the window, and a single span (X3)
  sits at a uniformly random offset instead of always being the suffix.
* Sentinels. Span i becomes `<extra_id_i>` = vocab_size - 1 - i in the inputs and
  precedes its tokens in the targets. The number of spans in one example is capped at
  the number of sentinels (the vocabulary's extra ids): a denoiser that would need
  more (X1 at 512: ~128 spans of 3 for 100 sentinels) keeps its corruption rate and
  gets longer spans (X1 at 512/512: 100 spans of 4.1 on average). A sentinel is never
  an ordinary vocabulary id. `budget()` reports when the cap binds.
* S (prefix LM) takes windows of min(inputs - mode - 1, targets - 1) + 1 tokens (511
  at 512/512, as T5's `prefix_lm` takes a targets-length window) and splits after a
  uniform 1..m-1 tokens, so every split point fits both sides.
* Mode tokens are single ids when the vocabulary has the piece (`[NLU]`, `[NLG]`,
  `[S2S]` in the bundled one); otherwise their encoding, and the budgets count all of
  its ids. `mode_token=None` puts none.
* Short windows (a short document, or the last window of a batch) use the same
  recipe on fewer tokens. A 1-token window still makes a valid example: span
  corruption corrupts the token (inputs [mode, <extra_id_0>, EOS], targets
  [<extra_id_0>, token, EOS]); S puts it in the targets (inputs [mode, EOS]). No
  tokens make no example.
* Randomness. The preprocessor batches documents and takes one seed per batch from
  seqio (`map_over_dataset(num_seeds=1)`, so `seqio.map_seed_manager` / a Task's seed
  makes it deterministic); each window then has its own counter-based stream
  (SplitMix64 keyed by that seed and the window's place in the batch), which also
  draws its denoiser. Same seed and same input order: identical examples.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

SPAN_CORRUPTION = "span_corruption"
PREFIX_LM = "prefix_lm"
NLU, NLG, S2S = "[NLU]", "[NLG]", "[S2S]"
_log = logging.getLogger(__name__)

# Documents per vectorised step (and per seqio seed) inside the preprocessor; with
# merged documents, also the documents joined into one stream (T5's
# `reduce_concat_tokens` joins 128; more here amortises the per-step work).
_BATCH = 512
_NUM_UNIFORMS = 4  # denoiser choice, window offset, then two for the kind's layout


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One denoiser of a mixture.

  Attributes:
    name: short label, e.g. "R1"; reported per denoiser by the trainer.
    kind: a key of `KINDS`: "span_corruption" (R- and X-denoisers) or "prefix_lm"
      (the S-denoiser).
    mean_span_length: mu, the mean length of a noise span (span corruption only).
    corruption_rate: r, the fraction of a window's tokens that are noise (span
      corruption only).
    mode_token: the paradigm token prepended to the inputs ("[NLU]", "[NLG]",
      "[S2S]"), or None for no mode token.
    weight: relative sampling weight in the mixture (normalised over the mixture).
  """
  name: str
  kind: str = SPAN_CORRUPTION
  mean_span_length: float | None = None
  corruption_rate: float | None = None
  mode_token: str | None = None
  weight: float = 1.0

  def __post_init__(self):
    if not self.name:
      raise ValueError("a denoiser needs a non-empty name")
    if self.kind not in KINDS:
      raise ValueError(f"denoiser {self.name}: kind must be one of {tuple(KINDS)}, got "
                       f"{self.kind!r}")
    KINDS[self.kind].check(self)
    if not (math.isfinite(self.weight) and self.weight >= 0):
      raise ValueError(f"denoiser {self.name}: weight must be finite and >= 0, got {self.weight}")


# ---------------------------------------------------------------------------------
# Length maths (pure Python; the TF code below uses the same formulas in float64).


def num_noise_tokens(length: int, rate: float) -> int:
  """round(length * rate), half up, kept in [1, length - 1] (a 1-token window: 1)."""
  return min(max(math.floor(length * rate + 0.5), 1), max(length - 1, 1))


def max_num_spans(num_noise: int, num_nonnoise: int, mean_span_length: float,
                  num_sentinels: int) -> int:
  """The most spans one example can get: ceil(M / mu), capped by the sentinels.

  Also at most M (spans are non-empty) and N + 1 (gaps between spans are non-empty).
  """
  return max(1, min(math.ceil(num_noise / mean_span_length), num_noise, num_nonnoise + 1,
                    num_sentinels))


@dataclasses.dataclass(frozen=True)
class Budget:
  """What one denoiser makes of the feature lengths.

  Attributes:
    denoiser: the denoiser.
    window: raw tokens one example takes at most (inputs and targets then fit).
    inputs_length: the longest inputs it makes (mode token and EOS included).
    targets_length: the longest targets it makes (EOS included).
    noise_tokens: noise tokens in a full window (0 for prefix LM).
    max_spans: spans (sentinels) in a full window at most (0 for prefix LM).
    sentinel_capped: whether the sentinel cap lowers the span count of a full window.
  """
  denoiser: Denoiser
  window: int
  inputs_length: int
  targets_length: int
  noise_tokens: int = 0
  max_spans: int = 0
  sentinel_capped: bool = False


@dataclasses.dataclass(frozen=True)
class Anatomy:
  """What one example holds, read back from its ids (any kind: the layouts share a form).

  Attributes:
    window: raw tokens the example was made from.
    noise: of them, the tokens moved to the targets.
    spans: sentinels (0 for prefix LM).
  """
  window: int
  noise: int
  spans: int

  @classmethod
  def of(cls, inputs: Sequence[int], targets: Sequence[int], *, mode_length: int,
         first_sentinel: int) -> Anatomy:
    spans = sum(1 for t in inputs if t >= first_sentinel)
    noise = len(targets) - spans - 1
    return cls(len(inputs) - mode_length - spans - 1 + noise, noise, spans)


# ---------------------------------------------------------------------------------
# TensorFlow span maths, vectorised over a batch. b: batch, c: chunk (window) length,
# k: spans (at most plan.max_spans).


def _uniform(bits: tf.Tensor) -> tf.Tensor:
  """int32 random bits -> float64 uniform in (0, 1] (24 bits of resolution)."""
  return (tf.cast(tf.bitwise.bitwise_and(bits, 0xFFFFFF), tf.float64) + 1.0) / float(1 << 24)


def random_composition(total: tf.Tensor, parts: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  """Splits `total` into `parts` non-negative integers at random (a weak composition).

  The parts - 1 cut points are sorted independent uniform draws from 0..total (made
  sorted by exponential spacings, so nothing is sorted), so each cut is uniform and a
  single cut (two parts) is exactly uniform over 0..total.

  Args:
    total: int32 [b] >= 0; parts: int32 [b], 1 <= parts <= p; bits: int32 [b, p].
  Returns:
    int32 [b, p]: the parts, 0 from index `parts` on; each row sums to `total`.
  """
  p = tf.shape(bits)[1]
  index = tf.range(p)[tf.newaxis, :]
  used = index < parts[:, tf.newaxis]
  spacing = tf.where(used, -tf.math.log(tf.cast(_uniform(bits), tf.float32)), 0.0)
  running = tf.cumsum(spacing, axis=1)
  fraction = tf.math.divide_no_nan(running, running[:, -1:])  # Sorted uniforms in [0, 1].
  cut = tf.cast(tf.cast(total + 1, tf.float32)[:, tf.newaxis] * fraction, tf.int32)  # floor
  cut = tf.where(index < parts[:, tf.newaxis] - 1, tf.minimum(cut, total[:, tf.newaxis]),
                 total[:, tf.newaxis])
  return tf.where(used, cut - tf.pad(cut[:, :-1], [[0, 0], [1, 0]]), 0)


def span_layout(num_noise: tf.Tensor, num_nonnoise: tf.Tensor, num_spans: tf.Tensor,
                bits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Where the noise spans go: start and length of each span, in window positions.

  The noise tokens are cut into num_spans non-empty spans and the kept tokens into
  num_spans + 1 gaps of which the inner ones are non-empty, interleaved as
  gap, span, gap, ..., span, gap (T5's `random_spans_noise_mask`, except that the
  first and last gaps may be empty, so a span may start the window and a single span
  sits at a uniformly random offset instead of always at the end).

  Args:
    num_noise, num_nonnoise, num_spans: int32 [b]; where num_spans > 0, need
      num_spans <= num_noise and num_spans <= num_nonnoise + 1.
    bits: int32 [b, 2k + 1] random bits, k >= max(num_spans).
  Returns:
    (start, length): int32 [b, k], zero from index num_spans on.
  """
  k = (tf.shape(bits)[1] - 1) // 2
  has = num_spans > 0
  spans = tf.maximum(num_spans, 1)
  # Span lengths: 1 + a weak composition of the remaining noise tokens.
  extra_noise = tf.where(has, num_noise - spans, 0)
  length = 1 + random_composition(extra_noise, spans, bits[:, :k])
  length = tf.where(tf.range(k)[tf.newaxis, :] < num_spans[:, tf.newaxis], length, 0)
  # Gap lengths: inner gaps 1 + a share, outer gaps just a share.
  extra_kept = tf.where(has, num_nonnoise - (spans - 1), 0)
  gap = random_composition(extra_kept, spans + 1, bits[:, k:])  # [b, k + 1]
  inner = (tf.range(k + 1)[tf.newaxis, :] >= 1) & (
      tf.range(k + 1)[tf.newaxis, :] < spans[:, tf.newaxis])
  gap += tf.cast(inner, tf.int32)
  start = tf.cumsum(gap[:, :k], axis=1) + tf.cumsum(length, axis=1, exclusive=True)
  return tf.where(length > 0, start, 0), length


def _scatter_rows(values: tf.Tensor, columns: tf.Tensor, width: int) -> tf.Tensor:
  """int32 [b, width] with values [b, k] added at columns [b, k] (zeros add nothing)."""
  b = tf.shape(values)[0]
  flat = tf.range(b)[:, tf.newaxis] * width + tf.clip_by_value(columns, 0, width - 1)
  return tf.reshape(tf.math.unsorted_segment_sum(values, flat, b * width), [b, width])


_BLOCK = 16
_UPPER_ONES = [[float(i <= j) for j in range(_BLOCK)] for i in range(_BLOCK)]


def _row_cumsum(x: tf.Tensor) -> tf.Tensor:
  """tf.cumsum(x, axis=1) for small int32 values (|sums| < 2**24), several times faster.

  Blocks of 16 are summed with a matmul by a triangle of ones, then the block totals
  are carried across with a short cumsum; float32 is exact for these integers.
  """
  b, w = tf.shape(x)[0], x.shape[1]
  padded = -(-w // _BLOCK) * _BLOCK
  blocks = tf.reshape(tf.pad(tf.cast(x, tf.float32), [[0, 0], [0, padded - w]]),
                      [b, padded // _BLOCK, _BLOCK])
  within = tf.einsum("bnj,jk->bnk", blocks, tf.constant(_UPPER_ONES, tf.float32))
  carried = within + tf.cumsum(within[:, :, -1:], axis=1, exclusive=True)
  return tf.cast(tf.round(tf.reshape(carried, [b, padded])[:, :w]), tf.int32)


def noise_mask_from_spans(start: tf.Tensor, length: tf.Tensor, width: int) -> tf.Tensor:
  """bool [b, width]: True inside the spans [start, start + length) (length 0: none)."""
  on = tf.cast(length > 0, tf.int32)
  delta = _scatter_rows(tf.concat([on, -on], axis=1),
                        tf.concat([start, tf.minimum(start + length, width)], axis=1), width + 1)
  return _row_cumsum(delta)[:, :width] > 0


def _ragged_rows(values: tf.Tensor, keep: tf.Tensor) -> tf.RaggedTensor:
  """The kept values of each row, in order, as a RaggedTensor."""
  return tf.RaggedTensor.from_row_lengths(
      tf.boolean_mask(values, keep), tf.reduce_sum(tf.cast(keep, tf.int64), axis=1),
      validate=False)


# ---------------------------------------------------------------------------------
# Kinds of denoiser: one class each, registered in KINDS.


@dataclasses.dataclass(frozen=True)
class Rows:
  """A batch of windows as a kind's `layout` sees them.

  All rows of the batch are there; the machinery keeps the spans of this kind's rows
  only (the others' are zeroed), so a layout needs no masking of its own.

  Attributes:
    kind: the kind whose layout is called.
    length: int32 [b], tokens in each window (m >= 1).
    uniforms: float64 [b, 2], the kind's own draws in [0, 1).
    bits: int32 [b, 2k + 1], random bits for `span_layout`, k = max_spans.
    max_spans: k, the most spans any denoiser of the plan makes.
    denoiser: int32 [b], each row's denoiser (an index into `denoisers`).
    denoisers: the mixture.
  """
  kind: str
  length: tf.Tensor
  uniforms: tf.Tensor
  bits: tf.Tensor
  max_spans: int
  denoiser: tf.Tensor
  denoisers: tuple[Denoiser, ...]

  def param(self, field: Callable[[Denoiser], float], dtype: tf.DType) -> tf.Tensor:
    """[b]: `field` of each row's denoiser (0 for rows of other kinds)."""
    values = [field(d) if d.kind == self.kind else 0 for d in self.denoisers]
    return tf.gather(tf.constant(values, dtype), self.denoiser)


class Kind:
  """A kind of denoiser: the fields it takes, its window budget, its span layout.

  Every kind has the same example form: the noise spans of its layout leave the
  inputs for the targets; with `sentinels`, span i is replaced in the inputs by
  `<extra_id_i>`, which also precedes it in the targets. The mode token starts the
  inputs and EOS ends both (the machinery in `denoise_batch` does all of that).
  """
  sentinels: bool = True

  def check(self, d: Denoiser) -> None:
    """Raises ValueError, naming the denoiser, if its fields do not suit the kind."""
    raise NotImplementedError

  def budget(self, d: Denoiser, inputs_length: int, targets_length: int, *,
             num_sentinels: int, mode_length: int) -> Budget:
    """The largest window whose example fits the feature lengths; ValueError if none."""
    raise NotImplementedError

  def layout(self, rows: Rows) -> tuple[tf.Tensor, tf.Tensor]:
    """(start, length), int32 [b, j]: the noise spans in window positions, in order,
    non-overlapping, length 0 for none; at most `rows.max_spans` with sentinels."""
    raise NotImplementedError

  def fill(self, inputs: Sequence[int], targets: Sequence[int], b: Budget,
           lengths: Mapping[str, int], mode_length: int) -> float:
    """How much of the feature lengths one example fills (1: a full window)."""
    del b, mode_length
    return max(len(inputs) / lengths["inputs"], len(targets) / lengths["targets"])

  def describe(self, d: Denoiser, a: Anatomy) -> str:
    """One line on what the denoiser did to an example."""
    raise NotImplementedError


def _span_lengths(window: int, d: Denoiser, num_sentinels: int, mode_length: int):
  noise = num_noise_tokens(window, d.corruption_rate)
  nonnoise = window - noise
  spans = max_num_spans(noise, nonnoise, d.mean_span_length, num_sentinels)
  return mode_length + nonnoise + spans + 1, noise + spans + 1, noise, spans


class SpanCorruption(Kind):
  """R- and X-denoisers: spans of mean length mu covering a fraction r of the window."""

  def check(self, d):
    if d.mean_span_length is None or not d.mean_span_length >= 1:
      raise ValueError(f"denoiser {d.name}: mean_span_length must be >= 1, "
                       f"got {d.mean_span_length}")
    if d.corruption_rate is None or not 0 < d.corruption_rate < 1:
      raise ValueError(f"denoiser {d.name}: corruption_rate must be in (0, 1), "
                       f"got {d.corruption_rate}")

  def budget(self, d, inputs_length, targets_length, *, num_sentinels, mode_length):
    inputs, targets = inputs_length, targets_length
    where = f"denoiser {d.name}: inputs length {inputs}, targets length {targets}"
    if num_sentinels < 1:
      raise ValueError(f"denoiser {d.name}: span corruption needs sentinel ids, but the "
                       "vocabulary has no extra ids")
    window = 0
    while window < inputs + targets:
      i, t, _, _ = _span_lengths(window + 1, d, num_sentinels, mode_length)
      if i > inputs or t > targets:
        break
      window += 1
    if window < 2:
      raise ValueError(f"{where} cannot fit even a 2-token example (needs inputs >= "
                       f"{mode_length + 3}: mode, 1 kept token, 1 sentinel, EOS; targets "
                       ">= 3: sentinel, 1 noise token, EOS)")
    if window < d.mean_span_length:
      raise ValueError(f"{where} allow windows of at most {window} tokens, shorter than one "
                       f"mean span of {d.mean_span_length:g} tokens; raise the lengths or "
                       "drop the denoiser")
    i, t, noise, spans = _span_lengths(window, d, num_sentinels, mode_length)
    capped = math.ceil(noise / d.mean_span_length) > num_sentinels
    if noise < d.mean_span_length:
      _log.info("%s: a full window of %d tokens has %d noise tokens, fewer than one "
                "mean span of %g; its spans will be shorter.", where, window, noise,
                d.mean_span_length)
    if capped:
      _log.info("%s: %d spans capped at %d sentinels (mean span %.1f instead of %g).",
                where, math.ceil(noise / d.mean_span_length), num_sentinels,
                noise / spans, d.mean_span_length)
    return Budget(d, window, i, t, noise, spans, capped)

  def layout(self, rows):
    # The formulas of `num_noise_tokens` and `max_num_spans`, with k stochastically
    # rounded so that its expectation is exactly noise / mu.
    m = rows.length
    rate = rows.param(lambda d: d.corruption_rate, tf.float64)
    mean_span = rows.param(lambda d: d.mean_span_length, tf.float64)
    noise = tf.cast(tf.floor(tf.cast(m, tf.float64) * rate + 0.5), tf.int32)
    noise = tf.clip_by_value(noise, 1, tf.maximum(m - 1, 1))
    nonnoise = m - noise
    spans = tf.cast(tf.floor(tf.cast(noise, tf.float64) / tf.maximum(mean_span, 1.0) +
                             rows.uniforms[:, 0]), tf.int32)
    spans = tf.clip_by_value(spans, 1, tf.minimum(tf.minimum(noise, nonnoise + 1),
                                                  rows.max_spans))
    return span_layout(noise, nonnoise, spans, rows.bits)

  def describe(self, d, a):
    mode = f"mode {d.mode_token}" if d.mode_token else "no mode token"
    return (f"{d.name}  span corruption (mean span {d.mean_span_length:g}, rate "
            f"{d.corruption_rate:g}), {mode}: {a.noise} of {a.window} tokens "
            f"({a.noise / max(a.window, 1):.0%}) in {a.spans} span"
            f"{'' if a.spans == 1 else 's'} of {a.noise / max(a.spans, 1):.1f} on average")


class PrefixLM(Kind):
  """The S-denoiser: the window split at a uniform point, the suffix is the target."""
  sentinels = False

  def check(self, d):
    if d.mean_span_length is not None or d.corruption_rate is not None:
      raise ValueError(f"denoiser {d.name}: a prefix_lm denoiser takes no "
                       "mean_span_length or corruption_rate")

  def budget(self, d, inputs_length, targets_length, *, num_sentinels, mode_length):
    del num_sentinels
    prefix_room, suffix_room = inputs_length - mode_length - 1, targets_length - 1
    if prefix_room < 1 or suffix_room < 1:
      raise ValueError(f"denoiser {d.name}: inputs length {inputs_length}, targets length "
                       f"{targets_length} leave no room for a 1-token prefix and a 1-token "
                       f"target (needs inputs >= {mode_length + 2} with {mode_length} mode "
                       "token(s) and EOS, targets >= 2 with EOS)")
    window = min(prefix_room, suffix_room) + 1  # Every split point 1..window-1 fits.
    return Budget(d, window, mode_length + window, window)

  def layout(self, rows):
    m = rows.length  # Split after 1..m-1 tokens; a 1-token window is all target.
    split = 1 + tf.cast(tf.floor(rows.uniforms[:, 0] * tf.cast(m - 1, tf.float64)), tf.int32)
    split = tf.where(m >= 2, split, 0)
    return split[:, tf.newaxis], (m - split)[:, tf.newaxis]

  def fill(self, inputs, targets, b, lengths, mode_length):
    # Inputs and targets share the window: [mode] prefix EOS + suffix EOS.
    del lengths
    return (len(inputs) + len(targets)) / (mode_length + b.window + 2)

  def describe(self, d, a):
    mode = f"mode {d.mode_token}" if d.mode_token else "no mode token"
    return (f"{d.name}  prefix LM, {mode}: prefix {a.window - a.noise} tokens -> inputs, "
            f"the next {a.noise} -> targets")


# The kinds of denoiser, by `Denoiser.kind`. A new kind: one more entry.
KINDS: dict[str, Kind] = {SPAN_CORRUPTION: SpanCorruption(), PREFIX_LM: PrefixLM()}


def _span(name: str, mu: float, r: float, mode: str, weight: float) -> Denoiser:
  return Denoiser(name, SPAN_CORRUPTION, mu, r, mode, weight)


# The UL2 20B mixture (UL2 paper, section 3.1.2): R 40%, X 40%, S 20%, even inside groups.
UL2_DENOISERS: tuple[Denoiser, ...] = (
    _span("R1", 3, 0.15, NLU, 0.2),
    _span("R2", 8, 0.15, NLU, 0.2),
    _span("X1", 3, 0.5, NLG, 0.1),
    _span("X2", 8, 0.5, NLG, 0.1),
    _span("X3", 64, 0.15, NLG, 0.1),
    _span("X4", 64, 0.5, NLG, 0.1),
    Denoiser("S", PREFIX_LM, mode_token=S2S, weight=0.2),
)


def validate_mixture(denoisers: Sequence[Denoiser]) -> tuple[Denoiser, ...]:
  """Returns `denoisers` as a tuple after checking names and weights."""
  denoisers = tuple(denoisers)
  if not denoisers:
    raise ValueError("a mixture needs at least one denoiser")
  for d in denoisers:
    if not isinstance(d, Denoiser):
      raise ValueError(f"expected ul2.denoisers.Denoiser, got {d!r}")
  names = [d.name for d in denoisers]
  if len(set(names)) != len(names):
    raise ValueError(f"denoiser names must be unique, got {names}")
  if not sum(d.weight for d in denoisers) > 0:
    raise ValueError(f"the weights of {names} sum to 0")
  return denoisers


# ---------------------------------------------------------------------------------
# The plan: everything the graph needs, computed in Python before any graph exists.


@functools.lru_cache(maxsize=None)  # Pure; also logs each warning once.
def budget(denoiser: Denoiser, inputs_length: int, targets_length: int, *,
           num_sentinels: int, mode_length: int = 1) -> Budget:
  """The largest window of raw tokens whose example fits the feature lengths.

  Like T5's `random_spans_helper`, but it counts the mode token (`mode_length`
  ids), EOS on both sides and the worst case of the stochastic span count, and it
  caps the spans at `num_sentinels`. Every window up to the returned one fits too
  (the lengths grow monotonically with the window).

  Raises:
    ValueError: the denoiser cannot fit the lengths: not even a 2-token example, or
      a window shorter than one mean span, or span corruption with no sentinels.
  """
  return KINDS[denoiser.kind].budget(denoiser, inputs_length, targets_length,
                                     num_sentinels=num_sentinels, mode_length=mode_length)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The denoisers, their budgets and the vocabulary facts one pipeline needs."""
  denoisers: tuple[Denoiser, ...]
  budgets: tuple[Budget, ...]
  mode_ids: tuple[tuple[int, ...], ...]
  vocab_size: int
  num_sentinels: int
  eos_id: int

  @property
  def chunk_length(self) -> int:
    """The largest window: no example takes more raw tokens."""
    return max(b.window for b in self.budgets)

  @property
  def kinds(self) -> tuple[str, ...]:
    """The kinds the mixture uses, in `KINDS` order."""
    return tuple(k for k in KINDS if any(d.kind == k for d in self.denoisers))

  @property
  def max_spans(self) -> int:
    """The most spans (sentinels) any denoiser puts in one example."""
    return max(b.max_spans for b in self.budgets)

  @property
  def random_width(self) -> int:
    """Random int32 values one example consumes: 4 uniforms, then span and gap shares."""
    return _NUM_UNIFORMS + 2 * self.max_spans + 1


def mode_token_ids(vocabulary: seqio.Vocabulary, mode_token: str | None) -> tuple[int, ...]:
  """The ids of a mode token: its own piece if the vocabulary has one, else its encoding."""
  if not mode_token:
    return ()
  tokenizer = getattr(vocabulary, "tokenizer", None)
  if tokenizer is not None:
    piece_id = tokenizer.piece_to_id(mode_token)
    if piece_id != tokenizer.unk_id() and tokenizer.id_to_piece(piece_id) == mode_token:
      return (piece_id,)
  return tuple(vocabulary.encode(mode_token))


def make_plan(denoisers: Sequence[Denoiser], sequence_length: Mapping[str, int] | None,
              vocabulary: seqio.Vocabulary) -> Plan:
  """Validates the mixture against the feature lengths; raises ValueError early."""
  denoisers = validate_mixture(denoisers)
  if not sequence_length or not sequence_length.get("inputs") or not sequence_length.get(
      "targets"):
    raise ValueError("UL2 denoisers need feature lengths for 'inputs' and 'targets', got "
                     f"{sequence_length!r}")
  num_sentinels = vocabulary.extra_ids
  mode_ids = tuple(mode_token_ids(vocabulary, d.mode_token) for d in denoisers)
  budgets = tuple(
      budget(d, int(sequence_length["inputs"]), int(sequence_length["targets"]),
             num_sentinels=num_sentinels, mode_length=len(m))
      for d, m in zip(denoisers, mode_ids))
  return Plan(denoisers, budgets, mode_ids, vocabulary.vocab_size, num_sentinels,
              vocabulary.eos_id)


# ---------------------------------------------------------------------------------
# The shared machinery: windows -> examples, whatever the kinds.


def choose_denoiser(uniform: tf.Tensor, plan: Plan) -> tf.Tensor:
  """int32 [b]: the first denoiser whose cumulative weight reaches the uniform (0, 1]."""
  weights = [d.weight for d in plan.denoisers]
  cumulative = [sum(weights[:i + 1]) / sum(weights) for i in range(len(weights))]
  return tf.searchsorted(tf.constant(cumulative[:-1], tf.float64), uniform, side="left",
                         out_type=tf.int32)


def denoise_batch(tokens: tf.Tensor, length: tf.Tensor, bits: tf.Tensor,
                  plan: Plan) -> dict[str, tf.Tensor | tf.RaggedTensor]:
  """Makes a batch of examples, each with the denoiser its random bits choose.

  Args:
    tokens: int32 [b, c] windows or chunks of documents (c = plan.chunk_length), zero
      padded.
    length: int32 [b] tokens per row, 1 <= length <= c. A row longer than its
      denoiser's window gives a window at a random offset.
    bits: int32 [b, plan.random_width] random bits, e.g. from `random_bits(...)`.
    plan: from `make_plan`.

  Returns:
    {"inputs": ragged int32 [b, None], "targets": ragged int32 [b, None],
     "denoiser": int32 [b]} with the mode token and EOS in place.
  """
  c, k, eos_id = plan.chunk_length, plan.max_spans, plan.eos_id
  longest_mode = max(len(ids) for ids in plan.mode_ids)
  # Columns: [mode token slots | the chunk | one more], so there is always a column
  # before the window (for a targets sentinel) and one after it (for EOS).
  p = max(1, longest_mode)
  width = p + c + 1
  b = tf.shape(tokens)[0]
  uniforms = _uniform(bits[:, :_NUM_UNIFORMS])  # (0, 1]
  denoiser = choose_denoiser(uniforms[:, 0], plan)

  # The window: m tokens of the row at a random offset (its first column: `first`).
  m = tf.minimum(length, tf.gather(tf.constant([bu.window for bu in plan.budgets]), denoiser))
  offset = tf.cast(tf.floor((uniforms[:, 1] - 2.0**-24) * tf.cast(length - m + 1, tf.float64)),
                   tf.int32)
  first = p + offset

  # Each kind lays out the noise spans of its rows; span i of a sentinel kind gets
  # <extra_id_i>, in the inputs at its last column, in the targets just before it.
  starts, lengths, sentinels = [], [], []
  for kind_name in plan.kinds:
    kind = KINDS[kind_name]
    rows = Rows(kind_name, m, uniforms[:, 2:] - 2.0**-24, bits[:, _NUM_UNIFORMS:], k,
                denoiser, plan.denoisers)
    start, span_length = kind.layout(rows)
    mine = tf.gather(tf.constant([d.kind == kind_name for d in plan.denoisers]), denoiser)
    span_length = tf.where(mine[:, tf.newaxis], span_length, 0)
    starts.append(tf.where(span_length > 0, start + first[:, tf.newaxis], 0))
    lengths.append(span_length)
    ids = plan.vocab_size - 1 - tf.range(tf.shape(span_length)[1])[tf.newaxis, :]
    sentinels.append(tf.where(span_length > 0, ids, 0) if kind.sentinels else
                     tf.zeros_like(span_length))
  start, span_length = tf.concat(starts, axis=1), tf.concat(lengths, axis=1)
  sentinel = tf.concat(sentinels, axis=1)
  inputs_sentinel = _scatter_rows(sentinel, start + span_length - 1, width)
  targets_sentinel = _scatter_rows(sentinel, start - 1, width)
  noise_mask = noise_mask_from_spans(start, span_length, width)

  column = tf.range(width)[tf.newaxis, :]
  in_window = (column >= first[:, tf.newaxis]) & (column < (first + m)[:, tf.newaxis])
  is_eos = column == (first + m)[:, tf.newaxis]
  mode = [[0] * (p - len(ids)) + list(ids) for ids in plan.mode_ids]  # Right-aligned.
  is_mode = [[False] * (p - len(ids)) + [True] * len(ids) for ids in plan.mode_ids]
  values = tf.concat([tf.reshape(tf.gather(tf.constant(mode, tf.int32), denoiser), [b, p]),
                      tokens, tf.zeros([b, 1], tf.int32)], axis=1)  # [b, width]
  values = tf.where(is_eos, tf.constant(eos_id, tf.int32), values)
  is_mode = tf.pad(tf.reshape(tf.gather(tf.constant(is_mode), denoiser), [b, p]),
                   [[0, 0], [0, c + 1]])
  has_inputs_sentinel = inputs_sentinel > 0
  has_targets_sentinel = targets_sentinel > 0
  inputs = _ragged_rows(
      tf.where(has_inputs_sentinel, inputs_sentinel, values),
      is_mode | (in_window & ~noise_mask) | has_inputs_sentinel | is_eos)
  targets = _ragged_rows(
      tf.where(has_targets_sentinel, targets_sentinel, values),
      noise_mask | has_targets_sentinel | is_eos)
  return {"inputs": inputs, "targets": targets, "denoiser": denoiser}


# ---------------------------------------------------------------------------------
# Random bits and windows.

_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z: tf.Tensor) -> tf.Tensor:
  """SplitMix64's finaliser (a bijection of uint64 with good avalanche)."""
  def xor_shift(z, n):
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(n, tf.uint64)))
  z = xor_shift(z, 30) * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
  z = xor_shift(z, 27) * tf.constant(0x94D049BB133111EB, tf.uint64)
  return xor_shift(z, 31)


def random_bits(seed: tf.Tensor, counter: tf.Tensor, width: int) -> tf.Tensor:
  """Counter-based random bits, vectorised over rows: int32 [r, width].

  Row r is a SplitMix64 stream keyed by its seed (int64 [r, 2], e.g. seqio's
  per-example seed) and counter (int [r], e.g. the chunk's index in its document), so
  a row's bits depend on nothing else: not on batching, order or parallelism.
  """
  seed = tf.bitcast(tf.cast(seed, tf.int64), tf.uint64)
  counter = tf.cast(counter, tf.uint64)
  golden = tf.constant(_GOLDEN, tf.uint64)
  key = _mix64(seed[:, 0] + golden * _mix64(seed[:, 1] + golden * (counter + 1)))
  step = tf.cast(tf.range(1, width + 1, dtype=tf.int64), tf.uint64)
  state = key[:, tf.newaxis] + golden * step[tf.newaxis, :]
  return tf.bitcast(tf.cast(tf.bitwise.right_shift(_mix64(state), tf.constant(32, tf.uint64)),
                            tf.uint32), tf.int32)


def _seeds(seed, rows: tf.Tensor) -> tf.Tensor:
  return tf.broadcast_to(tf.cast(tf.stack(seed), tf.int64), [rows, 2])


def merged_windows(tokens: tf.RaggedTensor, seed, plan: Plan,
                   separator: int | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Joins documents into one stream and cuts it into windows of their denoisers' budgets.

  T5's `reduce_concat_tokens` then `split_tokens`, with a window length per window:
  window j draws its denoiser from its own random stream (keyed by `seed` and j) and
  takes that denoiser's budget of raw tokens, in order; the last window takes what
  is left. The windows tile the stream exactly.

  Args:
    tokens: ragged int [d, None] documents (no EOS).
    seed: seqio's seed for this batch (two int64).
    plan: from `make_plan`.
    separator: a token id put after each document, or None (T5: none).
  Returns:
    (windows int32 [q, plan.chunk_length] zero padded, lengths int32 [q] >= 1,
     bits int32 [q, plan.random_width]: each window's random bits, which choose the
     same denoiser again in `denoise_batch`).
  """
  if separator is not None:
    tokens = tf.concat([tokens, tf.fill([tokens.nrows(), 1], tf.cast(separator, tokens.dtype))],
                       axis=1)
  stream = tf.cast(tokens.flat_values, tf.int32)
  total = tf.size(stream)
  # Enough windows for the stream even if every one draws the smallest budget.
  n = total // min(b.window for b in plan.budgets) + 1
  bits = random_bits(_seeds(seed, n), tf.range(n), plan.random_width)
  windows = tf.constant([b.window for b in plan.budgets])
  window = tf.gather(windows, choose_denoiser(_uniform(bits[:, 0]), plan))
  start = tf.cumsum(window, exclusive=True)
  used = start < total
  length = tf.minimum(window, total - start)[used]
  chunks = tf.RaggedTensor.from_row_lengths(stream, length, validate=False)
  return chunks.to_tensor(shape=[None, plan.chunk_length]), length, bits[used]


def chunk_documents(tokens: tf.RaggedTensor, chunk_length: int):
  """Cuts each document (row) into near-equal chunks of at most `chunk_length` tokens.

  Returns (chunks int32 [q, chunk_length] zero padded, lengths int32 [q], document
  int32 [q] (the row each chunk comes from), index int32 [q] (its place in the row)).
  A document of n tokens gives ceil(n / chunk_length) chunks; an empty one none.
  """
  n = tokens.row_lengths()  # int64 [d]
  count = (n + chunk_length - 1) // chunk_length
  document = tf.repeat(tf.range(tf.size(n, out_type=tf.int64)), count)
  index = tf.range(tf.reduce_sum(count)) - tf.gather(tf.cumsum(count, exclusive=True), document)
  n_of, count_of = tf.gather(n, document), tf.gather(count, document)
  lengths = (index + 1) * n_of // count_of - index * n_of // count_of
  # The chunks tile the documents in order, so they are a re-split of the flat values.
  chunks = tf.RaggedTensor.from_row_lengths(tokens.flat_values, lengths, validate=False)
  chunks = chunks.to_tensor(shape=[None, chunk_length])
  return (tf.cast(chunks, tf.int32), tf.cast(lengths, tf.int32), tf.cast(document, tf.int32),
          tf.cast(index, tf.int32))


def document_windows(tokens: tf.RaggedTensor, seed, plan: Plan
                     ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Each document on its own: (chunks, lengths, bits) as `merged_windows` returns.

  Each chunk's random stream is keyed by `seed`, its document's place in the batch
  and its place in the document.
  """
  chunks, lengths, document, index = chunk_documents(tokens, plan.chunk_length)
  counter = tf.bitwise.bitwise_or(tf.bitwise.left_shift(tf.cast(document, tf.int64), 32),
                                  tf.cast(index, tf.int64))
  bits = random_bits(_seeds(seed, tf.size(document)), counter, plan.random_width)
  return chunks, lengths, bits


# ---------------------------------------------------------------------------------
# The seqio preprocessor.


@seqio.map_over_dataset(num_seeds=1)
@tf.autograph.experimental.do_not_convert  # Plain vectorised TF: tracing it as is is ~5x faster.
def _denoise_documents(tokens, seed, *, plan: Plan, merge: bool, separator: int | None):
  """A batch of documents -> their examples; `seed` is seqio's seed for this batch.

  `tokens` is ragged, or dense with -1 after each row's end (from `padded_batch`).
  """
  if not isinstance(tokens, tf.RaggedTensor):
    tokens = tf.RaggedTensor.from_tensor(tokens, padding=-1)
  if merge:
    windows, lengths, bits = merged_windows(tokens, seed, plan, separator)
  else:
    windows, lengths, bits = document_windows(tokens, seed, plan)
  return denoise_batch(windows, lengths, bits, plan)


def mixture_of_denoisers(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                         sequence_length: Mapping[str, int] | None, *,
                         denoisers: Sequence[Denoiser] = UL2_DENOISERS,
                         feature_key: str = "targets", merge_documents: bool = True,
                         document_separator: int | None = None) -> tf.data.Dataset:
  """seqio preprocessor: tokenised documents -> UL2 examples.

  Takes `feature_key` (int32 [n], no EOS) from each document and yields, per window,
  {"inputs", "targets"} (int32, mode token and EOS included, within
  `sequence_length`) and "denoiser" (int32 scalar: the index into `denoisers`).
  With `merge_documents` (the default, as UL2's and T5's span corruption) the
  documents of a batch of 512 are joined, `document_separator` (a token id, e.g.
  EOS; default none) between them, and cut into full windows; without it, each
  document makes its own examples. The randomness comes from seqio's per-example
  seed (`map_over_dataset`, `num_seeds=1`), so a pipeline with a seed is
  deterministic; the work is vectorised over batches of documents. Use
  `functools.partial(mixture_of_denoisers, denoisers=...)` as a Task preprocessor.

  Raises:
    ValueError: before building any graph, if a denoiser cannot fit the lengths.
  """
  plan = make_plan(denoisers, sequence_length, output_features["targets"].vocabulary)
  if set(dataset.element_spec) != {feature_key}:  # A map per document costs; only if needed.
    dataset = dataset.map(tf.autograph.experimental.do_not_convert(
        lambda features: {feature_key: features[feature_key]}))
  if isinstance(dataset.element_spec[feature_key], tf.TensorSpec):
    # Padded with -1 (never a token id), which marks each row's end: padded_batch runs
    # in C++, 10-30x cheaper per document than ragged_batch's per-element conversion.
    ds = dataset.padded_batch(_BATCH, padded_shapes={feature_key: [None]},
                              padding_values={feature_key: -1})
  else:
    ds = dataset.ragged_batch(_BATCH)
  ds = ds.map(tf.autograph.experimental.do_not_convert(lambda features: features[feature_key]))
  # Rows of the batch come out as 1-D tensors (their element_spec says
  # RaggedTensorSpec of ragged_rank 0). A per-example identity map would make the spec
  # plain but costs as much as all of the above; seqio's Task trims every example with
  # a map anyway, after which the spec is plain.
  return _denoise_documents(ds, plan=plan, merge=merge_documents,
                            separator=document_separator).unbatch()


def denoisers_of(preprocessors: Sequence[object]) -> tuple[Denoiser, ...] | None:
  """The denoisers of a Task's `mixture_of_denoisers` preprocessor, if it has one."""
  for p in preprocessors:
    if isinstance(p, functools.partial) and p.func is mixture_of_denoisers:
      return validate_mixture(p.keywords.get("denoisers", UL2_DENOISERS))
  return None
