"""Synthetic bi-parametric prostate MRI in memory: anatomy, contrasts, noise, ground truth.

All structures are analytic shapes in LPS patient millimetres, evaluated on each acquisition grid
(T2W: fine in-plane; DWI: coarse), so the series of one case agree geometrically like a real exam:
they share the Frame of Reference and the slight obliquity of the slice stack.

Contrasts follow the biology the models must learn: tumour is dark on T2W, has restricted diffusion
(low ADC) and so is bright at high b; the higher the ISUP grade the stronger. ISUP 1 lesions and
prostatitis patches are subtle look-alikes without the csPCa label (false-positive traps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage

from core.domain import Volume

VENDORS = ("siemens", "ge", "philips")
ACQUIRED_B_VALUES = (50, 400, 800)
HIGH_B_VALUE = 1400
_VENDOR_SCALE = {"siemens": 1.0, "ge": 2.6, "philips": 1.5}  # T2W receiver scaling
_UID_PREFIX = "1.2.826.0.1.3680043.10.1082."  # under pydicom's root; phantoms only

# ADC (1e-6 mm^2/s) of each lesion grade in the peripheral zone; TZ is ~10% lower.
_LESION_ADC = {1: 1250.0, 2: 1050.0, 3: 950.0, 4: 850.0, 5: 760.0}
# Multiplicative T2W signal of a lesion relative to the tissue it replaces.
_LESION_T2 = {1: 0.85, 2: 0.68, 3: 0.6, 4: 0.52, 5: 0.46}


@dataclass(frozen=True)
class PhantomLesion:
    """One ground-truth lesion: `label` is its value in `PhantomCase.lesion_mask`."""

    label: int
    isup: int  # 1..5; clinically significant (csPCa) when >= 2
    zone: str  # "pz" | "tz"
    centroid_mm: tuple[float, float, float]  # LPS, from the mask
    volume_ml: float  # from the mask

    @property
    def is_cspca(self) -> bool:
        return self.isup >= 2


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One synthetic exam with its ground truth, all volumes sharing one Frame of Reference."""

    seed: int
    case_id: str
    vendor: str
    study_instance_uid: str
    t2w: Volume  # axial T2W, float32 (integral values, as stored)
    adc: Volume  # ADC in 1e-6 mm^2/s on the DWI grid
    hbv: Volume  # computed b1400 on the DWI grid
    dwi: dict[int, Volume]  # acquired b-values on the DWI grid
    gland_mask: Volume  # uint8 0/1 on the T2W grid
    zone_mask: Volume  # uint8 0 background, 1 PZ, 2 TZ on the T2W grid
    lesion_mask: Volume  # uint8 labels 1..n on the T2W grid
    lesions: tuple[PhantomLesion, ...]
    age: int
    psa: float
    _anatomy: Any = field(default=None, repr=False)  # for rendering further views (distractors)

    @property
    def is_cspca(self) -> bool:
        return any(lesion.is_cspca for lesion in self.lesions)

    @property
    def gland_volume_ml(self) -> float:
        return float(np.count_nonzero(self.gland_mask.array)) * self.gland_mask.voxel_volume_ml

    @property
    def frame_of_reference_uid(self) -> str:
        return self.t2w.frame_of_reference_uid

    def uid(self, name: str) -> str:
        """A deterministic UID for `name` (a series or instance key) within this case."""
        return case_uid(self.seed, self.vendor, self.case_id, name)


def case_uid(seed: int, vendor: str, case_id: str, name: str) -> str:
    return str(generate_uid(_UID_PREFIX, entropy_srcs=[str(seed), vendor, case_id, name]))


