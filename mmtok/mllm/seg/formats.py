"""Masks written as text: Text4Seg's semantic descriptors, their row-wise RLE, and box-wise "bricks".

Papers: "Text4Seg: Reimagining Image Segmentation as Text Generation" (Lan et al., ICLR 2025,
arXiv:2410.09855; reference implementation github.com/mc-lan/Text4Seg) and "Text4Seg++: Advancing Image
Segmentation via Generative Language Modeling" (arXiv:2509.06321; no public code).

A mask ``[H, W]`` of label ids (0 = background, ``k >= 1`` = ``names[k - 1]``) is resized (nearest) to a
coarse grid, every cell gets a text label ("others" for background), and the grid is written as text inside
``<seg>`` ... ``</seg>``. Three formats, all registered in ``mmtok.registries.SEG_FORMATS``:

* ``descriptors`` (Text4Seg's full image-wise semantic descriptors): the ``gh * gw`` labels in raster order
  joined by ``"| "``: ``<seg>others| others| dog| ...</seg>``. Text4Seg's decoder splits on ``"|"`` and strips
  whitespace, so it reads this text; so does ours (``"a|b"`` and ``"a | b"`` too).
* ``rrle`` (Text4Seg's row-wise run-length encoding), byte for byte the text of Text4Seg's ``encode_mask``:
  per row the runs ``"label *count"`` joined by ``"| "``; rows joined by ``"\\n "`` (newline and one space);
  one final ``"\\n"``; wrapped as ``"<seg>" + text + "</seg>"``. A 2x3 mask ``[[0, 1, 1], [0, 0, 0]]`` named
  ``["cat"]`` is ``"<seg>others *1| cat *2\\n others *3\\n</seg>"``.
* ``bricks`` (box-wise descriptors in the spirit of Text4Seg++'s "semantic bricks"; our design, since no
  code is public): a box locating every foreground pixel, then an R-RLE of the mask inside that box on a
  fixed in-box grid::

      <seg>[x0,y0,x1,y1]
       others *3| cat *5\\n ... *8\\n</seg>        (box then "\\n ", then the R-RLE rows as above)
      <seg>none</seg>                                (an empty mask)

  ``x0, y0, x1, y1`` are integers in ``[0, box_bins]``: the box spans ``[x0 / box_bins, x1 / box_bins)`` of
  the image width (``x1``, ``y1`` exclusive), quantised outwards so that the box holds every foreground pixel.
  The pixel edges of bin ``b`` on an axis of ``S`` pixels are ``round(b * S / box_bins)`` (halves up) in both
  encoder and decoder. The in-box grid is ``brick_grid`` (``bh x bw``, default 16 x 16): the mask crop is
  nearest-resized to it exactly like the image-wise formats, and the decoder paints it back inside the box
  (background elsewhere). Small objects get the full grid resolution, large empty backgrounds cost no text.
  Multi-label (semantic) masks use one box around all labels.

Resizing, as Text4Seg does it. Text4Seg builds its training targets with PIL's ``Image.resize(..., NEAREST)``:
output cell ``j`` of ``g`` reads input pixel ``int(x_j)`` where ``x_0 = S / g / 2`` and
``x_{j+1} = x_j + S / g`` accumulated in float64 (PIL's ``ImagingScaleAffine``; mathematically
``floor((j + 0.5) * S / g)``, the cell centre, which is also torch's ``nearest-exact``). :func:`nearest_index`
reproduces PIL's float accumulation so our grids equal Text4Seg's to the pixel (checked against PIL in the
tests). For the way back (grid -> pixels) Text4Seg calls ``F.interpolate(mode="nearest")`` (pixel ``i`` reads
cell ``floor(i * g / S)``); we use the same centre rule as the way down (pixel ``i`` reads cell
``floor((i + 0.5) * g / S)``), which equals torch's ``nearest`` whenever ``S`` is a multiple of ``g`` and is
the consistent inverse otherwise (it keeps a grid that was upsampled from fewer pixels than cells exact).

Decoding is total: any string gives a well-formed label grid and a count of repairs, never an exception, in
time and memory linear in the text (counts are capped, parsing stops once the grid is full). Text4Seg's rules
are kept where it has them: runs are read in flattened raster order (row breaks are not needed to decode),
a short sequence is padded with its last label, a long one is truncated to ``gh * gw``, an unknown label is
background, and no ``<seg>`` block at all gives an empty mask. Beyond Text4Seg: spacing as a word-level
tokenizer detokenizes it (``"others * 12 | the red sneaker * 4"``), a lost row break, case differences and a
missing ``</seg>`` all decode; each deviation from the canonical text counts one repair, spacing excepted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mmtok.registries import SEG_FORMATS

logger = logging.getLogger(__name__)

BACKGROUND = "others"  # Text4Seg's background descriptor; always label id 0
SEG_OPEN, SEG_CLOSE = "<seg>", "</seg>"
EMPTY = "none"  # bricks: the body of an empty mask
MAX_LABEL_CHARS = 256  # a longer "label" is garbage (a run-on sentence, a flood of noise): background
_MAX_COUNT_DIGITS = 7  # counts are capped at the grid size anyway; never parse a 1 MB number

_OPEN_RE = re.compile(r"<\s*seg\s*>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"<\s*/\s*seg\s*>", re.IGNORECASE)
# The three delimiters of the run grammar: "*count" (count optional so "*" alone is caught), "|" and newline.
_DELIM_RE = re.compile(r"\*\s*(\d*)|\||\n")
_BOX_RE = re.compile(r"\[\s*(\d{1,9})\s*,\s*(\d{1,9})\s*,\s*(\d{1,9})\s*,\s*(\d{1,9})\s*\]")
_FORBIDDEN_RE = re.compile(r"[|*\n\r\[\]<>]")  # characters that would break the grammar inside a label


class SegFormatError(ValueError):
    """A mask or label list that cannot be encoded (decode never raises)."""


# ------------------------------------------------------------------------------------------------ helpers
def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index read by each of ``dst`` output positions when resizing ``src`` positions (nearest).

    Reproduces PIL's ``Image.resize(NEAREST)`` exactly (the resize Text4Seg uses to build its targets): the
    sample point starts at half a step and advances by ``src / dst`` in float64; the index is its integer
    part. Works both ways (``dst < src`` downsamples, ``dst > src`` repeats).

    Returns:
        ``[dst]`` int64 indices in ``[0, src - 1]``.
    """
    step = src / dst
    pos = step * 0.5
    out = np.empty(dst, dtype=np.int64)
    for j in range(dst):  # sequential float accumulation on purpose: that is what PIL computes
        out[j] = int(pos)
        pos += step
    return np.minimum(out, src - 1)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resize of a 2-D array to ``[height, width]`` with :func:`nearest_index` on both axes."""
    rows = nearest_index(labels.shape[0], height)
    cols = nearest_index(labels.shape[1], width)
    return labels[rows[:, None], cols[None, :]]


def _as_hw(value: int | Sequence[int], what: str) -> tuple[int, int]:
    """``g`` or ``[gh, gw]`` -> ``(gh, gw)``, validated."""
    if isinstance(value, (int, np.integer)):
        hw = (int(value), int(value))
    else:
        items = list(value)
        if len(items) != 2:
            raise SegFormatError(f"{what} must be an int or [rows, cols], got {value!r}")
        hw = (int(items[0]), int(items[1]))
    if not all(1 <= v <= 256 for v in hw):
        raise SegFormatError(f"{what} sides must be in [1, 256] (8, 16, 24 or 32 are usual), got {value!r}")
    return hw


def clean_label(name: str) -> str:
    """The label text a name is written as: grammar characters replaced by spaces, whitespace collapsed."""
    return " ".join(_FORBIDDEN_RE.sub(" ", str(name)).split())


def label_key(text: str) -> str:
    """Matching key of a label: lower case, no whitespace at all.

    A word-level tokenizer detokenizes ``"man's hat"`` as ``"man ' s hat"`` and may lower-case; both keep
    the same key, so they decode to the same label without counting a repair.
    """
    return "".join(text.lower().split())


def _check_names(names: Sequence[str]) -> list[str]:
    labels = [clean_label(n) for n in names]
    keys = [label_key(t) for t in labels]
    for name, text, key in zip(names, labels, keys, strict=True):
        if not key:
            raise SegFormatError(f"label name {name!r} is empty once cleaned; give every class a visible name")
        if key == label_key(BACKGROUND) or key == label_key(EMPTY):
            raise SegFormatError(f"label name {name!r} is reserved (background / empty mask); rename the class")
        if len(text) > MAX_LABEL_CHARS:
            raise SegFormatError(f"label name {name[:40]!r}... is over {MAX_LABEL_CHARS} characters; shorten it")
    if len(set(keys)) != len(keys):
        raise SegFormatError(f"label names {list(names)!r} collide once cleaned (case and spaces are ignored)")
    return labels


def _check_mask(mask: np.ndarray, names: Sequence[str]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2 or mask.size == 0:
        raise SegFormatError(f"mask must be a non-empty [H, W] array of label ids, got shape {mask.shape}")
    if mask.dtype == bool:
        mask = mask.astype(np.int64)
    if not np.issubdtype(mask.dtype, np.integer):
        raise SegFormatError(f"mask must hold integer label ids (0 = background), got dtype {mask.dtype}")
    mask = mask.astype(np.int64)
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi > len(names):
        raise SegFormatError(f"mask holds label ids in [{lo}, {hi}] but {len(names)} names were given (ids 0..K)")
    return mask


def rle_rows(cells: np.ndarray, labels: Sequence[str]) -> str:
    """Text4Seg's row-wise RLE of a ``[gh, gw]`` grid of ids; ``labels[i]`` is the text of id ``i``.

    Runs ``"label *count"`` joined by ``"| "``, rows joined by ``"\\n "``, one final ``"\\n"``.
    """
    rows = []
    for row in cells:
        change = np.flatnonzero(row[1:] != row[:-1]) + 1  # starts of runs after the first
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(row)]])
        rows.append("| ".join(f"{labels[row[s]]} *{e - s}" for s, e in zip(starts, ends, strict=True)))
    return "\n ".join(rows) + "\n"


# ------------------------------------------------------------------------------------------------ output
@dataclass
class SegDecoded:
    """What :meth:`SegFormat.decode` returns.

    Attributes:
        labels: ``[gh, gw]`` int64 label ids on the format's grid (bricks: the in-box grid); 0 = background
            ("others"), ``k`` = ``names[k - 1]``.
        names: the names given to ``decode``, or (``names=None``) the labels found in the text, in order of
            first appearance.
        repairs: how many repairs decoding made (0 = canonical, well-formed text).
        box: bricks only: ``(x0, y0, x1, y1)`` normalised to ``[0, 1]`` (x1, y1 exclusive); None otherwise
            (and for an empty bricks mask).
    """

    labels: np.ndarray
    names: list[str]
    repairs: int
    box: tuple[float, float, float, float] | None = None
    notes: list[str] = field(default_factory=list, repr=False)  # the first repairs, in words (for logs and tests)

    def pixel_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """The box in pixels ``(x0, y0, x1, y1)`` (x1, y1 exclusive), None without a box or when empty."""
        if self.box is None:
            return None
        x0, y0, x1, y1 = self.box
        px = (_edge(x0, width), _edge(y0, height), _edge(x1, width), _edge(y1, height))
        return px if px[2] > px[0] and px[3] > px[1] else None

    def mask(self, height: int, width: int) -> np.ndarray:
        """``[height, width]`` int64 labels at full resolution (nearest, cell-centre rule; see module doc).

        Bricks paint their in-box grid inside the box and background elsewhere.
        """
        if self.box is None:
            return resize_nearest(self.labels, height, width)
        out = np.zeros((height, width), dtype=np.int64)
        pb = self.pixel_box(height, width)
        if pb is not None:
            x0, y0, x1, y1 = pb
            out[y0:y1, x0:x1] = resize_nearest(self.labels, y1 - y0, x1 - x0)
        return out

    def scores(self, height: int, width: int, label: int = 1) -> np.ndarray:
        """``[height, width]`` float32 in {0, 1}: where the mask is ``label`` (the input of refinement)."""
        return (self.mask(height, width) == label).astype(np.float32)


def _edge(frac: float, size: int) -> int:
    return int(min(max(np.floor(frac * size + 0.5), 0), size))


def _bin_edge(b: int, bins: int, size: int) -> int:
    """Pixel edge of bin ``b`` of ``bins`` on an axis of ``size`` pixels: round(b * size / bins), halves up."""
    return (2 * b * size + bins) // (2 * bins)


# ------------------------------------------------------------------------------------------------ parsing
class _Notes:
    """Repairs counter that keeps only the first few messages (a flood of garbage must not cost memory)."""

    keep = 32

    def __init__(self) -> None:
        self.count = 0
        self.items: list[str] = []

    def append(self, message: str) -> None:
        self.count += 1
        if len(self.items) < self.keep:
            self.items.append(message)


def _extract_body(text: str, notes: _Notes) -> str | None:
    """The text between the first ``<seg>`` and the next ``</seg>``; None if there is nothing to read.

    No ``<seg>`` but run-like text (``*`` or ``|``): read it all (one repair). No ``<seg>`` and no run
    syntax: a plain answer without a mask (empty mask, one repair), as Text4Seg does.
    """
    m = _OPEN_RE.search(text)
    if m is None:
        notes.append("missing <seg>")
        close = _CLOSE_RE.search(text)
        body = text[: close.start()] if close else text
        return body if ("*" in body or "|" in body) else None
    body = text[m.end() :]
    close = _CLOSE_RE.search(body)
    if close is None:
        notes.append("missing </seg>")
        return body
    return body[: close.start()]


def _scan_runs(body: str, cells: int, counted: bool, notes: _Notes) -> list[tuple[str, int, bool]]:
    """Split a body into runs, stopping once ``cells`` cells are filled.

    Grammar (whitespace anywhere is ignored): ``label *count`` runs for R-RLE, ``label`` items for
    descriptors; ``|`` and newlines separate items. A label with no count reads as one cell.

    Args:
        counted: True when the format expects ``*count`` after each label (R-RLE), so a label without one
            is a repair; False for full descriptors, where a ``*count`` is the repair.
    """
    runs: list[tuple[str, int, bool]] = []
    filled = 0
    start = 0
    overflow = False

    def add(label: str, count: int, has_count: bool) -> bool:
        nonlocal filled
        if filled >= cells:
            return False
        runs.append((label, min(count, cells - filled), has_count))
        filled += count
        return True

    for m in _DELIM_RE.finditer(body):
        piece = body[start : m.start()]
        start = m.end()
        tok = m.group(0)
        label = piece.strip()
        if tok.startswith("*"):
            digits = m.group(1)
            if not label:
                notes.append("count without a label")
                continue
            if not digits:
                notes.append(f"no count after {label[:30]!r}")
                count = 1
            elif len(digits) > _MAX_COUNT_DIGITS:
                notes.append("count too large")
                count = cells
            else:
                count = int(digits)
                if count == 0:
                    notes.append("zero count")
                    continue
            if not counted:
                notes.append("count in a descriptor list")
            if not add(label, count, True):
                overflow = True
                break
        else:  # "|" or newline: ends a count-less item, if there is one
            if not label:
                if tok == "|" and not counted and runs:  # "a||b" in descriptors; in R-RLE "*3| x" is normal
                    notes.append("empty item")
                continue
            if counted:
                notes.append(f"no count after {label[:30]!r}")
            if not add(label, 1, False):
                overflow = True
                break
        if filled > cells:
            overflow = True
            break
    else:
        tail = body[start:].strip()
        if tail:
            if counted:  # a label cut off before its count (truncated generation): dropped
                notes.append("dangling label")
            elif not add(tail, 1, False):
                overflow = True
    if overflow or filled > cells:
        notes.append(f"more than {cells} cells (truncated)")
    return runs


def _fill_grid(
    runs: list[tuple[str, int, bool]],
    shape: tuple[int, int],
    names: Sequence[str] | None,
    notes: _Notes,
) -> tuple[np.ndarray, list[str]]:
    """Map runs to ids and lay them out in raster order, padding with the last label (Text4Seg's rule)."""
    cells = shape[0] * shape[1]
    bg_key = label_key(BACKGROUND)
    if names is not None:
        out_names = [str(n) for n in names]
        lookup = {label_key(clean_label(n)): i + 1 for i, n in enumerate(out_names)}
    else:
        out_names = []
        lookup = {}
    ids = np.zeros(cells, dtype=np.int64)
    pos = 0
    last = 0
    for label, count, _ in runs:
        key = label_key(clean_label(label))  # the same cleaning as the names (a "<unk>" in text matches)
        if key == bg_key:
            lab = 0
        elif key in lookup:
            lab = lookup[key]
        elif names is None and len(label) <= MAX_LABEL_CHARS and key:
            out_names.append(" ".join(label.split()))
            lab = lookup[key] = len(out_names)
        else:
            notes.append(f"unknown label {label[:30]!r}")
            lab = 0
        ids[pos : pos + count] = lab
        pos += count
        last = lab
    if pos < cells:
        if runs:
            notes.append(f"{cells - pos} cells missing (padded with the last label)")
        ids[pos:] = last
    return ids.reshape(shape), out_names


# ------------------------------------------------------------------------------------------------ formats
@dataclass
class GridConfig:
    """Config of the image-wise formats.

    Attributes:
        grid: ``g`` (a ``g x g`` grid; 16 is Text4Seg's default, 8, 24, 32 also used) or ``[gh, gw]``.
    """

    grid: int | list[int] = 16


@dataclass
class BricksConfig:
    """Config of the box-wise format.

    Attributes:
        grid: unused by the text (kept so every format has ``grid``); the image-wise grid this format is
            compared with.
        box_bins: quantisation of the box coordinates: integers in ``[0, box_bins]`` over the image.
        brick_grid: the in-box grid, ``b`` or ``[bh, bw]``.
    """

    grid: int | list[int] = 16
    box_bins: int = 32
    brick_grid: int | list[int] = 16


class SegFormat:
    """Base of every mask-as-text format: ``encode(mask, names) -> str``, total ``decode(text) -> SegDecoded``."""

    name: str = ""

    def __init__(self, config: GridConfig | BricksConfig):
        self.config = config
        self.grid = _as_hw(config.grid, "grid")

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(gh, gw)`` of :attr:`SegDecoded.labels`."""
        return self.grid

    def grid_labels(self, mask: np.ndarray) -> np.ndarray:
        """The ``[gh, gw]`` label ids ``encode`` writes (the oracle a perfect decoder returns)."""
        mask = np.asarray(mask)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        return resize_nearest(mask.astype(np.int64), *self.grid)

    def oracle(self, mask: np.ndarray, names: Sequence[str]) -> SegDecoded:
        """What decoding the encoding of ``mask`` gives (without writing text): the format's best case."""
        return SegDecoded(self.grid_labels(_check_mask(mask, names)), list(names), 0)

    def encode(self, mask: np.ndarray, names: Sequence[str]) -> str:
        """Write ``mask`` ``[H, W]`` (0 = background, ``k >= 1`` -> ``names[k - 1]``) as a ``<seg>`` block.

        Raises:
            SegFormatError: a mask that is not 2-D integer ids in ``[0, len(names)]``, or unusable names.
        """
        raise NotImplementedError

    def decode(self, text: str, names: Sequence[str] | None = None) -> SegDecoded:
        """Read a ``<seg>`` block out of ``text`` (any string). Total: never raises.

        Args:
            text: a model's answer (a sentence before ``<seg>`` is fine).
            names: the expected labels; anything else is background (one repair). None: collect the labels
                found, in order of appearance.
        """
        raise NotImplementedError

    def _decode_grid(self, text: str, names: Sequence[str] | None, counted: bool) -> SegDecoded:
        """The image-wise decoders: runs (``counted``: ``label *n``) or one label per cell, in raster order."""
        notes = _Notes()
        body = _extract_body(text, notes)
        shape = self.grid_shape
        if body is None:
            return SegDecoded(np.zeros(shape, np.int64), [str(n) for n in names or []], notes.count, notes=notes.items)
        runs = _scan_runs(body, shape[0] * shape[1], counted, notes)
        labels, out_names = _fill_grid(runs, shape, names, notes)
        if not runs:
            notes.append("no runs" if counted else "no labels")
        return SegDecoded(labels, out_names, notes.count, notes=notes.items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def _safe_decode(fn):
    """Last line of defence of totality: any bug in a decoder gives an empty mask and a logged repair."""

    def wrapper(self: SegFormat, text: str, names: Sequence[str] | None = None) -> SegDecoded:
        try:
            return fn(self, text if isinstance(text, str) else str(text), names)
        except Exception as e:  # noqa: BLE001 - decode must never raise
            logger.warning("%s decode failed (%s: %s); returning an empty mask", self.name, type(e).__name__, e)
            names_out = [str(n) for n in names] if names is not None else []
            return SegDecoded(np.zeros(self.grid_shape, dtype=np.int64), names_out, 1, notes=[f"internal: {e}"])

    wrapper.__doc__ = fn.__doc__
    wrapper.__name__ = fn.__name__
    return wrapper


@SEG_FORMATS.register("rrle", config=GridConfig, help="Text4Seg row-wise RLE of semantic descriptors")
class RRLEFormat(SegFormat):
    """Text4Seg's row-wise run-length encoded semantic descriptors (byte-for-byte their ``encode_mask``)."""

    name = "rrle"

    def encode(self, mask: np.ndarray, names: Sequence[str]) -> str:
        labels = [BACKGROUND, *_check_names(names)]
        cells = self.grid_labels(_check_mask(mask, names))
        return SEG_OPEN + rle_rows(cells, labels) + SEG_CLOSE

    @_safe_decode
    def decode(self, text: str, names: Sequence[str] | None = None) -> SegDecoded:
        return self._decode_grid(text, names, counted=True)


@SEG_FORMATS.register("descriptors", config=GridConfig, help="Text4Seg full semantic descriptors, one per cell")
class DescriptorsFormat(SegFormat):
    """Text4Seg's full image-wise semantic descriptors: every cell's label, raster order, joined by ``"| "``."""

    name = "descriptors"

    def encode(self, mask: np.ndarray, names: Sequence[str]) -> str:
        labels = [BACKGROUND, *_check_names(names)]
        cells = self.grid_labels(_check_mask(mask, names)).reshape(-1)
        return SEG_OPEN + "| ".join(labels[i] for i in cells) + SEG_CLOSE

    @_safe_decode
    def decode(self, text: str, names: Sequence[str] | None = None) -> SegDecoded:
        return self._decode_grid(text, names, counted=False)


@SEG_FORMATS.register("bricks", config=BricksConfig, help="box then R-RLE inside the box (Text4Seg++ bricks)")
class BricksFormat(SegFormat):
    """Box-wise descriptors: a quantised box around the foreground, then an R-RLE on a fixed in-box grid."""

    name = "bricks"

    def __init__(self, config: BricksConfig):
        super().__init__(config)
        if not 1 <= int(config.box_bins) <= 10_000:
            raise SegFormatError(f"box_bins must be in [1, 10000] (32 or 64 are usual), got {config.box_bins}")
        self.bins = int(config.box_bins)
        self.brick = _as_hw(config.brick_grid, "brick_grid")

    @property
    def grid_shape(self) -> tuple[int, int]:
        return self.brick

    def box_bins_of(self, mask: np.ndarray) -> tuple[int, int, int, int] | None:
        """The quantised box ``(x0, y0, x1, y1)`` in bins (x1, y1 exclusive) around ``mask > 0``; None if empty.

        Quantised outwards: the pixel box of the bins holds every foreground pixel.
        """
        mask = np.asarray(mask)
        ys, xs = np.nonzero(mask)
        if len(ys) == 0:
            return None
        h, w = mask.shape
        n = self.bins

        def lo(p: int, size: int) -> int:  # the largest bin whose pixel edge is <= p
            b = (p * n) // size
            while b > 0 and _bin_edge(b, n, size) > p:
                b -= 1
            while b < n and _bin_edge(b + 1, n, size) <= p:
                b += 1
            return b

        def hi(p: int, size: int) -> int:  # the smallest bin whose pixel edge is >= p (p exclusive)
            b = -((-p * n) // size)
            while b < n and _bin_edge(b, n, size) < p:
                b += 1
            while b > 0 and _bin_edge(b - 1, n, size) >= p:
                b -= 1
            return b

        x0, x1 = lo(int(xs.min()), w), hi(int(xs.max()) + 1, w)
        y0, y1 = lo(int(ys.min()), h), hi(int(ys.max()) + 1, h)
        return x0, y0, x1, y1

    def _crop(self, mask: np.ndarray, bbox: tuple[int, int, int, int]) -> np.ndarray:
        h, w = mask.shape
        x0, y0, x1, y1 = bbox
        px0, px1 = _bin_edge(x0, self.bins, w), _bin_edge(x1, self.bins, w)
        py0, py1 = _bin_edge(y0, self.bins, h), _bin_edge(y1, self.bins, h)
        return mask[py0:py1, px0:px1]

    def grid_labels(self, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        mask = mask.astype(np.int64)
        bbox = self.box_bins_of(mask)
        if bbox is None:
            return np.zeros(self.brick, dtype=np.int64)
        return resize_nearest(self._crop(mask, bbox), *self.brick)

    def _norm_box(self, bbox: tuple[int, int, int, int] | None) -> tuple[float, float, float, float] | None:
        return None if bbox is None else tuple(v / self.bins for v in bbox)  # type: ignore[return-value]

    def oracle(self, mask: np.ndarray, names: Sequence[str]) -> SegDecoded:
        mask = _check_mask(mask, names)
        return SegDecoded(self.grid_labels(mask), list(names), 0, box=self._norm_box(self.box_bins_of(mask)))

    def encode(self, mask: np.ndarray, names: Sequence[str]) -> str:
        labels = [BACKGROUND, *_check_names(names)]
        mask = _check_mask(mask, names)
        bbox = self.box_bins_of(mask)
        if bbox is None:
            return SEG_OPEN + EMPTY + SEG_CLOSE
        cells = resize_nearest(self._crop(mask, bbox), *self.brick)
        box = "[" + ",".join(str(v) for v in bbox) + "]"
        return SEG_OPEN + box + "\n " + rle_rows(cells, labels) + SEG_CLOSE

    @_safe_decode
    def decode(self, text: str, names: Sequence[str] | None = None) -> SegDecoded:
        notes = _Notes()
        body = _extract_body(text, notes)
        shape = self.grid_shape
        empty_names = [str(n) for n in names or []]
        if body is None:
            return SegDecoded(np.zeros(shape, np.int64), empty_names, notes.count, notes=notes.items)
        if label_key(body) == label_key(EMPTY):
            return SegDecoded(np.zeros(shape, np.int64), empty_names, notes.count, notes=notes.items)
        m = _BOX_RE.search(body[:4096])  # the box comes first; do not scan a megabyte for one
        if m is None:
            notes.append("no box (the whole image is used)")
            box = (0, 0, self.bins, self.bins)
            rest = body
        else:
            if body[: m.start()].strip():
                notes.append("text before the box")
            vals = [min(int(v), self.bins) for v in m.groups()]
            if any(int(v) > self.bins for v in m.groups()):
                notes.append("box coordinate out of range (clamped)")
            x0, y0, x1, y1 = vals
            if x0 > x1 or y0 > y1:
                notes.append("box corners swapped")
                x0, x1 = sorted((x0, x1))
                y0, y1 = sorted((y0, y1))
            box = (x0, y0, x1, y1)
            rest = body[m.end() :]
        if box[2] == box[0] or box[3] == box[1]:
            notes.append("empty box")
            return SegDecoded(np.zeros(shape, np.int64), empty_names, notes.count, notes=notes.items)
        runs = _scan_runs(rest, shape[0] * shape[1], True, notes)
        labels, out_names = _fill_grid(runs, shape, names, notes)
        if not runs:
            notes.append("no runs")
        return SegDecoded(labels, out_names, notes.count, box=self._norm_box(box), notes=notes.items)
