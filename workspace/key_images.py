"""Key images, rendered server-side as PNG: a T2W, ADC or high-b slice with the gland contour
(green) and the AI lesion outlines (red, the selected lesion in yellow) from the study's SEG.

Inputs are looked up in the index by the caller, never built from a request field: the
instance paths the index holds and the SEG among the documents it sent to PACS. ADC and high-b
are resampled onto the T2W grid (the SEG's grid), so one slice index means the same anatomy in
all three. The key slice of a lesion is the T2W slice where its outline has the largest area
(the SEG carries the lesion, not its likelihood map). Volumes and PNGs are cached (LRU).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from core.domain import SeriesRole, Volume

ROLES = (SeriesRole.T2W, SeriesRole.ADC, SeriesRole.HBV)
GLAND_COLOUR = (0, 220, 90)
LESION_COLOUR = (255, 60, 60)
SELECTED_COLOUR = (255, 220, 0)
SCALE = 3  # upscale factor (nearest neighbour): a 64 px phantom slice becomes 192 px


@dataclass
class StudyImages:
    """The three series on the T2W grid and the SEG masks, ready to render."""

    volumes: dict[SeriesRole, np.ndarray]  # [z, y, x] float32 on the T2W grid
    windows: dict[SeriesRole, tuple[float, float]]
    gland: np.ndarray | None  # bool [z, y, x]
    lesions: list[np.ndarray] = field(default_factory=list)  # bool [z, y, x], AI lesion 1..n

    @property
    def slices(self) -> int:
        return int(self.volumes[SeriesRole.T2W].shape[0])

    def key_slices(self) -> list[int]:
        """Per lesion, the slice where its outline is largest."""
        return [int(np.argmax(m.sum(axis=(1, 2)))) for m in self.lesions]

    def default_slice(self) -> int:
        keys = self.key_slices()
        if keys:
            return keys[0]
        if self.gland is not None and self.gland.any():
            return int(np.argmax(self.gland.sum(axis=(1, 2))))
        return self.slices // 2


def read_seg_masks(
    seg_path: Path, t2w_headers: Sequence[Any], t2w: Volume
) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """(gland mask, lesion masks) on the T2W grid from a SEG written by `dicom_node.seg`."""
    import pydicom

    from imaging.seg_frames import GLAND_LABEL, segment_masks

    seg = pydicom.dcmread(seg_path)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    masks = segment_masks(seg, t2w_headers, t2w, strict=False)
    gland = next((masks[n] for n, label in labels.items() if label == GLAND_LABEL), None)
    lesions = [masks[n] for n, label in sorted(labels.items()) if label != GLAND_LABEL]
    return gland, lesions


def load_study_images(instance_paths: list[Path], seg_path: Path | None) -> StudyImages:
    from imaging.study_reader import scan_study
    from imaging.study_volumes import load_study_volumes
    from models.preprocessing import resample_to_reference

    volumes = load_study_volumes(scan_study(instance_paths))
    t2w = volumes.t2w
    arrays: dict[SeriesRole, np.ndarray] = {SeriesRole.T2W: t2w.array.astype(np.float32)}
    for role in (SeriesRole.ADC, SeriesRole.HBV):
        arrays[role] = resample_to_reference(volumes.volume(role), t2w).array
    windows = {
        role: (float(np.percentile(a, 1)), float(np.percentile(a, 99.5)))
        for role, a in arrays.items()
    }
    gland: np.ndarray | None = None
    lesions: list[np.ndarray] = []
    if seg_path is not None and seg_path.is_file():
        gland, lesions = read_seg_masks(seg_path, volumes.headers[SeriesRole.T2W], t2w)
    return StudyImages(arrays, windows, gland, lesions)


def _outline(mask: np.ndarray) -> np.ndarray:
    """A 2-pixel line along the inside of the mask's border."""
    return mask & ~ndimage.binary_erosion(mask, iterations=2)


def render_png(images: StudyImages, role: SeriesRole, z: int, selected: int | None) -> bytes:
    """One slice as PNG with the contours drawn on (upscaled by `SCALE`)."""
    if not 0 <= z < images.slices:
        raise IndexError(f"slice {z} is outside 0..{images.slices - 1}")
    lo, hi = images.windows[role]
    plane = images.volumes[role][z]
    grey = np.clip((plane - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    grey = np.kron(grey, np.ones((SCALE, SCALE)))
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)

    def draw(mask2d: np.ndarray, colour: tuple[int, int, int]) -> None:
        big = np.kron(mask2d, np.ones((SCALE, SCALE), dtype=bool)).astype(bool)
        rgb[_outline(big)] = colour

    if images.gland is not None:
        draw(images.gland[z], GLAND_COLOUR)
    for i, lesion in enumerate(images.lesions):
        draw(lesion[z], SELECTED_COLOUR if i == selected else LESION_COLOUR)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class KeyImageCache:
    """Loaded studies (few, they are large) and rendered PNGs (many, they are small), keyed by
    a version string (UID and report time: a re-analysed study gets a new key)."""

    def __init__(self, studies: int = 4, pngs: int = 512) -> None:
        self._studies: OrderedDict[str, StudyImages] = OrderedDict()
        self._pngs: OrderedDict[tuple[str, str, int, int | None], bytes] = OrderedDict()
        self._max_studies = studies
        self._max_pngs = pngs
        self._lock = threading.Lock()

    def study(self, key: str, load: Callable[[], StudyImages]) -> StudyImages:
        with self._lock:
            if key in self._studies:
                self._studies.move_to_end(key)
                return self._studies[key]
        images = load()  # slow: outside the lock
        with self._lock:
            self._studies[key] = images
            while len(self._studies) > self._max_studies:
                self._studies.popitem(last=False)
        return images

    def png(
        self,
        key: str,
        load: Callable[[], StudyImages],
        role: SeriesRole,
        z: int,
        selected: int | None,
    ) -> bytes:
        png_key = (key, role.value, z, selected)
        with self._lock:
            if png_key in self._pngs:
                self._pngs.move_to_end(png_key)
                return self._pngs[png_key]
        data = render_png(self.study(key, load), role, z, selected)
        with self._lock:
            self._pngs[png_key] = data
            while len(self._pngs) > self._max_pngs:
                self._pngs.popitem(last=False)
        return data