# --- grids ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """An acquisition grid: size/spacing (x, y, z), origin, direction (columns = axes, LPS)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray  # 3x3, columns are the x, y, z voxel axes

    @classmethod
    def centred(
        cls,
        centre: np.ndarray,
        size: tuple[int, int, int],
        spacing: tuple[float, float, float],
        direction: np.ndarray,
    ) -> Grid:
        half = (np.asarray(size, float) - 1) / 2 * np.asarray(spacing)
        return cls(size, spacing, centre - direction @ half, direction)

    def points(self, box: tuple[slice, slice, slice] | None = None) -> list[np.ndarray]:
        """LPS coordinates (3 arrays [z, y, x], float32) of voxel centres, optionally in `box`."""
        zs, ys, xs = box or (slice(0, self.size[2]), slice(0, self.size[1]), slice(0, self.size[0]))
        i = np.arange(xs.start, xs.stop, dtype=np.float32) * self.spacing[0]
        j = np.arange(ys.start, ys.stop, dtype=np.float32) * self.spacing[1]
        k = np.arange(zs.start, zs.stop, dtype=np.float32) * self.spacing[2]
        d = self.direction.astype(np.float32)
        o = self.origin.astype(np.float32)
        return [
            o[c]
            + d[c, 0] * i[None, None, :]
            + d[c, 1] * j[None, :, None]
            + d[c, 2] * k[:, None, None]
            for c in range(3)
        ]

    def box(self, centre: np.ndarray, radii: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box [z, y, x] covering an axis-aligned (LPS) ellipsoid; None when it misses."""
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        pts = np.asarray(centre) + corners * np.asarray(radii)
        idx = (pts - self.origin) @ self.direction / np.asarray(self.spacing)
        lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 2, self.size)
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def volume(self, array: np.ndarray, series_uid: str = "", for_uid: str = "") -> Volume:
        return Volume(
            array,
            self.spacing,
            tuple(float(v) for v in self.origin),
            tuple(float(v) for v in self.direction.ravel()),
            series_uid,
            for_uid,
        )


def _rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    rx, ry, rz = (math.radians(v) for v in (rx_deg, ry_deg, rz_deg))
    mx = np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    my = np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
    mz = np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
    return mz @ my @ mx


# --- anatomy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    centre: np.ndarray
    radii: np.ndarray  # semi-axes along LPS x, y, z, mm

    def q(self, p: list[np.ndarray]) -> np.ndarray:
        """Normalised radius: < 1 inside."""
        c, r = self.centre.astype(np.float32), self.radii.astype(np.float32)
        s = ((p[0] - c[0]) / r[0]) ** 2 + ((p[1] - c[1]) / r[1]) ** 2 + ((p[2] - c[2]) / r[2]) ** 2
        return np.sqrt(s)

    def soft(self, p: list[np.ndarray], edge_mm: float = 1.0) -> np.ndarray:
        """Partial-volume membership 0..1 with a linear edge about `edge_mm` wide."""
        mean_r = float(np.mean(self.radii))
        return np.clip((1.0 - self.q(p)) * (mean_r / edge_mm) + 0.5, 0.0, 1.0)

    @property
    def extent(self) -> float:
        return float(np.max(self.radii))


@dataclass(frozen=True)
class _Anatomy:
    """Tissue layout of one patient, plus per-tissue (T2W, S0, ADC) properties."""

    gland: _Ellipsoid
    tz: _Ellipsoid
    structures: tuple[tuple[str, _Ellipsoid], ...]  # drawn in order, later on top
    lesions: tuple[tuple[int, _Ellipsoid], ...]  # (isup, shape)
    mimics: tuple[_Ellipsoid, ...]  # prostatitis / BPH-nodule look-alikes, unlabelled
    waves: np.ndarray  # (n, 4): kx, ky, kz, phase of smooth texture inside the gland
    tissue: dict[str, tuple[float, float, float]]  # name -> (T2W, S0 at b0, ADC)
    conspicuity: float = 1.0  # 1: lesion contrast as graded; < 1: closer to the tissue it replaces


FAMILIES = ("standard", "randomised")


@dataclass(frozen=True)
class DomainRanges:
    """What a phantom family draws: `standard` is the fixed family tests and the demo use;
    `randomised` widens every axis the issue names (domain randomisation for training).

    Randomised values come from their own generator, so `standard` cases never change.
    """

    gland_ml: tuple[float, float] = (20.0, 80.0)
    shape_jitter: float = 0.08  # per-axis semi-axis factor 1 +- this
    zonal_jitter: tuple[float, float] = (0.08, 0.06)  # PZ/TZ (T2W, ADC) relative jitter
    cspca_ml: tuple[float, float] = (0.35, 2.5)  # lesion volume (log-uniform when randomised)
    conspicuity: tuple[float, float] = (1.0, 1.0)
    bias: tuple[float, float] = (0.25, 0.25)  # T2W coil-bias strength (DWI: 0.8x)
    noise_factor: tuple[float, float] = (1.0, 1.0)
    slice_mm: tuple[float, ...] = (3.0,)
    inplane_mm: tuple[float, ...] = (0.5, 0.5, 0.5625, 0.625)
    dwi_mm: tuple[float, ...] = (1.75, 2.0, 2.0, 2.2)
    tilt_deg: tuple[float, float, float] = (8.0, 3.0, 3.0)
    intensity_factor: tuple[float, float] = (1.0, 1.0)  # extra receiver scaling (x vendor)
    log_uniform_lesions: bool = False


STANDARD = DomainRanges()
RANDOMISED = DomainRanges(
    gland_ml=(15.0, 110.0),
    shape_jitter=0.2,
    zonal_jitter=(0.25, 0.12),
    cspca_ml=(0.1, 3.0),
    conspicuity=(0.55, 1.0),
    bias=(0.05, 0.45),
    noise_factor=(0.5, 2.2),
    slice_mm=(3.0, 3.0, 3.5, 4.0),
    inplane_mm=(0.4, 0.5, 0.5625, 0.625, 0.7, 0.8),
    dwi_mm=(1.6, 1.75, 2.0, 2.2, 2.5, 2.8),
    tilt_deg=(20.0, 8.0, 8.0),
    intensity_factor=(0.45, 1.5),
    log_uniform_lesions=True,
)
_RANGES = {"standard": STANDARD, "randomised": RANDOMISED}


def _tissues(
    rng: np.random.Generator, zonal: tuple[float, float] = STANDARD.zonal_jitter
) -> dict[str, tuple[float, float, float]]:
    j = lambda v, f=0.08: float(v * (1 + rng.uniform(-f, f)))  # noqa: E731
    tissues = {
        "fat": (j(720), j(90), j(300, 0.3)),
        "muscle": (j(210), j(520), j(1450)),
        "bone": (j(90), j(120), j(500, 0.3)),
        "marrow": (j(480), j(150), j(600, 0.3)),
        "bladder": (j(950, 0.04), j(1100), j(2900, 0.04)),
        "rectal_wall": (j(260), j(700), j(1350)),
        "rectal_lumen": (j(60, 0.5), j(80, 0.5), j(1800, 0.3)),
        "vesicle": (j(850), j(950), j(2200)),
        "vessel": (j(120), j(200), j(2200)),
        "pz": (j(560), j(1000), j(1700, 0.06)),
        "tz": (j(330), j(950), j(1300, 0.06)),
        "urethra": (j(620), j(900), j(1900)),
        "mimic": (j(340), j(900), j(1350)),
    }
    if zonal != STANDARD.zonal_jitter:  # randomised zonal contrast, from the same draws
        (pz_t2, pz_s0, pz_adc), (tz_t2, tz_s0, tz_adc) = tissues["pz"], tissues["tz"]
        t2f, adcf = zonal[0] / 0.08, zonal[1] / 0.06
        tissues["pz"] = (560 + (pz_t2 - 560) * t2f, pz_s0, 1700 + (pz_adc - 1700) * adcf)
        tissues["tz"] = (330 + (tz_t2 - 330) * t2f, tz_s0, 1300 + (tz_adc - 1300) * adcf)
    return tissues


def _draw_anatomy(
    rng: np.random.Generator, centre: np.ndarray, ranges: DomainRanges = STANDARD
) -> tuple[_Ellipsoid, _Ellipsoid, tuple[tuple[str, _Ellipsoid], ...]]:
    lo, hi = ranges.gland_ml
    volume_ml = lo + (hi - lo) * float(rng.uniform(0.0, 1.0))
    # Semi-axes with realistic proportions (LR > SI > AP), scaled to the drawn volume.
    jitter = rng.uniform(0.92, 1.08, 3)
    if ranges.shape_jitter != STANDARD.shape_jitter:
        jitter = 1.0 + (jitter - 1.0) * (ranges.shape_jitter / STANDARD.shape_jitter)
    shape = np.array([1.0, 0.68, 0.82]) * jitter
    scale = (volume_ml * 1000.0 / (4.0 / 3.0 * math.pi * float(np.prod(shape)))) ** (1 / 3)
    radii = shape * scale
    gland = _Ellipsoid(centre, radii)
    tz_frac = float(np.clip(0.5 + 0.25 * (volume_ml - 20.0) / 60.0, 0.4, 0.85))  # BPH: bigger TZ
    tz = _Ellipsoid(
        centre + np.array([0.0, -0.28 * radii[1], 0.12 * radii[2]]),
        radii * np.array([0.72, 0.68, 0.78]) * tz_frac**0.5,
    )
    a, b, c = radii
    side = 1 if rng.random() < 0.5 else -1

    def at(offset: list[float], radii: list[float]) -> _Ellipsoid:
        return _Ellipsoid(centre + np.array(offset), np.array(radii))

    structures: list[tuple[str, _Ellipsoid]] = [
        ("fat", at([0, -10, 0], [a + 150, b + 110, 300.0])),
        ("muscle", at([0, 5, 0], [a + 75, b + 70, 200.0])),
        ("fat", at([0, 0, 0], [a + 28, b + 22, 200.0])),
        ("muscle", at([a + 38, 3, 0], [14.0, 32.0, 200.0])),
        ("muscle", at([-a - 38, 3, 0], [14.0, 32.0, 200.0])),
        ("bone", at([a + 62, 0, 0], [10.0, 40.0, 200.0])),
        ("bone", at([-a - 62, 0, 0], [10.0, 40.0, 200.0])),
        ("bone", at([0, -b - 30, 10], [26.0, 9.0, 24.0])),
        ("marrow", at([0, -b - 30, 10], [22.0, 6.0, 21.0])),
        ("bladder", at([0, -8, c + 32], [45.0, 35.0, 30.0])),
        ("vesicle", at([side * 14, b * 0.9, c + 6], [16.0, 6.0, 8.0])),
        ("vesicle", at([-side * 15, b * 0.9, c + 5], [15.0, 6.0, 8.0])),
        ("vessel", at([a * 0.75, b * 0.75, 0], [3.0, 3.0, 60.0])),
        ("vessel", at([-a * 0.75, b * 0.75, 0], [3.0, 3.0, 60.0])),
    ]
    lumen_r = float(rng.uniform(4.0, 11.0))
    rectum_c = centre + np.array([rng.uniform(-4, 4), b + 16.0, 0.0])
    structures += [
        ("rectal_wall", _Ellipsoid(rectum_c, np.array([20.0, 14.0, 200.0]))),
        ("rectal_lumen", _Ellipsoid(rectum_c, np.array([lumen_r * 1.5, lumen_r, 200.0]))),
    ]
    return gland, tz, tuple(structures)


def _place_lesions(
    rng: np.random.Generator,
    gland: _Ellipsoid,
    tz: _Ellipsoid,
    grades: list[int],
    ranges: DomainRanges = STANDARD,
) -> tuple[tuple[int, _Ellipsoid], ...]:
    placed: list[tuple[int, _Ellipsoid]] = []
    lo, hi = ranges.cspca_ml
    for isup in grades:
        in_pz = rng.random() < 0.7
        if isup < 2:
            vol = rng.uniform(0.15, 0.7)
        elif ranges.log_uniform_lesions:
            vol = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        else:
            vol = rng.uniform(lo, hi)
        r = (vol * 1000 * 3 / (4 * math.pi)) ** (1 / 3)
        radii = r * rng.uniform(0.8, 1.2, 3)
        for _ in range(200):
            u = rng.uniform(-1, 1, 3)
            if np.linalg.norm(u) > 1:
                continue
            p = gland.centre + u * gland.radii * 0.85
            q_tz = float(tz.q([np.float32(v) for v in p]))
            zone_ok = (q_tz > 1.15 and p[1] > tz.centre[1]) if in_pz else q_tz < 0.75
            far = all(np.linalg.norm(p - e.centre) > r + e.extent + 2 for _, e in placed)
            if zone_ok and far:
                placed.append((isup, _Ellipsoid(p, radii)))
                break
    return tuple(placed)


def _grades(rng: np.random.Generator, cspca: bool) -> list[int]:
    if cspca:
        n = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
        first = int(rng.choice([2, 3, 4, 5], p=[0.4, 0.3, 0.18, 0.12]))
        rest = [int(rng.choice([1, 2, 3, 4], p=[0.45, 0.3, 0.15, 0.1])) for _ in range(n - 1)]
        return [first, *rest]
    n = int(rng.choice([0, 1, 2], p=[0.5, 0.38, 0.12]))
    return [1] * n


def _texture(an: _Anatomy, p: list[np.ndarray]) -> np.ndarray:
    t = np.zeros(p[0].shape, np.float32)
    for kx, ky, kz, ph in an.waves:
        t += np.cos(np.float32(kx) * p[0] + np.float32(ky) * p[1] + np.float32(kz) * p[2] + ph)
    return t / max(1.0, math.sqrt(len(an.waves)))


def _render(
    an: _Anatomy, grid: Grid, channel: int, edge_mm: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Tissue property `channel` (0 T2W, 1 S0, 2 ADC) on `grid`; also the gland-box masks."""
    nz, ny, nx = grid.size[2], grid.size[1], grid.size[0]
    out = np.zeros((nz, ny, nx), np.float32)
    for name, shape in an.structures:
        sbox = grid.box(shape.centre, shape.radii + 2)
        if sbox is None:
            continue
        m = shape.soft(grid.points(sbox), edge_mm)
        out[sbox] += (an.tissue[name][channel] - out[sbox]) * m
    # Gland, zones, urethra, mimics, lesions: only inside the gland's box.
    box = grid.box(an.gland.centre, an.gland.radii + 3)
    masks: dict[str, np.ndarray] = {}
    if box is None:
        return out, masks
    p = grid.points(box)
    sub = out[box]
    g = an.gland.soft(p, edge_mm)
    t_in = an.tz.soft(p, edge_mm)
    anterior = (p[1] < np.float32(an.tz.centre[1])).astype(np.float32)
    tz_m = np.maximum(t_in, anterior) * g  # anterior stroma counted with the TZ
    pz_m = g - tz_m
    tex = _texture(an, p)
    pz_v, tz_v = an.tissue["pz"][channel], an.tissue["tz"][channel]
    amp = 0.06 if channel != 2 else 0.03
    gland_val = (pz_m * pz_v + tz_m * tz_v) * (1 + amp * tex) / np.maximum(g, 1e-6)
    sub += (gland_val - sub) * g
    ur = _Ellipsoid(an.tz.centre + np.array([0, 2, 0]), np.array([2.2, 2.2, 80.0]))
    sub += (an.tissue["urethra"][channel] - sub) * ur.soft(p, edge_mm) * g
    for mimic in an.mimics:
        sub += (an.tissue["mimic"][channel] - sub) * mimic.soft(p, 2.5) * g * 0.8
    lesion_hard = np.zeros(sub.shape, np.uint8)
    for label, (isup, shape) in enumerate(an.lesions, start=1):
        m = shape.soft(p, edge_mm) * g
        in_tz = float(an.tz.q([np.float32(v) for v in shape.centre])) < 1.0
        if channel == 0:
            target = sub * _LESION_T2[isup]
        elif channel == 1:
            target = sub * 0.95
        else:
            target = np.float32(_LESION_ADC[isup] * (0.9 if in_tz else 1.0))
        sub += (target - sub) * m * np.float32(an.conspicuity)
        lesion_hard[(m >= 0.5) & (lesion_hard == 0)] = label
    out[box] = sub
    masks = {"box": box, "gland": g >= 0.5, "tz": tz_m >= 0.5 * g, "lesion": lesion_hard}
    return out, masks


def _bias(grid: Grid, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative coil sensitivity over the grid (low-order polynomial)."""
    nz, ny, nx = grid.size[2], grid.size[1], grid.size[0]
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32) for n in (nz, ny, nx))
    c = (rng.uniform(-1, 1, 6) * strength).astype(np.float32)
    f = (
        1
        + c[0] * x[None, None, :]
        + c[1] * y[None, :, None]
        + c[2] * z[:, None, None]
        + c[3] * x[None, None, :] ** 2
        + c[4] * y[None, :, None] ** 2
        + c[5] * (x[None, None, :] * y[None, :, None])
    )
    return np.clip(f, np.float32(0.5), np.float32(1.6))


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt((signal + n1) ** 2 + n2**2)


# --- public --------------------------------------------------------------------------------


def _rng(*parts: object) -> np.random.Generator:
    key = "|".join(str(p) for p in parts).encode()
    return np.random.default_rng(list(key))


def synthesize_case(
    seed: int, *, vendor: str = "siemens", cspca: bool | None = None, family: str = "standard"
) -> PhantomCase:
    """One synthetic bpMRI case, deterministic by (seed, vendor, cspca, family).

    `cspca=None` draws the label with ~40% prevalence; True guarantees >= 1 lesion with ISUP >= 2;
    False gives no lesion or only ISUP 1 lesions. Anatomy depends on `seed` (and the label), not
    on `vendor`, which changes intensity scaling and acquisition details. `family="randomised"`
    draws anatomy, contrast, lesion size/conspicuity and acquisition from `RANDOMISED`.
    """
    if vendor not in VENDORS:
        raise ValueError(f"vendor must be one of {VENDORS}, got {vendor!r}")
    if family not in _RANGES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    ranges = _RANGES[family]
    dom = _rng("domain", seed, vendor, cspca, family)  # unused draws for "standard"
    if cspca is None:
        cspca = bool(_rng("label", seed).random() < 0.4)
    rng = _rng("anatomy", seed, cspca)
    acq = _rng("acquisition", seed, vendor, cspca)
    case_id = f"phantom-{seed:06d}" if seed >= 0 else f"phantom-n{-seed:06d}"

    centre = np.array([rng.uniform(-8, 8), rng.uniform(-6, 10), rng.uniform(-40, 40)])
    gland, tz, structures = _draw_anatomy(rng, centre, ranges)
    lesions = _place_lesions(rng, gland, tz, _grades(rng, cspca), ranges)
    mimics = tuple(
        _Ellipsoid(
            gland.centre + rng.uniform(-0.6, 0.6, 3) * gland.radii + [0, 0.3 * gland.radii[1], 0],
            rng.uniform(2.5, 6.0, 3) * [1.6, 0.7, 1.0],
        )
        for _ in range(int(rng.integers(0, 3)))
    )
    n_waves = 4
    k = rng.normal(size=(n_waves, 3))
    k = k / np.linalg.norm(k, axis=1, keepdims=True) * rng.uniform(0.3, 1.2, (n_waves, 1))
    waves = np.concatenate([k, rng.uniform(0, 2 * math.pi, (n_waves, 1))], axis=1)
    tissues = _tissues(rng, ranges.zonal_jitter)
    conspicuity = float(dom.uniform(*ranges.conspicuity))
    anatomy = _Anatomy(gland, tz, structures, lesions, mimics, waves, tissues, conspicuity)

    # Shared slice-stack obliquity (a few degrees), as planned on the localizer.
    tilt = [rng.uniform(-t, t) for t in (8.0, 3.0, 3.0)]
    if family != "standard":
        tilt = [dom.uniform(-t, t) for t in ranges.tilt_deg]
    direction = _rotation(*tilt)
    fov_centre = centre + rng.uniform(-6, 6, 3)
    n_slices = int(rng.integers(18, 25))
    inplane = float(acq.choice(list(STANDARD.inplane_mm)))
    slice_mm = 3.0
    if family != "standard":
        inplane = float(dom.choice(list(ranges.inplane_mm)))
        slice_mm = float(dom.choice(list(ranges.slice_mm)))
        n_slices = max(14, round(n_slices * 3.0 / slice_mm))
    fov = float(acq.uniform(160, 200))
    n_xy = round(fov / inplane / 16) * 16
    t2_grid = Grid.centred(
        fov_centre, (n_xy, n_xy, n_slices), (inplane, inplane, slice_mm), direction
    )
    dwi_sp = float(acq.choice(list(STANDARD.dwi_mm)))
    if family != "standard":
        dwi_sp = float(dom.choice(list(ranges.dwi_mm)))
    dwi_nx = round(acq.uniform(230, 270) / dwi_sp / 2) * 2
    dwi_ny = round(dwi_nx * acq.uniform(0.62, 0.8) / 2) * 2
    dwi_size = (dwi_nx, dwi_ny, n_slices)
    dwi_grid = Grid.centred(fov_centre, dwi_size, (dwi_sp, dwi_sp, slice_mm), direction)

    study_uid = case_uid(seed, vendor, case_id, f"study|{cspca}")
    for_uid = case_uid(seed, vendor, case_id, f"frame|{cspca}")
    suid = lambda key: case_uid(seed, vendor, case_id, f"series|{key}|{cspca}")  # noqa: E731
    scale = _VENDOR_SCALE[vendor] * float(dom.uniform(*ranges.intensity_factor))
    bias = float(dom.uniform(*ranges.bias))
    noise = float(dom.uniform(*ranges.noise_factor))

    # T2W: tissue contrast x bias field + Rician noise.
    t2, masks = _render(anatomy, t2_grid, 0, edge_mm=0.8)
    t2 = t2 * _bias(t2_grid, acq, bias) * np.float32(scale)
    t2 = _rician(t2, float(acq.uniform(10, 18)) * scale * noise, acq)
    t2 = np.round(np.clip(t2, 0, 4095)).astype(np.float32)

    # DWI: S0 and ADC on the coarse grid, blurred to EPI resolution, signal per b-value.
    s0, _ = _render(anatomy, dwi_grid, 1, edge_mm=2.0)
    adc_true, _ = _render(anatomy, dwi_grid, 2, edge_mm=2.0)
    s0 = ndimage.gaussian_filter(s0, (0.3, 0.7, 0.7)) * _bias(dwi_grid, acq, bias * 0.8)
    adc_true = ndimage.gaussian_filter(adc_true, (0.3, 0.7, 0.7))
    sigma = float(acq.uniform(10, 16)) * noise
    dwi: dict[int, np.ndarray] = {}
    for b in ACQUIRED_B_VALUES:
        signal = s0 * np.exp(-np.float32(b) * adc_true * np.float32(1e-6))
        dwi[b] = np.round(np.clip(_rician(signal, sigma, acq), 0, 4095)).astype(np.float32)
    adc, hbv = _fit_adc(dwi)

    # Ground truth on the T2W grid.
    shape_zyx = t2.shape
    gland_m = np.zeros(shape_zyx, np.uint8)
    zone_m = np.zeros(shape_zyx, np.uint8)
    lesion_m = np.zeros(shape_zyx, np.uint8)
    if masks:
        box = masks["box"]
        gland_m[box] = masks["gland"]
        zone_m[box] = np.where(masks["gland"], np.where(masks["tz"], 2, 1), 0)
        lesion_m[box] = np.where(masks["gland"], masks["lesion"], 0)
    t2_vol = t2_grid.volume(t2, suid("t2w"), for_uid)
    truth: list[PhantomLesion] = []
    for label, (isup, _shape) in enumerate(anatomy.lesions, start=1):
        idx = np.argwhere(lesion_m == label)
        if len(idx) == 0:
            continue
        centroid = t2_vol.index_to_lps(idx[:, ::-1].mean(axis=0))
        zones = zone_m[lesion_m == label]
        zone = "tz" if np.count_nonzero(zones == 2) > len(zones) / 2 else "pz"
        truth.append(
            PhantomLesion(
                label=label,
                isup=isup,
                zone=zone,
                centroid_mm=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                volume_ml=float(len(idx)) * t2_vol.voxel_volume_ml,
            )
        )
    gvol = float(np.count_nonzero(gland_m)) * t2_vol.voxel_volume_ml
    density = float(rng.uniform(0.08, 0.15) + (rng.uniform(0.05, 0.25) if cspca else 0.0))
    return PhantomCase(
        seed=seed,
        case_id=case_id,
        vendor=vendor,
        study_instance_uid=study_uid,
        t2w=t2_vol,
        adc=dwi_grid.volume(adc, suid("adc"), for_uid),
        hbv=dwi_grid.volume(hbv, suid("hbv"), for_uid),
        dwi={b: dwi_grid.volume(v, suid("dwi"), for_uid) for b, v in dwi.items()},
        gland_mask=t2_vol.with_array(gland_m),
        zone_mask=t2_vol.with_array(zone_m),
        lesion_mask=t2_vol.with_array(lesion_m),
        lesions=tuple(truth),
        age=int(rng.integers(48, 80)),
        psa=round(density * gvol, 1),
        _anatomy=anatomy,
    )


def render_t2w(case: PhantomCase, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """T2W-weighted view of `case`'s anatomy on another grid (sagittal, coronal, localizer)."""
    if case._anatomy is None:
        raise ValueError("case has no anatomy to render; build it with synthesize_case")
    scale = _VENDOR_SCALE[case.vendor]
    img, _ = _render(case._anatomy, grid, 0, edge_mm=max(grid.spacing[:2]))
    img = _rician(img * _bias(grid, rng, 0.2) * np.float32(scale), 14.0 * scale, rng)
    return np.round(np.clip(img, 0, 4095)).astype(np.float32)


def _fit_adc(dwi: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Log-linear least-squares fit like the scanner: ADC map and a computed b1400 image."""
    bs = np.array(sorted(dwi), dtype=np.float32)
    logs = np.stack([np.log(np.maximum(dwi[int(b)], 1.0)) for b in bs])
    bm = bs.mean()
    slope = np.tensordot(bs - bm, logs - logs.mean(axis=0), axes=1) / np.sum((bs - bm) ** 2)
    intercept = logs.mean(axis=0) - slope * bm
    adc = np.clip(-slope * 1e6, 0, 4095)
    hbv = np.exp(np.clip(intercept - HIGH_B_VALUE * adc * 1e-6, -20, 9))
    adc = np.round(adc).astype(np.float32)
    return adc, np.round(np.clip(hbv, 0, 4095)).astype(np.float32)
