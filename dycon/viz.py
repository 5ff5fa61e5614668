"""Pictures: case overlays, the uncertainty the losses see, and training curves.

Everything is drawn off-screen: figures are ``matplotlib.figure.Figure`` objects saved through
the Agg canvas and pyplot is never imported, so nothing opens a window and no display is needed
(CI, SSH, containers).

- Case overlays (``python -m dycon.evaluate --snapshots N``, ``Snapshots``): three orthogonal
  slices through the ground truth's largest lesion component, the image in grey, ground-truth
  and predicted contours in two colours of Okabe & Ito's colour-blind-safe palette, and a
  montage of the best and the worst cases by Dice.
- Uncertainty images (TensorBoard, at each validation): ``uncertainty_images``.
- Training curves: ``curves_figure`` (``curves.png`` of one run) and ``runs_figure``
  (``python -m dycon.plot``).

Contours are painted into the pixel arrays, not drawn by matplotlib: a contour pixel is a pixel
of the (upsampled) slice on the edge of its mask, so a picture shows exactly which voxels each
mask covers (and tests can check contour pixels one by one). The ground-truth contour lies just
outside its mask and the predicted one just inside, so a perfect prediction shows both lines side
by side. Panels are placed on whole pixels and shown without resampling: the PNG holds the
panel arrays unchanged.

torch is imported only by the functions that need it (overlays: the connected components of
``dycon.inference``; uncertainty images: the networks and kernels), not by the curves, so that
``python -m dycon.plot`` starts quickly.

Orientation: volumes are ``(X, Y, Z)``. A slice across one axis shows the two others, the first
from left to right and the second from bottom to top.
"""
from __future__ import annotations

import csv
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage


# Okabe & Ito's palette: distinct for the common colour-vision deficiencies
OKABE_ITO = {"orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}
GT_COLOUR, PRED_COLOUR = OKABE_ITO["orange"], OKABE_ITO["sky_blue"]
CLASS_COLOURS = tuple(OKABE_ITO[k] for k in ("orange", "sky_blue", "bluish_green", "yellow", "vermillion",
                                             "reddish_purple", "blue"))
# FeCL patch labels: lesion (any foreground class), background; ignored patches stay untinted
PATCH_COLOURS = {"lesion": OKABE_ITO["vermillion"], "background": OKABE_ITO["blue"]}
AXIS_NAMES = "XYZ"
DPI = 100
PANEL_PIXELS = 240      # the longest side of a case overlay panel, about
# case-figure layout in pixels: left margin, gap between panels, title band, panel-title band,
# x-axis band under each row, legend band
_LEFT, _GAP, _TOP, _ROW_TOP, _BOTTOM, _LEGEND = 64, 64, 44, 22, 44, 34


# ----------------------------------------------------------------------------------- pixels

def colour_rgb(colour) -> np.ndarray:
    """A matplotlib colour as three uint8 values."""
    return np.round(np.array(to_rgb(colour)) * 255).astype(np.uint8)


def intensity_window(image: np.ndarray) -> tuple[float, float]:
    """Grey levels for display: the 0.5 and 99.5 percentiles of the image (robust to outliers)."""
    low, high = (float(v) for v in np.percentile(image, (0.5, 99.5)))
    return (low, high) if high > low else (low, low + 1.0)


def grey_rgb(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """A 2D image as grey RGB (uint8), ``window`` mapped to black .. white."""
    low, high = window
    grey = np.round(np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def scalar_rgb(values: np.ndarray, vmin: float, vmax: float, cmap: str = "magma") -> np.ndarray:
    """A 2D scalar map as RGB (uint8) through a colour map, ``vmin`` .. ``vmax`` spanning it."""
    scaled = np.clip((np.asarray(values, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return np.round(matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def mask_edges(mask: np.ndarray, width: int = 1, outside: bool = False) -> np.ndarray:
    """The edge of a 2D mask, ``width`` pixels thick (4-connected steps): inside the mask (the
    mask minus its erosion) or, with ``outside``, just outside it (its dilation minus the mask).
    Pixels beyond the array count as background: a mask touching the border has an inside edge there."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    if outside:
        return ndimage.binary_dilation(mask, structure, iterations=width) & ~mask
    return mask & ~ndimage.binary_erosion(mask, structure, iterations=width, border_value=0)


def upsample(array: np.ndarray, reps: Sequence[int]) -> np.ndarray:
    """Each pixel repeated ``reps[0]`` times down and ``reps[1]`` times across."""
    return np.repeat(np.repeat(array, reps[0], axis=0), reps[1], axis=1)


def paint(rgb: np.ndarray, where: np.ndarray, colour) -> np.ndarray:
    """Set the pixels ``where`` of ``rgb`` (in place) to ``colour``; returns ``rgb``."""
    rgb[where] = colour_rgb(colour)
    return rgb


def orient(slice2d: np.ndarray) -> np.ndarray:
    """A slice ``(a, b)`` as displayed: ``a`` from left to right, ``b`` from bottom to top."""
    return np.flipud(np.asarray(slice2d).T)


def pixel_reps(shape: Sequence[int], spacing: Optional[Sequence[float]] = None,
               target: int = PANEL_PIXELS) -> tuple[int, ...]:
    """Display pixels per voxel along each axis: about ``target`` pixels over the longest physical
    extent, whole numbers so that every voxel is a block of pixels (aspect ratio follows the spacing)."""
    spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
    per_mm = target / max(n * s for n, s in zip(shape, spacing))
    return tuple(max(1, round(s * per_mm)) for s in spacing)


def contour_width(reps: Sequence[int]) -> int:
    """Contour thickness in pixels: 2 where voxels are big enough to leave room, else 1."""
    return 2 if min(reps) >= 4 else 1


# ------------------------------------------------------------------------------ case overlays

def lesion_centre(label: np.ndarray, pred: Optional[np.ndarray] = None) -> tuple[int, ...]:
    """Where to slice: along each axis, the slice with the largest cross-section of the ground
    truth's largest connected component (of the prediction's when the ground truth is empty;
    the middle of the volume when both are empty)."""
    from dycon.inference import keep_largest_component   # imports torch

    for mask in (label, pred):
        if mask is not None and np.any(mask):
            component = keep_largest_component(np.asarray(mask) > 0).astype(bool)
            return tuple(int(component.sum(axis=tuple(a for a in range(component.ndim) if a != axis)).argmax())
                         for axis in range(component.ndim))
    return tuple(n // 2 for n in np.shape(label))


@dataclass
class Panel:
    """One picture of a figure: RGB pixels, the data extent (left, right, bottom, top) they span,
    axis labels and a title."""
    rgb: np.ndarray
    extent: tuple
    xlabel: str = ""
    ylabel: str = ""
    title: str = ""


def slice_panel(image: np.ndarray, window, axis: int, index: int, layers, spacing=None, reps=None,
                width: Optional[int] = None, title: str = "") -> Panel:
    """The slice ``index`` across ``axis`` of a 3D ``image``, with the contours of ``layers``:
    a sequence of ``(mask3d, colour, outside)``, painted in order (later ones on top)."""
    reps = reps or pixel_reps(image.shape, spacing)
    width = width or contour_width(reps)
    a, b = (k for k in range(3) if k != axis)
    cut = tuple(index if k == axis else slice(None) for k in range(3))
    block = (reps[b], reps[a])   # displayed rows run along axis b, columns along axis a
    rgb = grey_rgb(upsample(orient(image[cut]), block), window)
    for mask, colour, outside in layers:
        paint(rgb, mask_edges(upsample(orient(mask[cut]), block), width, outside), colour)
    unit = "mm" if spacing is not None else "voxel"
    size = spacing if spacing is not None else (1.0,) * 3
    return Panel(rgb, (0.0, image.shape[a] * size[a], 0.0, image.shape[b] * size[b]),
                 f"{AXIS_NAMES[a]} ({unit})", f"{AXIS_NAMES[b]} ({unit})",
                 f"{title}{AXIS_NAMES[axis]} = {index}")


def _contour_layers(label: np.ndarray, pred: np.ndarray, num_classes: int) -> list[tuple[str, list]]:
    """(row title, layers) of a case figure: binary labels in one row (ground truth outside its
    mask, prediction inside); more classes in a ground-truth row and a prediction row, a colour per class."""
    if num_classes <= 2:
        return [("", [(label > 0, GT_COLOUR, True), (pred > 0, PRED_COLOUR, False)])]
    return [(f"{name}, ", [(mask == c, class_colour(c), False) for c in range(1, num_classes)])
            for name, mask in (("ground truth", label), ("prediction", pred))]


def class_colour(c: int) -> str:
    """The colour of foreground class ``c`` (the palette repeats after seven classes)."""
    return CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]


def legend_handles(num_classes: int) -> list:
    if num_classes <= 2:
        return [Line2D([], [], color=GT_COLOUR, lw=3, label="ground truth (drawn outside it)"),
                Line2D([], [], color=PRED_COLOUR, lw=3, label="prediction (drawn inside it)")]
    return [Patch(color=class_colour(c), label=f"class {c}") for c in range(1, num_classes)]


def case_panels(image: np.ndarray, label: np.ndarray, pred: np.ndarray, spacing=None,
                num_classes: int = 2) -> list[list[Panel]]:
    """Rows of three orthogonal slices (across Z, Y, X) through ``lesion_centre(label, pred)``."""
    image, label, pred = np.asarray(image), np.asarray(label), np.asarray(pred)
    if not image.shape == label.shape == pred.shape or image.ndim != 3:
        raise ValueError(f"image, label and prediction must be 3D arrays of one shape, got "
                         f"{image.shape}, {label.shape}, {pred.shape}")
    centre = lesion_centre(label, pred)
    reps, window = pixel_reps(image.shape, spacing), intensity_window(image)
    return [[slice_panel(image, window, axis, centre[axis], layers, spacing, reps, title=title)
             for axis in (2, 1, 0)]
            for title, layers in _contour_layers(label, pred, num_classes)]


def grid_figure(rows: list[list[Panel]], title: str = "", legend: Sequence = ()) -> Figure:
    """Panels in rows, each placed on whole pixels at its own size (no resampling)."""
    n_cols = max(len(row) for row in rows)
    col_w = [max(row[j].rgb.shape[1] for row in rows if j < len(row)) for j in range(n_cols)]
    row_h = [max(p.rgb.shape[0] for p in row) for row in rows]
    width = _LEFT + sum(col_w) + _GAP * (n_cols - 1) + _GAP // 2
    height = _TOP + sum(_ROW_TOP + h + _BOTTOM for h in row_h) + (_LEGEND if legend else 0)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    top = _TOP
    for row, h in zip(rows, row_h):
        top += _ROW_TOP
        left = _LEFT
        for panel, w in zip(row, col_w):
            ph, pw = panel.rgb.shape[:2]
            show_panel(fig.add_axes((left / width, (height - top - ph) / height, pw / width, ph / height)), panel)
            left += w + _GAP
        top += h + _BOTTOM
    fig.suptitle(title, y=1 - 8 / height, va="top", fontsize=11)
    if legend:
        fig.legend(handles=list(legend), loc="lower center", ncol=len(legend), frameon=False, fontsize=9)
    return fig


def show_panel(ax, panel: Panel) -> None:
    # above the axis ticks (whose anti-aliased edges would otherwise touch the panel's border
    # pixels) and without spines, so the panel's pixels reach the PNG unchanged
    ax.imshow(panel.rgb, interpolation="none", extent=panel.extent, aspect="auto", zorder=3)
    ax.set_axisbelow(True)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel(panel.xlabel, fontsize=8, labelpad=1)
    ax.set_ylabel(panel.ylabel, fontsize=8, labelpad=1)
    ax.set_title(panel.title, fontsize=9, pad=3)
    ax.tick_params(labelsize=7)


def case_title(case_id: str, rows: Sequence[dict], unit: str) -> str:
    """The case id with Dice and HD95 of each foreground class (``rows`` as from ``dycon.evaluate``)."""
    parts = []
    for row in rows:
        hd = (f"{row['hd95']:.2f} {unit}" if math.isfinite(row["hd95"])
              else "undefined (empty ground truth)")
        prefix = f"class {row['class']}: " if len(rows) > 1 else ""
        parts.append(f"{prefix}Dice {row['dice']:.3f}, HD95 {hd}")
    return f"{case_id} — " + "; ".join(parts)


def case_figure(image, label, pred, title: str, spacing=None, num_classes: int = 2) -> Figure:
    """A case overlay: three orthogonal slices through the lesion with contours (module docstring)."""
    return grid_figure(case_panels(image, label, pred, spacing, num_classes), title, legend_handles(num_classes))


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


@dataclass
class _Tile:
    dice: float
    case_id: str
    panels: list     # the first panel of each of the case's rows


class Snapshots:
    """Evaluation pictures in ``folder``: ``<case>.png`` overlays for the first ``count`` cases, and
    ``montage.png``, the first slice of the ``montage_cases`` best and worst cases by mean Dice.

    Call it once per case (it is ``dycon.evaluate.evaluate_cases``'s ``on_case``), then ``finish()``.
    Multi-channel images show their first channel. Only the pictures of the current best and
    worst cases are kept in memory.
    """

    def __init__(self, folder: str | Path, count: int, units: str = "voxel", montage_cases: int = 4):
        if count < 0 or montage_cases < 1:
            raise ValueError(f"snapshots: need count >= 0 and montage_cases >= 1, got {count} and {montage_cases}")
        self.folder, self.count, self.montage_cases = Path(folder), count, montage_cases
        self.unit = "mm" if units == "mm" else "vox"
        self.written: list[Path] = []
        self.num_classes = 2
        self._tiles: list[_Tile] = []

    def __call__(self, case, volume, pred: np.ndarray, rows: Sequence[dict]) -> None:
        num_classes = max(r["class"] for r in rows) + 1
        panels = case_panels(volume.image[0], volume.label, pred, volume.spacing, num_classes)
        title = case_title(case.id, rows, self.unit)
        if len(self.written) < self.count:
            fig = grid_figure(panels, title, legend_handles(num_classes))
            self.written.append(save_figure(fig, self.folder / f"{_file_name(case.id)}.png"))
        self.num_classes = num_classes
        self._keep(_Tile(float(np.mean([r["dice"] for r in rows])), case.id, [row[0] for row in panels]))

    def _keep(self, tile: _Tile) -> None:
        self._tiles = sorted(self._tiles + [tile], key=lambda t: -t.dice)
        k = self.montage_cases
        if len(self._tiles) > 2 * k:
            self._tiles = self._tiles[:k] + self._tiles[-k:]

    def finish(self) -> Optional[Path]:
        """Write the montage (nothing when no case was seen); returns its path."""
        if not self._tiles or self.count <= 0:
            return None
        k = self.montage_cases
        best = self._tiles[:k]
        worst = [t for t in reversed(self._tiles) if t not in best][:k]
        rows = []
        for name, tiles in (("best", best), ("worst", worst)):
            for r in range(len(tiles[0].panels) if tiles else 0):
                rows.append([_tile_panel(t.panels[r], f"{name} {i + 1}: {t.case_id}, Dice {t.dice:.3f}")
                             for i, t in enumerate(tiles)])
        fig = grid_figure(rows, "the best and the worst cases by mean Dice", legend_handles(self.num_classes))
        path = save_figure(fig, self.folder / "montage.png")
        self.written.append(path)
        return path


def _tile_panel(panel: Panel, title: str) -> Panel:
    return Panel(panel.rgb, panel.extent, panel.xlabel, panel.ylabel, f"{title}\n{panel.title}")


def _file_name(case_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(case_id))


# ------------------------------------------------------------------------- uncertainty images

def entropy(probs: np.ndarray) -> np.ndarray:
    """``-sum_c p_c log(p_c + eps)`` over axis 0, as UnCL defines it (losses.md section 1)."""
    from dycon_kernels.reference import UNCL_EPS
    probs = np.asarray(probs, dtype=np.float64)
    return -(probs * np.log(probs + UNCL_EPS)).sum(axis=0)


def uncl_weight(student_probs: np.ndarray, teacher_probs: np.ndarray, beta: float) -> np.ndarray:
    """UnCL's voxel weight ``1 / (exp(beta H_s) + exp(beta H_t))`` (losses.md section 1): 1/2 where
    both are certain, smaller where either is unsure."""
    return np.exp(-np.logaddexp(beta * entropy(student_probs), beta * entropy(teacher_probs)))


def patch_grid_rgb(patch_labels: np.ndarray, background: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """FeCL's patch labels of a slice over ``background`` (RGB): lesion patches (label >= 1) tinted
    vermillion, background patches (0) blue, ignored ones (-1) left untinted; dark lines between
    patches. ``background``'s height and width must be multiples of the grid's."""
    patch_labels = np.asarray(patch_labels)
    rows, cols = background.shape[0] // patch_labels.shape[0], background.shape[1] // patch_labels.shape[1]
    if (rows * patch_labels.shape[0], cols * patch_labels.shape[1]) != background.shape[:2]:
        raise ValueError(f"image {background.shape[:2]} is not a whole multiple of the patch grid "
                         f"{patch_labels.shape}")
    labels = upsample(patch_labels, (rows, cols))
    out = background.astype(np.float64)
    for where, colour in ((labels >= 1, PATCH_COLOURS["lesion"]), (labels == 0, PATCH_COLOURS["background"])):
        out[where] = (1 - alpha) * out[where] + alpha * colour_rgb(colour)
    out = np.round(out).astype(np.uint8)
    out[::rows] = out[:, ::cols] = 0
    return out


def uncertainty_images(image: np.ndarray, label: np.ndarray, student_probs: np.ndarray,
                       teacher_probs: Optional[np.ndarray] = None, beta: Optional[float] = None,
                       loss_map: Optional[np.ndarray] = None, patch_labels: Optional[np.ndarray] = None,
                       reps: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
    """RGB (uint8, oriented as the module docstring says) pictures of one 2D slice ``(a, b)``:

    - ``image``: the image in grey with the ground-truth contour;
    - ``prediction``: the image with the ground-truth and the student's predicted contours;
    - ``teacher_entropy`` (with ``teacher_probs``): the teacher's entropy, 0 .. log C;
    - ``uncl_weight`` (with ``beta``): UnCL's voxel weight, 0 .. 1/2;
    - ``uncl_loss`` (with ``loss_map``): UnCL's per-voxel loss, 0 .. its maximum on the slice;
    - ``fecl_patches`` (with ``patch_labels``, the slice of the patch-label grid): ``patch_grid_rgb``.

    ``student_probs`` / ``teacher_probs``: ``(C, a, b)`` softmax probabilities; each pixel is
    repeated ``reps`` (rows, columns) times (default: about 192 pixels across).
    """
    image, label = np.asarray(image), np.asarray(label)
    reps = tuple(reps or pixel_reps(image.shape, target=192)[::-1])

    def shown(array):
        return upsample(orient(array), reps)

    width = contour_width(reps)
    grey = grey_rgb(shown(image), intensity_window(image))
    gt_edges = mask_edges(shown(label > 0), width, outside=True)
    out = {"image": paint(grey.copy(), gt_edges, GT_COLOUR)}
    pred_edges = mask_edges(shown(np.asarray(student_probs).argmax(0) > 0), width)
    out["prediction"] = paint(out["image"].copy(), pred_edges, PRED_COLOUR)
    if teacher_probs is not None:
        out["teacher_entropy"] = scalar_rgb(shown(entropy(teacher_probs)), 0.0, math.log(len(teacher_probs)))
        if beta is not None:
            out["uncl_weight"] = scalar_rgb(shown(uncl_weight(student_probs, teacher_probs, beta)), 0.0, 0.5)
    if loss_map is not None:
        out["uncl_loss"] = scalar_rgb(shown(loss_map), 0.0, float(np.max(loss_map)))
    if patch_labels is not None:
        out["fecl_patches"] = patch_grid_rgb(orient(patch_labels), grey)
    return out


def lesion_window(volume, patch_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """A ``patch_size`` window of a labelled volume centred on ``lesion_centre`` (zero-padded where
    the volume is smaller): (image ``(C, *patch)``, label ``patch``, the centre inside the window)."""
    patch = [int(p) for p in patch_size]
    pads = [(max(p - n, 0) // 2, max(p - n, 0) - max(p - n, 0) // 2) for p, n in zip(patch, volume.label.shape)]
    image = np.pad(volume.image, [(0, 0), *pads])
    label = np.pad(volume.label, pads)
    centre = lesion_centre(label)
    start = [min(max(c - p // 2, 0), n - p) for c, p, n in zip(centre, patch, label.shape)]
    window = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return image[(slice(None), *window)], label[window], tuple(c - s for c, s in zip(centre, start))


@contextmanager
def _eval_mode(*models):
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def validation_images(student, teacher, volume, cfg: dict, beta: Optional[float], device) -> dict[str, np.ndarray]:
    """``uncertainty_images`` of one labelled case at the current training state.

    The networks (in eval mode, restored afterwards) see one training-size window centred on the
    case's lesion; the pictures show the axial slice through the lesion's largest cross-section.
    ``teacher`` None (supervised runs): image and prediction only. ``beta`` (dycon runs): also
    UnCL's weight and loss maps, and FeCL's patch labels as the method derives them for an
    unlabelled volume (teacher-derived under the ``dycon`` preset, from the ground truth under
    ``official``, as the released code does).
    """
    import torch

    import dycon_kernels

    image, label, centre = lesion_window(volume, cfg["train"]["patch_size"])
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    models = [m for m in (student, teacher) if m is not None]
    with _eval_mode(*models), torch.no_grad():
        logits = [m(x)[0].float() for m in models]   # the networks return (logits, embeddings)
        probs = [lg.softmax(1)[0, ..., centre[2]].cpu().numpy() for lg in logits]
        extra = {}
        if teacher is not None and beta is not None:
            loss_map = dycon_kernels.uncl(logits[0], logits[1], beta, reduction="none",
                                          backend=cfg["train"]["kernel_backend"])
            extra = dict(beta=beta, loss_map=loss_map[0, ..., centre[2]].cpu().numpy(),
                         patch_labels=_patch_label_slice(label, logits[1], centre[2], cfg))
    return uncertainty_images(image[0, ..., centre[2]], label[..., centre[2]], probs[0],
                              probs[1] if teacher is not None else None, **extra)


def _patch_label_slice(label: np.ndarray, teacher_logits: torch.Tensor, z: int, cfg: dict) -> np.ndarray:
    """FeCL's patch labels of the window, treated as an unlabelled volume: the slice of the patch
    grid that holds voxel slice ``z``."""
    import torch

    from dycon.losses import patch_grid, patch_labels_dycon, patch_labels_official   # training code

    grid = patch_grid(cfg)
    labels = torch.from_numpy(label.astype(np.int64))[None].to(teacher_logits.device)
    if cfg["train"]["preset"] == "official":
        patches = patch_labels_official(labels, grid)
    else:
        patches = patch_labels_dycon(labels, teacher_logits.softmax(1), 0, grid, cfg["loss"])
    return patches.view(*grid).cpu().numpy()[..., z * grid[2] // label.shape[2]]


# ------------------------------------------------------------------------------------ curves

LOSS_TERMS = ("total", "sup", "mse", "uncl", "fecl")


def read_metrics(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The columns of a ``metrics.csv`` as ``{name: (steps, values)}``, empty cells left out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file {path} (is it a run directory?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for name in (rows[0].keys() if rows else ()):
        if name == "step":
            continue
        pairs = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in ("", None)]
        if pairs:
            steps, values = zip(*pairs)
            columns[name] = (np.array(steps), np.array(values))
    return columns


def _plot_series(ax, series, label: str, ylabel: str, log_scale: bool = False) -> None:
    steps, values = series
    ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_scale and np.all(values > 0):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _constant_axis(ax, value: float) -> None:
    """A constant series (a fixed learning rate or beta) as a line in the middle of a plain
    axis, with its value written: matplotlib's own limits for a flat line are +-0.05 around it
    with an offset label, ticks that read as noise."""
    pad = abs(value) / 2 or 1.0
    ax.set_ylim(value - pad, value + pad)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    ax.text(0.5, 0.6, f"constant: {value:g}", ha="center", transform=ax.transAxes)


def curves_figure(metrics: dict, title: str = "") -> Figure:
    """One run's curves: each loss term, beta, learning rate and validation Dice over steps."""
    fig = Figure(figsize=(10, 7), dpi=DPI, layout="constrained")
    (losses, dice), (beta, lr) = fig.subplots(2, 2)
    for term in LOSS_TERMS:
        if term in metrics:
            _plot_series(losses, metrics[term], term, "loss", log_scale=True)
    if losses.lines:
        losses.legend(fontsize=8)
    losses.set_title("training losses")
    for ax, key, name in ((dice, "val_dice", "validation Dice"), (beta, "beta", "UnCL beta"),
                          (lr, "lr", "learning rate")):
        if key in metrics:
            _plot_series(ax, metrics[key], key, name)
            values = metrics[key][1]
            if np.all(values == values[0]):
                _constant_axis(ax, float(values[0]))
        else:
            ax.text(0.5, 0.5, f"no {name} in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
    fig.suptitle(title)
    return fig


def write_curves(run_dir: str | Path) -> Path:
    """``RUN_DIR/curves.png`` from ``RUN_DIR/metrics.csv``; returns its path."""
    run_dir = Path(run_dir)
    fig = curves_figure(read_metrics(run_dir / "metrics.csv"), run_dir.name)
    return save_figure(fig, run_dir / "curves.png")


def runs_figure(run_dirs: Sequence[str | Path]) -> Figure:
    """Validation Dice and total loss of several runs, one line each, labelled by run name."""
    fig = Figure(figsize=(11, 4.5), dpi=DPI, layout="constrained")
    dice, loss = fig.subplots(1, 2)
    for run_dir in run_dirs:
        metrics, name = read_metrics(Path(run_dir) / "metrics.csv"), Path(run_dir).resolve().name
        for ax, key, ylabel in ((dice, "val_dice", "validation Dice"), (loss, "total", "total loss")):
            if key in metrics:
                _plot_series(ax, metrics[key], name, ylabel, log_scale=key == "total")
    for ax, name in ((dice, "validation Dice"), (loss, "total training loss")):
        ax.set_title(name)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig
