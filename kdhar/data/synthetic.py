"""Synthetic action videos: real encoded files laid out like UCF101 or HMDB51.

Every clip shows a small articulated figure (body, head, two arms) doing one motion primitive
in front of a textured background. The classes differ only in how the figure moves over time:

- reversal pairs: one class is the other's frames played backwards ("SitDown"/"StandUp"),
  so a model that ignores frame order cannot tell them apart;
- direction pairs: mirrored motions (left/right, clockwise/counter-clockwise);
- speed pairs: the same oscillation at two rates;
- order pairs: the same two sub-motions in the opposite order.

Nuisance factors are shared by the clips of one group, as in UCF101's gNN groups: background
texture and colours, figure shape/colour/size, lighting, camera shake, noise and distractor
objects that move for no reason. Test groups never appear in training, so a test set has a
group shift. `SynthSpec.difficulty` (0 easy .. 1 hard) lowers the figure's contrast, shrinks
the motions and the gap between speed pairs, and adds clutter, noise, shake and distractors.

Everything is drawn from `numpy.random.default_rng` seeded by (seed, layout, group[, class,
clip]), so one spec always renders the same frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdhar.data.video import is_temp_name, temp_name, write_video

LAYOUTS = ("ucf101", "hmdb51")
HMDB_SPLIT_DIR = "testTrainMulti_7030_splits"
MARKER = "synthetic.json"  # written last: its "complete" flag tells a finished set from an interrupted one
# Seeds each layout's looks; thumos14 (the untrimmed set of kdhar.data.untrimmed) has looks of its own.
_LAYOUT_CODE = {"ucf101": 101, "hmdb51": 51, "thumos14": 14}


class SynthError(ValueError):
    """A synthetic-dataset request that cannot be carried out (bad spec, occupied folder, unknown class)."""


@dataclass(frozen=True)
class SynthSpec:
    """What to generate; the defaults make a 1000-video set that renders in well under a minute."""

    num_classes: int = 10  # taken in catalogue order, so pairs stay together when the count is even
    groups: int = 25  # like UCF101's g01-g25; each group has its own look
    clips_per_group: int = 4  # UCF101 has 4-7 clips per group and class
    frames: int = 32  # ~1.3 s at 25 fps: room for two 8x2-frame clips without overlap
    size: tuple[int, int] = (96, 128)  # (H, W); 4:3 like UCF101's 240x320, at CPU scale
    fps: int = 25
    difficulty: float = 0.0  # 0 easy .. 1 hard; calibrated at CPU size (README); see the module docstring
    seed: int = 0

    def __post_init__(self) -> None:
        # YAML/JSON give lists; a tuple keeps the spec hashable and comparable.
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        if not 2 <= self.num_classes <= len(CATALOGUE):
            raise SynthError(
                f"SynthSpec.num_classes={self.num_classes}: the catalogue has {len(CATALOGUE)} motion "
                f"classes; choose 2-{len(CATALOGUE)}"
            )
        if self.groups < 2 or self.clips_per_group < 1:
            raise SynthError(
                f"SynthSpec.groups={self.groups}, clips_per_group={self.clips_per_group}: "
                "need at least 2 groups and 1 clip per group"
            )
        if self.frames < 2:
            raise SynthError(f"SynthSpec.frames={self.frames}: a motion needs at least 2 frames")
        height, width = self.size
        if len(self.size) != 2 or height < 16 or width < 16 or height % 2 or width % 2:
            raise SynthError(
                f"SynthSpec.size={self.size}: (H, W) must be even and at least 16 "
                "(the encoder stores colour at half resolution)"
            )
        if self.fps < 1:
            raise SynthError(f"SynthSpec.fps={self.fps}: must be a positive integer")
        if not 0.0 <= self.difficulty <= 1.0:
            raise SynthError(f"SynthSpec.difficulty={self.difficulty}: must lie in [0, 1]")


@dataclass(frozen=True)
class GeneratedDataset:
    """Where a generated set lives, its class names (in label order) and its video count."""

    root: Path
    classes: list[str]
    num_videos: int


@dataclass(frozen=True)
class GroupStyle:
    """The look shared by every clip of one group (colours are RGB in [0, 1])."""

    texture: str  # background family: stripes | checker | rings | blotches | gradient
    bg_color: tuple[float, float, float]
    bg_color2: tuple[float, float, float]  # second texture colour; its distance to bg_color is the clutter
    tex_freq: float  # texture cycles per min(H, W)
    tex_angle: float  # radians
    body_power: float  # superellipse exponent of the body: 1 diamond, 2 ellipse, 4+ box
    actor_color: tuple[float, float, float]
    limb_color: tuple[float, float, float]
    actor_size: float  # body half-width as a fraction of min(H, W)
    gain: float  # overall brightness
    light_slope: float  # strength of a linear lighting gradient across the frame
    light_angle: float
    flicker: float  # relative brightness wobble over time
    shake: float  # camera shake amplitude in pixels
    noise: float  # std of per-pixel noise on the [0, 1] scale
    distractors: int  # objects that move for no reason
    distractor_color: tuple[float, float, float]


# --------------------------------------------------------------------------------------------
# Motions. A trajectory maps normalised frame times to the figure's pose; offsets are in units
# of min(H, W), angles in radians (image axes: x right, y down, positive angles turn clockwise).


@dataclass(frozen=True)
class _ClipDraw:
    speed: float  # >1 finishes the motion sooner
    centre: float  # when (0..1) the motion is half done
    phase: float  # start phase of periodic motions, in cycles


@dataclass
class Pose:
    """The figure's pose, one value per frame in each field."""

    dx: np.ndarray
    dy: np.ndarray
    scale: np.ndarray
    squash: np.ndarray  # body height factor
    rot: np.ndarray
    arm_r: np.ndarray  # arm angles in the body's frame; pi/2 hangs straight down
    arm_l: np.ndarray


Trajectory = Callable[[np.ndarray, _ClipDraw, float], Pose]
_ARM_REST = math.pi / 2 - 0.45  # right arm hangs down and out; the left one mirrors it


def _pose(tau: np.ndarray, **arrays: np.ndarray) -> Pose:
    zeros, ones = np.zeros_like(tau), np.ones_like(tau)
    base = {"dx": zeros, "dy": zeros, "scale": ones, "squash": ones, "rot": zeros,
            "arm_r": zeros + _ARM_REST, "arm_l": zeros + (math.pi - _ARM_REST)}
    base.update(arrays)
    return Pose(**{k: np.asarray(v, dtype=np.float32) for k, v in base.items()})


def _event(tau: np.ndarray, c: _ClipDraw) -> np.ndarray:
    """Progress 0..1 of a one-off motion; clips differ in its pace and timing."""
    return np.clip(0.5 + (tau - c.centre) * c.speed, 0.0, 1.0)


def _smooth(u: np.ndarray) -> np.ndarray:
    return u * u * (3.0 - 2.0 * u)


def _cycles(tau: np.ndarray, c: _ClipDraw, cycles: float) -> np.ndarray:
    return 2.0 * math.pi * (cycles * c.speed * tau + c.phase)


def _halves(tau: np.ndarray, c: _ClipDraw) -> tuple[np.ndarray, np.ndarray]:
    u = _event(tau, c)
    return _smooth(np.clip(2.0 * u, 0.0, 1.0)), _smooth(np.clip(2.0 * u - 1.0, 0.0, 1.0))


def _speed_ratio(amp: float) -> float:
    # Fast/slow rate ratio: 2.0 when easy, 1.6 at difficulty 1 (still above the clip speed jitter).
    return 1.0 + amp


def _sit_down(tau, c, amp):
    s = _smooth(_event(tau, c))
    return _pose(tau, dy=0.16 * amp * s, squash=1.0 - 0.35 * amp * s)


def _approach(tau, c, amp):
    s = _smooth(_event(tau, c))
    # Geometric growth looks like constant-speed approach; the drift mimics a ground plane.
    return _pose(tau, scale=0.8 * (1.0 + 0.8 * amp) ** s, dy=0.06 * amp * s)


def _open_hand(tau, c, amp):
    arm_r = _ARM_REST - 2.0 * amp * _smooth(_event(tau, c))
    return _pose(tau, arm_r=arm_r, arm_l=math.pi - arm_r)


def _raise_arm(tau, c, amp):
    return _pose(tau, arm_r=_ARM_REST - 2.8 * amp * _smooth(_event(tau, c)))


def _slide(sign):
    def trajectory(tau, c, amp):
        a = _event(tau, c) ** 2  # accelerating, so playing it backwards is not the mirrored class
        return _pose(tau, dx=sign * 0.35 * amp * (a - 1.0 / 3.0))  # centred on the mean position
    return trajectory


def _spin(sign):
    def trajectory(tau, c, amp):
        return _pose(tau, rot=sign * 2.0 * math.pi * (0.5 + 0.5 * amp) * _event(tau, c))
    return trajectory


def _tilt(sign):
    def trajectory(tau, c, amp):
        return _pose(tau, rot=sign * 0.7 * amp * _smooth(_event(tau, c)))
    return trajectory


def _wave(fast):
    def trajectory(tau, c, amp):
        cycles = 1.2 * (_speed_ratio(amp) if fast else 1.0)
        arm_r = -math.pi / 4 + 0.7 * amp * np.sin(_cycles(tau, c, cycles))
        return _pose(tau, arm_r=arm_r)
    return trajectory


def _bounce(fast):
    def trajectory(tau, c, amp):
        cycles = 1.2 * (_speed_ratio(amp) if fast else 1.0)
        return _pose(tau, dy=-0.12 * amp * np.abs(np.sin(0.5 * _cycles(tau, c, cycles))))
    return trajectory


def _pulse(fast):
    def trajectory(tau, c, amp):
        cycles = 1.2 * (_speed_ratio(amp) if fast else 1.0)
        return _pose(tau, scale=1.0 + 0.25 * amp * np.sin(_cycles(tau, c, cycles)))
    return trajectory


def _right_up(right_first):
    def trajectory(tau, c, amp):
        first, second = _halves(tau, c)
        right, up = (first, second) if right_first else (second, first)
        step = 0.25 * amp
        return _pose(tau, dx=step * (right - 0.5), dy=-step * (up - 0.5))
    return trajectory


def _spin_jump(spin_first):
    def trajectory(tau, c, amp):
        first, second = _halves(tau, c)
        spin, jump = (first, second) if spin_first else (second, first)
        return _pose(tau, rot=2.0 * math.pi * spin, dy=-0.15 * amp * np.sin(math.pi * jump))
    return trajectory



@dataclass(frozen=True)
class Motion:
    """One class of the catalogue."""

    name: str  # CamelCase (UCF101 style); the HMDB51 layout uses its lower_snake form
    kind: str  # what separates it from its partner: reversal | direction | speed | order
    partner: str
    trajectory: Trajectory | None  # None: rendered as `reverse_of`'s frames in reverse order
    reverse_of: str | None = None


def _pair(kind: str, a: str, ta: Trajectory, b: str, tb: Trajectory | None) -> list[Motion]:
    if tb is None:
        return [Motion(a, kind, b, ta), Motion(b, kind, a, None, reverse_of=a)]
    return [Motion(a, kind, b, ta), Motion(b, kind, a, tb)]


CATALOGUE: tuple[Motion, ...] = tuple(
    _pair("reversal", "SitDown", _sit_down, "StandUp", None)
    + _pair("reversal", "Approach", _approach, "Recede", None)
    + _pair("reversal", "OpenHand", _open_hand, "CloseHand", None)
    + _pair("reversal", "RaiseArm", _raise_arm, "LowerArm", None)
    + _pair("direction", "SlideLeft", _slide(-1.0), "SlideRight", _slide(1.0))
    + _pair("direction", "SpinClockwise", _spin(1.0), "SpinCounterclockwise", _spin(-1.0))
    + _pair("direction", "TiltLeft", _tilt(-1.0), "TiltRight", _tilt(1.0))
    + _pair("speed", "WaveSlow", _wave(False), "WaveFast", _wave(True))
    + _pair("speed", "BounceSlow", _bounce(False), "BounceFast", _bounce(True))
    + _pair("speed", "PulseSlow", _pulse(False), "PulseFast", _pulse(True))
    + _pair("order", "RightThenUp", _right_up(True), "UpThenRight", _right_up(False))
    + _pair("order", "SpinThenJump", _spin_jump(True), "JumpThenSpin", _spin_jump(False))
)
_BY_NAME = {m.name: m for m in CATALOGUE}
_CATALOGUE_INDEX = {m.name: i for i, m in enumerate(CATALOGUE)}

# Which primitives each layout takes first: the default 10 classes of the two layouts share no
# motion, yet each has one pair of every kind, so transfer between them is a real change of task.
_LAYOUT_ORDER = {
    "ucf101": ["SitDown", "StandUp", "Approach", "Recede", "SlideLeft", "SlideRight", "WaveSlow",
               "WaveFast", "RightThenUp", "UpThenRight", "OpenHand", "CloseHand", "SpinClockwise",
               "SpinCounterclockwise", "BounceSlow", "BounceFast", "SpinThenJump", "JumpThenSpin",
               "RaiseArm", "LowerArm", "TiltLeft", "TiltRight", "PulseSlow", "PulseFast"],
    "hmdb51": ["OpenHand", "CloseHand", "SpinClockwise", "SpinCounterclockwise", "BounceSlow",
               "BounceFast", "SpinThenJump", "JumpThenSpin", "RaiseArm", "LowerArm", "TiltLeft",
               "TiltRight", "PulseSlow", "PulseFast", "SitDown", "StandUp", "Approach", "Recede",
               "SlideLeft", "SlideRight", "WaveSlow", "WaveFast", "RightThenUp", "UpThenRight"],
}


def snake_case(name: str) -> str:
    """`SpinClockwise` -> `spin_clockwise` (HMDB51-style class names)."""
    return "".join(f"_{ch.lower()}" if ch.isupper() and i else ch.lower() for i, ch in enumerate(name))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise SynthError(f"layout={layout!r}: choose one of {', '.join(LAYOUTS)}")


def class_names(layout: str, num_classes: int) -> list[str]:
    """The class names a layout uses for `num_classes` classes, sorted (label order).

    Args:
        layout: "ucf101" (CamelCase names) or "hmdb51" (lower_snake names).
        num_classes: how many catalogue motions to take, in the layout's order.
    """
    _check_layout(layout)
    chosen = _LAYOUT_ORDER[layout][:num_classes]
    return sorted(snake_case(n) if layout == "hmdb51" else n for n in chosen)


def motion(class_name: str) -> Motion:
    """The catalogue entry for a CamelCase or lower_snake class name."""
    for m in CATALOGUE:
        if class_name in (m.name, snake_case(m.name)):
            return m
    raise SynthError(f"unknown synthetic class {class_name!r}; known: {', '.join(_BY_NAME)}")


# --------------------------------------------------------------------------------------------
# Styles


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / (np.linalg.norm(v) + 1e-9)


def _offset_colour(rng: np.random.Generator, base: np.ndarray, distance: float) -> np.ndarray:
    """A colour about `distance` away from `base`, keeping the sign that loses least to clipping."""
    direction = _unit_vector(rng)
    options = [np.clip(base + s * distance * direction, 0.0, 1.0) for s in (1.0, -1.0)]
    return max(options, key=lambda c: float(np.linalg.norm(c - base)))


def _rgb(v: np.ndarray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))


def group_style(group: int, spec: SynthSpec, layout: str = "ucf101") -> GroupStyle:
    """The look shared by all clips of `group` (1-based) of a layout; harder specs are busier.

    Args:
        group: 1-based group number.
        spec: the dataset spec (its seed and difficulty matter).
        layout: the layouts get unrelated looks, so a second dataset is a new domain.
    """
    if layout not in _LAYOUT_CODE:
        raise SynthError(f"layout={layout!r}: choose one of {', '.join(_LAYOUT_CODE)}")
    rng = np.random.default_rng([spec.seed, _LAYOUT_CODE[layout], group])
    d = spec.difficulty
    bg = rng.uniform(0.15, 0.85, size=3)
    bg2 = _offset_colour(rng, bg, (0.06 + 0.34 * d) * rng.uniform(0.7, 1.3))
    mid = (bg + bg2) / 2.0
    contrast = (0.55 - 0.37 * d) * rng.uniform(0.75, 1.25)
    actor = _offset_colour(rng, mid, contrast)
    limb = np.clip(actor + rng.normal(scale=0.05, size=3), 0.0, 1.0)
    return GroupStyle(
        texture=str(rng.choice(["stripes", "checker", "rings", "blotches", "gradient"])),
        bg_color=_rgb(bg),
        bg_color2=_rgb(bg2),
        tex_freq=float(rng.uniform(1.5, 6.0)),
        tex_angle=float(rng.uniform(0.0, math.pi)),
        body_power=float(rng.choice([1.2, 2.0, 2.0, 4.0])),
        actor_color=_rgb(actor),
        limb_color=_rgb(limb),
        actor_size=float(rng.uniform(0.11, 0.16)),
        gain=float(rng.uniform(0.75, 1.15)),
        light_slope=float(0.4 * d * rng.uniform(0.0, 1.0)),
        light_angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        flicker=float(0.08 * d * rng.uniform(0.0, 1.0)),
        shake=float((0.2 + 2.5 * d) * rng.uniform(0.5, 1.5)),
        noise=float((0.01 + 0.06 * d) * rng.uniform(0.6, 1.4)),
        distractors=int(round(4.0 * d * rng.uniform(0.5, 1.5))),
        distractor_color=_rgb(_offset_colour(rng, mid, contrast * rng.uniform(0.8, 1.2))),
    )


# --------------------------------------------------------------------------------------------
# Rendering. Coordinates are broadcast as X (T, 1, W) and Y (T, H, 1): camera shake is a
# per-frame translation, so each axis depends on one image axis only. Every layer has one
# colour, so a frame is a per-pixel weighting of a few colours: layers produce scalar alphas
# and a single matrix product turns the weights into RGB (3x less work than blending RGB).


def _coverage(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased alpha from a signed distance in pixels: sub-pixel motion stays visible."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def _col(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)[:, None, None]


def _norm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(a * a + b * b)  # several times faster than np.hypot


def _segment_distance(qx, qy, ox, oy, angle, length) -> np.ndarray:
    ux, uy = _col(np.cos(angle)), _col(np.sin(angle))
    vx, vy = qx - ox, qy - oy
    t = np.clip(vx * ux + vy * uy, 0.0, length)
    return _norm(vx - t * ux, vy - t * uy)


def _texture(style: GroupStyle, h: int, w: int, unit: float, offset: np.ndarray) -> np.ndarray:
    """Texture value in [0, 1] on an (h, w) canvas."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    ca, sa = math.cos(style.tex_angle), math.sin(style.tex_angle)
    p = (x * ca + y * sa) / unit + offset[0]
    q = (-x * sa + y * ca) / unit + offset[1]
    f = style.tex_freq * 2.0 * math.pi
    if style.texture == "stripes":
        v = 0.5 + 0.5 * np.sin(f * p)
    elif style.texture == "checker":
        v = 0.5 + 0.5 * np.tanh(3.0 * np.sin(f * p) * np.sin(f * q))
    elif style.texture == "rings":
        v = 0.5 + 0.5 * np.sin(f * _norm(p - 0.6, q - 0.4))
    elif style.texture == "blotches":
        v = 0.5 + 0.25 * (np.sin(f * p + 1.3 * np.sin(0.5 * f * q)) + np.sin(0.7 * f * q))
    else:  # gradient: a slow ramp with a faint ripple
        v = 0.5 + 0.35 * np.sin(0.25 * f * p) + 0.15 * np.sin(f * q)
    return v.astype(np.float32)


def _stamp(shape: tuple[int, int, int], cx: np.ndarray, cy: np.ndarray, shake: np.ndarray, reach: float,
           draw: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Full-frame alphas of one object, drawn only near it.

    `draw(px, py)` gets coordinates relative to the object's centre on a square window of
    +-`reach` pixels around it in every frame; objects are small, so this saves most of the work.
    """
    t_len, h, w = shape
    side = 2 * int(math.ceil(reach)) + 1
    x0 = np.floor(cx - shake[0] - reach).astype(int)  # the window's first pixel column per frame
    y0 = np.floor(cy - shake[1] - reach).astype(int)
    steps = np.arange(side)
    px = (x0[:, None] + steps + shake[0][:, None] - cx[:, None]).astype(np.float32)[:, None, :]
    py = (y0[:, None] + steps + shake[1][:, None] - cy[:, None]).astype(np.float32)[:, :, None]
    outputs = []
    for local in draw(px, py):
        full = np.zeros(shape, np.float32)
        for t in range(t_len):
            xa, xb = max(x0[t], 0), min(x0[t] + side, w)
            ya, yb = max(y0[t], 0), min(y0[t] + side, h)
            if xa < xb and ya < yb:
                full[t, ya:yb, xa:xb] = local[t, ya - y0[t]: yb - y0[t], xa - x0[t]: xb - x0[t]]
        outputs.append(full)
    return tuple(outputs)


def _figure(style: GroupStyle, pose: Pose, size: float, px: np.ndarray, py: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Alphas of the body+head and of the two arms, at positions relative to the figure's centre."""
    s = _col(size * pose.scale)
    cos, sin = _col(np.cos(pose.rot)), _col(np.sin(pose.rot))
    qx, qy = cos * px + sin * py, -sin * px + cos * py  # the figure's own frame
    rx, ry = s, 1.5 * s * _col(pose.squash)
    power = style.body_power
    radial = (np.abs(qx / rx) ** power + np.abs(qy / ry) ** power) ** (1.0 / power)
    body = _coverage((radial - 1.0) * np.minimum(rx, ry))
    head_r = 0.5 * s
    head = _coverage(_norm(qx, qy + ry + 1.1 * head_r) - head_r)
    # Shoulders sit off the body's axis so hanging arms still show beside it.
    shoulder_x, shoulder_y, length = 0.5 * rx, -0.45 * ry, 1.6 * s
    width = np.maximum(0.22 * s, 0.7)
    arms = np.maximum(
        _coverage(_segment_distance(qx, qy, shoulder_x, shoulder_y, pose.arm_r, length) - width),
        _coverage(_segment_distance(qx, qy, -shoulder_x, shoulder_y, pose.arm_l, length) - width),
    )
    return np.maximum(body, head), arms


def _distractor(rng: np.random.Generator, tau: np.ndarray, shape: tuple[int, int, int], shake: np.ndarray,
                size: float) -> np.ndarray:
    """Alpha (T, H, W) of one object drifting, swaying and turning at random."""
    _, h, w = shape
    kind = rng.integers(3)
    radius = size * rng.uniform(0.5, 1.0)
    start = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])
    heading = rng.uniform(0.0, 2.0 * math.pi)
    travel = rng.uniform(0.1, 0.4) * min(h, w)
    sway, sway_freq, sway_phase = rng.uniform(0.0, 0.08) * min(h, w), rng.uniform(0.5, 2.5), rng.uniform(0, 1)
    spin, angle0 = rng.uniform(-2.0, 2.0) * math.pi, rng.uniform(0.0, math.pi)
    wobble = sway * np.sin(2.0 * math.pi * (sway_freq * tau + sway_phase))
    cx = start[0] + (travel * tau + wobble) * math.cos(heading)
    cy = start[1] + (travel * tau - wobble) * math.sin(heading)
    angle = angle0 + spin * tau

    def draw(px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray]:
        if kind == 0:
            return (_coverage(_norm(px, py) - radius),)
        cos, sin = _col(np.cos(angle)), _col(np.sin(angle))
        qx, qy = cos * px + sin * py, -sin * px + cos * py
        if kind == 1:
            return (_coverage(np.maximum(np.abs(qx), np.abs(qy)) - 0.8 * radius),)
        bar = _segment_distance(qx, qy, -radius, 0.0, np.zeros_like(tau), 2.0 * radius) - 0.2 * radius
        return (_coverage(bar),)

    return _stamp(shape, cx, cy, shake, 1.2 * radius + 2.0, draw)[0]


def render_clip(class_name: str, style: GroupStyle, rng: np.random.Generator, spec: SynthSpec) -> np.ndarray:
    """Renders one clip of a class.

    Classes that are the reverse of another are rendered literally: the forward class's frames,
    drawn with the same `rng`, in reverse order.

    Args:
        class_name: a catalogue class, CamelCase or lower_snake.
        style: the group's look (`group_style`).
        rng: the clip's generator; it decides position, scale, pace, timing and the nuisances.
        spec: frames, size and difficulty.

    Returns:
        uint8 RGB frames (T, H, W, 3).
    """
    entry = motion(class_name)
    if entry.reverse_of is not None:
        return np.ascontiguousarray(render_clip(entry.reverse_of, style, rng, spec)[::-1])
    amp = motion_amplitude(spec.difficulty)
    tau = np.linspace(0.0, 1.0, spec.frames, dtype=np.float32)
    draw = _ClipDraw(speed=rng.uniform(0.9, 1.25), centre=rng.uniform(0.4, 0.6), phase=rng.uniform(0.0, 1.0))
    return render_pose(entry.trajectory(tau, draw, amp), style, rng, spec.size, spec.difficulty, tau)


def motion_amplitude(difficulty: float) -> float:
    """How far the figure moves, 1 when easy: harder sets move less."""
    return 1.0 - 0.4 * difficulty


def motion_pose(entry: Motion, tau: np.ndarray, speed: float, centre: float, phase: float, amp: float) -> Pose:
    """The figure's pose over `tau` while it does `entry` (a reversed class: its partner's pose
    played backwards), with the pace, timing and phase given rather than drawn."""
    draw = _ClipDraw(speed=speed, centre=centre, phase=phase)
    if entry.reverse_of is None:
        return entry.trajectory(tau, draw, amp)
    forward = motion(entry.reverse_of).trajectory(tau, draw, amp)
    return Pose(**{f.name: np.ascontiguousarray(getattr(forward, f.name)[::-1]) for f in dataclasses.fields(Pose)})


def rest_pose(tau: np.ndarray, **arrays: np.ndarray) -> Pose:
    """The figure standing with its arms down over `tau`, with any field replaced by `arrays`."""
    return _pose(tau, **arrays)


def render_pose(pose: Pose, style: GroupStyle, rng: np.random.Generator, size_hw: tuple[int, int],
                difficulty: float, tau: np.ndarray, drift: np.ndarray | None = None, frames: slice | None = None,
                noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """Renders the figure in `pose` in front of the group's background and nuisances.

    Args:
        pose: one value per frame for every pose field.
        style: the group's look.
        rng: draws the figure's place and size, the shake, flicker, distractors and noise.
        size_hw: (H, W) of the frames.
        difficulty: 0 easy .. 1 hard (occluders in front of the figure on harder sets).
        tau: the time of every frame in clip units (a clip of `SynthSpec.frames` spans 0..1); camera
            shake and flicker follow it.
        drift: where each distractor is along its path per frame (`tau` when None); a long video
            passes a bounded drift so that distractors wander instead of leaving the frame.
        frames: render only these frames of the timeline (all when None). A long video is rendered
            a slice at a time to bound memory: each slice gets a generator in the same state, so the
            figure, shake and distractors continue across slices, and its own `noise_rng`.
        noise_rng: draws the pixel noise (`rng`, after its other draws, when None).

    Returns:
        uint8 RGB frames (T, H, W, 3), T the length of `frames`.
    """
    drift = tau if drift is None else drift
    (h, w), d = size_hw, difficulty
    unit = float(min(h, w))
    cx0 = w / 2.0 + rng.uniform(-0.08, 0.08) * unit
    cy0 = h / 2.0 + rng.uniform(0.0, 0.1) * unit  # the head sits above the body's centre
    size = style.actor_size * unit * rng.uniform(0.85, 1.15)
    tex_offset = rng.uniform(0.0, 1.0, size=2)
    shake_freq, shake_phase = rng.uniform(1.0, 6.0, size=(2, 2)), rng.uniform(0.0, 1.0, size=(2, 2))
    flicker_freq, flicker_phase = rng.uniform(0.5, 3.0), rng.uniform(0.0, 1.0)

    # Whole-pixel shake: the background is then one canvas sliced per frame, not re-rendered.
    waves = np.sin(2.0 * math.pi * (shake_freq[..., None] * tau + shake_phase[..., None]))  # (axis, k, T)
    shake = np.rint(style.shake * (0.6 * waves[:, 0] + 0.4 * waves[:, 1])).astype(int)
    margin = int(np.abs(shake).max())
    canvas = _texture(style, h + 2 * margin, w + 2 * margin, unit, tex_offset)
    if frames is not None:
        tau, drift, shake = tau[frames], drift[frames], shake[:, frames]
        pose = Pose(**{f.name: getattr(pose, f.name)[frames] for f in dataclasses.fields(Pose)})
    t_len = len(tau)
    tex = np.stack([canvas[margin + sy: margin + sy + h, margin + sx: margin + sx + w]
                    for sx, sy in zip(shake[0], shake[1])])
    shape = (t_len, h, w)

    size_t = size * pose.scale
    # The figure reaches about 2.7 body half-widths from its centre (head, raised arms).
    body, arms = _stamp(shape, cx0 + pose.dx * unit, cy0 + pose.dy * unit, shake, 2.7 * float(size_t.max()) + 2.0,
                        lambda px, py: _figure(style, pose, size, px, py))
    behind: list[tuple[np.ndarray, tuple[float, float, float]]] = []
    front: list[tuple[np.ndarray, tuple[float, float, float]]] = []
    base_colour = np.asarray(style.distractor_color)
    for _ in range(style.distractors):
        alpha = _distractor(rng, drift, shape, shake, size)
        colour = _rgb(np.clip(base_colour + rng.normal(scale=0.05, size=3), 0.0, 1.0))
        # Occluders in front of the figure only on harder sets.
        (front if rng.uniform() < 0.4 * d else behind).append((alpha, colour))
    layers = behind + [(body, style.actor_color), (arms, style.limb_color)] + front
    img = _composite(layers, tex, style)
    return _light_and_noise(img, style, noise_rng or rng, tau, flicker_freq, flicker_phase, unit)


def _composite(layers: list[tuple[np.ndarray, tuple[float, float, float]]], tex: np.ndarray,
               style: GroupStyle) -> np.ndarray:
    """Front-to-back compositing: each layer's weight is its alpha times what is still visible."""
    visible = np.ones_like(tex)
    weights, colours = [], []
    for alpha, colour in reversed(layers):
        weights.append(alpha * visible)
        colours.append(colour)
        visible *= 1.0 - alpha
    weights += [visible * (1.0 - tex), visible * tex]
    colours += [style.bg_color, style.bg_color2]
    return np.stack(weights, axis=-1) @ np.asarray(colours, dtype=np.float32)


def _light_and_noise(img: np.ndarray, style: GroupStyle, rng: np.random.Generator, tau: np.ndarray,
                     flicker_freq: float, flicker_phase: float, unit: float) -> np.ndarray:
    """Lighting, flicker and pixel noise on the composited frames, then uint8."""
    _, h, w, _ = img.shape
    # Lighting is fixed to the camera, so it uses the unshaken pixel grid.
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((gx - w / 2.0) * math.cos(style.light_angle) + (gy - h / 2.0) * math.sin(style.light_angle)) / unit
    flicker = 1.0 + style.flicker * np.sin(2.0 * math.pi * (flicker_freq * tau + flicker_phase))
    img *= (style.gain * (1.0 + style.light_slope * ramp) * _col(flicker))[..., None]
    # Uniform noise with the style's std: as good a nuisance as Gaussian and 4x cheaper to draw.
    noise = rng.random(img.shape, dtype=np.float32)
    img += (noise - 0.5) * (style.noise * math.sqrt(12.0))
    return np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Splits and files


def ucf_test_groups(groups: int, split: int) -> range:
    """Test groups of UCF101 split 1-3: 1-7, 8-14, 15-21 of 25; other group counts scale the blocks.

    Args:
        groups: number of groups in the set.
        split: 1, 2 or 3.
    """
    if split not in (1, 2, 3):
        raise SynthError(f"split={split}: UCF101 has splits 1, 2 and 3")
    block = max(1, round(groups * 7 / 25))
    start = (split - 1) * block + 1
    return range(start, start + block)


def hmdb_test_groups(groups: int, split: int, seed: int) -> set[int]:
    """Test groups (about 30 %) of HMDB51-style split 1-3; every class splits by the same groups."""
    order = np.random.default_rng([seed, _LAYOUT_CODE["hmdb51"], split]).permutation(groups) + 1
    return {int(g) for g in order[: max(1, round(0.3 * groups))]}


def _check_groups(layout: str, groups: int) -> None:
    if layout == "ucf101" and ucf_test_groups(groups, 3).stop - 1 > groups:
        raise SynthError(
            f"SynthSpec.groups={groups}: the UCF101 layout needs at least 3 groups (one test block per split)"
        )


def _video_relpath(layout: str, class_name: str, group: int, clip: int) -> str:
    if layout == "ucf101":
        return f"{class_name}/v_{class_name}_g{group:02d}_c{clip:02d}.avi"
    return f"{class_name}/{class_name}_g{group:02d}_c{clip:02d}.avi"


def _write_lines(path: Path, lines: list[str], newline: str) -> None:
    _write_text(path, "".join(line + newline for line in lines))


def _write_text(path: Path, text: str) -> None:
    """Writes `text` to a temporary name of its own, then renames it over `path`: a reader (or a
    second `data synth` on the same folder) sees the old file or the new one, never a half-written
    one, and two writers never write into one file."""
    tmp = temp_name(path)
    try:
        # newline="" stops Python from translating the explicit line endings.
        with open(tmp, "x", encoding="ascii", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_split_files(root: Path, layout: str, classes: list[str], spec: SynthSpec) -> None:
    all_groups = range(1, spec.groups + 1)
    clips = range(1, spec.clips_per_group + 1)
    if layout == "ucf101":
        # CRLF, 1-based labels, test lists without labels: byte-for-byte the official format.
        _write_lines(root / "classInd.txt", [f"{i} {c}" for i, c in enumerate(classes, 1)], "\r\n")
        for split in (1, 2, 3):
            test = set(ucf_test_groups(spec.groups, split))
            train_lines, test_lines = [], []
            for label, name in enumerate(classes, 1):
                for group in all_groups:
                    for clip in clips:
                        rel = _video_relpath(layout, name, group, clip)
                        if group in test:
                            test_lines.append(rel)
                        else:
                            train_lines.append(f"{rel} {label}")
            _write_lines(root / f"trainlist{split:02d}.txt", train_lines, "\r\n")
            _write_lines(root / f"testlist{split:02d}.txt", test_lines, "\r\n")
        return
    split_dir = root / HMDB_SPLIT_DIR
    split_dir.mkdir(parents=True, exist_ok=True)
    for split in (1, 2, 3):
        test = hmdb_test_groups(spec.groups, split, spec.seed)
        for name in classes:
            lines = [
                f"{Path(_video_relpath(layout, name, g, c)).name} {2 if g in test else 1}"
                for g in all_groups
                for c in clips
            ]
            _write_lines(split_dir / f"{name}_test_split{split}.txt", lines, "\n")


@dataclass(frozen=True)
class _Job:
    class_name: str
    group: int
    clip: int
    seed: tuple[int, ...]
    style: GroupStyle
    spec: SynthSpec
    path: Path


def _run_job(job: _Job) -> None:
    # Videos are written atomically, so an existing file is complete and can be kept on resume.
    if job.path.exists():
        return
    frames = render_clip(job.class_name, job.style, np.random.default_rng(list(job.seed)), job.spec)
    write_video(job.path, frames, fps=job.spec.fps)


def marker_record(layout: str, spec, complete: bool) -> dict:
    """What MARKER holds: the layout, the spec (any dataclass) and whether the set is finished."""
    return {"layout": layout, "spec": dataclasses.asdict(spec), "complete": complete}


def prepare_root(root: Path, layout: str, spec, overwrite: bool) -> bool:
    """Readies `root` for a set of `layout` and `spec` (a dataclass): True when it already holds this
    exact finished set; otherwise an empty folder with an unfinished marker (or an interrupted set of
    the same settings, to resume).

    The folder is listed before the marker is looked for: a writer that started on the same folder
    a moment earlier writes its marker before anything else, so whatever the listing holds besides
    temporary files comes with a marker, and the folder is not mistaken for someone else's."""
    marker = root / MARKER
    others = [p for p in root.iterdir() if not is_temp_name(p)] if root.is_dir() else []
    if marker.is_file():
        found = json.loads(marker.read_text())
        wanted = json.loads(json.dumps(marker_record(layout, spec, True)))  # tuples become lists, as on disk
        if found["layout"] == layout and found["spec"] == wanted["spec"]:
            return bool(found["complete"])
        if not overwrite:
            raise SynthError(
                f"{root} holds a synthetic set made with other settings ({found['layout']}, {found['spec']}); "
                "pass overwrite (CLI: --overwrite) or choose another folder"
            )
        shutil.rmtree(root)
    elif others:
        raise SynthError(f"{root} is not empty and holds no synthetic set ({MARKER} missing); choose an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    _write_text(marker, json.dumps(marker_record(layout, spec, False), indent=2))
    return False


def generate(
    out_root: str | Path,
    layout: str = "ucf101",
    spec: SynthSpec | None = None,
    workers: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> GeneratedDataset:
    """Writes a synthetic set of real encoded videos with official-format split files.

    Re-running with the same settings returns at once when the set is finished and resumes it
    when it was interrupted; other settings need `overwrite` (which deletes the old set).

    Args:
        out_root: folder to fill; must be empty, absent, or a set written by this function.
        layout: "ucf101" (`<Class>/v_<Class>_gNN_cNN.avi`, classInd/trainlist/testlist) or
            "hmdb51" (`<class>/<class>_gNN_cNN.avi`, testTrainMulti_7030_splits/).
        spec: what to generate; `SynthSpec()` when None.
        workers: processes rendering and encoding in parallel (1 renders in this process).
        on_progress: called as `on_progress(done, total)` after each video.
        overwrite: replace a set made with other settings.

    Returns:
        The root, the class names in label order and the number of videos.
    """
    spec = spec or SynthSpec()
    _check_layout(layout)
    _check_groups(layout, spec.groups)
    if workers < 1:
        raise SynthError(f"workers={workers}: must be at least 1")
    root = Path(out_root)
    classes = class_names(layout, spec.num_classes)
    total = spec.num_classes * spec.groups * spec.clips_per_group
    if prepare_root(root, layout, spec, overwrite):
        if on_progress:
            on_progress(total, total)
        return GeneratedDataset(root, classes, total)

    styles = {g: group_style(g, spec, layout) for g in range(1, spec.groups + 1)}
    jobs = [
        _Job(name, group, clip, (spec.seed, _LAYOUT_CODE[layout], group, _CATALOGUE_INDEX[motion(name).name], clip),
             styles[group], spec, root / _video_relpath(layout, name, group, clip))
        for name in classes
        for group in styles
        for clip in range(1, spec.clips_per_group + 1)
    ]
    _write_split_files(root, layout, classes, spec)
    done = 0
    if workers == 1:
        for job in jobs:
            _run_job(job)
            done += 1
            if on_progress:
                on_progress(done, total)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for future in as_completed([pool.submit(_run_job, job) for job in jobs]):
                future.result()  # re-raises a worker's error here
                done += 1
                if on_progress:
                    on_progress(done, total)
    _write_text(root / MARKER, json.dumps(marker_record(layout, spec, True), indent=2))
    return GeneratedDataset(root, classes, total)
