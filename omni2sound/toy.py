"""The toy world: the embedded default data set, with exact ground truth.

Every clip is an audio-video-text triple made from a few sound classes, each with its own look and
its own sound, so that what a model generates can be checked against the truth by the oracle
(`omni2sound.oracle`), not by ear:

    class      kind        look (colour, shape)          sound (band)
    engine     continuous  grey rectangle, vibrating     110 Hz harmonics 1..4 (80-480 Hz), 7 Hz wobble
    drum       impulsive   red square                    600 + 900 Hz, decay 60 ms
    bell       impulsive   yellow disc                   1300 + 1820 Hz, decay 250 ms
    whistle    continuous  green bar                     2300 Hz sine with 5 Hz vibrato
    woodblock  impulsive   blue triangle                 2900 + 3400 Hz, decay 30 ms

A clip has one on-screen impulsive object struck 1-3 times; its sound starts exactly on the video frame
(25 fps) where the object strikes (the object jumps down and flashes for three frames). With probability
`p_continuous` a continuous source is on screen for the whole clip, and with probability `p_offscreen` one
more source plays that the video does not show; the caption says so ("..., and off-screen a whistle
blows"). Captions are written from the events: "a bell rings twice while an engine hums".

Rates: audio 16 kHz mono; video 25 fps (for sync features) and 8 fps (for semantic features), both
rendered from the same scene at their own frame times; frames `size x size` RGB uint8.

A clip is a pure function of (seed, split, index): `ToyWorld(cfg).clip(i, split)` gives the same
triple on every machine.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

IMPULSIVE = ("drum", "bell", "woodblock")
CONTINUOUS = ("engine", "whistle")
CLASSES = ("engine", "drum", "bell", "whistle", "woodblock")

# (partials Hz, decay s or None for continuous, band Hz the oracle listens to)
SOUNDS = {
    "engine": ((110.0, 220.0, 330.0, 440.0), None, (80.0, 480.0)),
    "drum": ((600.0, 900.0), 0.060, (540.0, 1000.0)),
    "bell": ((1300.0, 1820.0), 0.250, (1200.0, 1950.0)),
    "whistle": ((2300.0,), None, (2200.0, 2450.0)),
    "woodblock": ((2900.0, 3400.0), 0.030, (2750.0, 3600.0)),
}
# RGB colour and shape of each class on screen
LOOKS = {
    "engine": ((150, 150, 160), "rect"),
    "drum": ((220, 40, 40), "square"),
    "bell": ((235, 210, 40), "disc"),
    "whistle": ((40, 200, 70), "bar"),
    "woodblock": ((50, 90, 230), "triangle"),
}
VERBS = {
    "engine": "an engine hums",
    "drum": "a drum is hit",
    "bell": "a bell rings",
    "whistle": "a whistle blows",
    "woodblock": "a wooden block knocks",
}
COUNTS = {1: "once", 2: "twice", 3: "three times"}
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class ToyConfig:
    seed: int = 0
    sample_rate: int = 16000
    duration: float = 2.0          # seconds per clip (the model handles any duration)
    size: int = 32                 # frame height = width
    sync_fps: int = 25             # frames for the motion (sync) encoder
    semantic_fps: int = 8          # frames for the semantic encoder
    max_strikes: int = 3
    min_gap: float = 0.30          # seconds between two strikes (a bell rings 250 ms)
    p_continuous: float = 0.5
    p_offscreen: float = 0.1


@dataclass
class Event:
    """One sound source of a clip. Impulsive: `onset` is the strike time (on a 25 fps frame). Continuous:
    plays for the whole clip (onset 0)."""
    cls: str
    onset: float
    onscreen: bool = True

    @property
    def impulsive(self) -> bool:
        return self.cls in IMPULSIVE


@dataclass
class ToyClip:
    clip_id: str
    audio: np.ndarray              # [N] float32 in [-1, 1], 16 kHz
    frames_sync: np.ndarray        # [T25, H, W, 3] uint8 at 25 fps
    frames_semantic: np.ndarray    # [T8, H, W, 3] uint8 at 8 fps
    caption: str                   # everything heard, on- and off-screen
    offscreen: Optional[str]       # description of the off-screen source, None if there is none
    events: list = field(default_factory=list)   # list[Event]
    duration: float = 2.0

    def truth(self) -> dict:
        return {"clip_id": self.clip_id, "caption": self.caption, "offscreen": self.offscreen,
                "events": [asdict(e) for e in self.events]}


def caption_of(events: list) -> tuple[str, Optional[str]]:
    """Caption and off-screen description written from the events (on-screen first)."""
    on = [e for e in events if e.onscreen]
    off = [e for e in events if not e.onscreen]

    def phrase(cls, evs):
        if cls in IMPULSIVE:
            return f"{VERBS[cls]} {COUNTS[len(evs)]}"
        return VERBS[cls]

    def describe(evs):
        by_cls: dict = {}
        for e in evs:
            by_cls.setdefault(e.cls, []).append(e)
        imp = [phrase(c, v) for c, v in by_cls.items() if c in IMPULSIVE]
        cont = [phrase(c, v) for c, v in by_cls.items() if c in CONTINUOUS]
        return imp, cont

    imp, cont = describe(on)
    parts = " and ".join(imp) if imp else ""
    if cont:
        parts = f"{parts} while {' and '.join(cont)}" if parts else " and ".join(cont)
    off_desc = None
    if off:
        oi, oc = describe(off)
        off_desc = " and ".join(oi + oc)
        parts = f"{parts}, and off-screen {off_desc}" if parts else f"off-screen {off_desc}"
    return parts, off_desc


def synth(cls: str, onsets, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """The sound of one source: impulses at `onsets` (s) or a continuous tone over the whole clip."""
    partials, decay, _ = SOUNDS[cls]
    t = np.arange(n) / sr
    out = np.zeros(n, np.float64)
    if decay is None:
        if cls == "engine":
            wobble = 1.0 + 0.25 * np.sin(2 * math.pi * 7.0 * t + rng.uniform(0, 2 * math.pi))
            for k, f in enumerate(partials):
                out += (0.8 ** k) * np.sin(2 * math.pi * f * t + rng.uniform(0, 2 * math.pi))
            out *= 0.16 * wobble
        else:   # whistle: sine with vibrato (phase = integral of frequency)
            f = partials[0] + 20.0 * np.sin(2 * math.pi * 5.0 * t)
            out = 0.15 * np.sin(2 * math.pi * np.cumsum(f) / sr)
        fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)    # 10 ms fades, no clicks at the edges
        return out * fade
    for on in onsets:
        i0 = int(round(on * sr))
        tt = t[i0:] - t[i0]
        env = np.exp(-tt / decay) * np.minimum(1.0, tt / 0.002)   # 2 ms attack
        for k, f in enumerate(partials):
            out[i0:] += (0.35 * 0.6 ** k) * env * np.sin(2 * math.pi * f * tt)
    return out


def _draw(img: np.ndarray, cls: str, cx: float, cy: float, r: float, bright: bool) -> None:
    """Rasterise the object of `cls` centred at (cx, cy) with radius r into img [H, W, 3]."""
    H, W, _ = img.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    colour, shape = LOOKS[cls]
    if shape == "disc":
        m = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":
        m = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":
        m = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    elif shape == "bar":
        m = (np.abs(dx) <= r * 0.35) & (np.abs(dy) <= r * 1.2)
    else:   # rect
        m = (np.abs(dx) <= r * 1.1) & (np.abs(dy) <= r * 0.6)
    c = np.array(colour, np.float64)
    if bright:   # the strike flash
        c = 0.4 * c + 0.6 * 255.0
    img[m] = c.astype(np.uint8)


def render(events: list, times: np.ndarray, size: int, layout: dict) -> np.ndarray:
    """Frames [len(times), size, size, 3] uint8 of the on-screen objects at the given times (s).
    An impulsive object jumps down by size/16 and flashes for 3 frames of 25 fps after each strike."""
    frames = np.full((len(times), size, size, 3), 24, np.uint8)
    frames[:, int(size * 0.8):, :, :] = 60       # the floor
    r = size / 8
    for i, t in enumerate(times):
        for cls, (cx, cy) in layout.items():
            strikes = [e.onset for e in events if e.cls == cls and e.onscreen and e.impulsive]
            hit = any(0.0 <= t - s < 3 / 25 - 1e-9 for s in strikes)
            y = cy + (size / 16 if hit else 0.0)
            x = cx
            if cls == "engine":   # a running engine vibrates, one pixel, every frame
                x = cx + (1.0 if int(round(t * 25)) % 2 else -1.0)
            _draw(frames[i], cls, x, y, r, bright=hit)
    return frames


class ToyWorld:
    """Deterministic generator of toy clips: `clip(index, split)`, `clips(n, split)`."""

    def __init__(self, cfg: Optional[ToyConfig] = None):
        self.cfg = cfg or ToyConfig()

    def rng(self, index: int, split: str) -> np.random.Generator:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        return np.random.default_rng([self.cfg.seed, SPLITS[split], index])

    def sample_events(self, rng: np.random.Generator, offscreen: Optional[bool] = None,
                      impulsive: Optional[str] = None, continuous: Optional[str] = None) -> list:
        """Random scene: one struck object, maybe a continuous source, maybe an off-screen source.
        `offscreen=True/False` forces the off-screen source; `impulsive`/`continuous` force classes."""
        c = self.cfg
        cls = impulsive or IMPULSIVE[rng.integers(len(IMPULSIVE))]
        events = [Event(cls, t) for t in self._strikes(rng, 1 + int(rng.integers(c.max_strikes)))]
        has_cont = continuous is not None or rng.random() < c.p_continuous
        if has_cont:
            events.append(Event(continuous or CONTINUOUS[rng.integers(len(CONTINUOUS))], 0.0))
        if offscreen is None:
            offscreen = bool(rng.random() < c.p_offscreen)
        if offscreen:
            used = {e.cls for e in events}
            free = [k for k in CLASSES if k not in used]
            off = free[rng.integers(len(free))]
            if off in IMPULSIVE:
                events += [Event(off, t, onscreen=False) for t in self._strikes(rng, 1 + int(rng.integers(2)))]
            else:
                events.append(Event(off, 0.0, onscreen=False))
        return events

    def _strikes(self, rng: np.random.Generator, k: int) -> list:
        """k strike times on 25 fps frames in [0.1 s, duration - 0.3 s], at least min_gap apart."""
        c = self.cfg
        lo = int(math.ceil(0.1 * 25))
        hi = max(lo, int((c.duration - 0.3) * 25))       # short clips: at least one possible strike frame
        gap = int(math.ceil(c.min_gap * 25))
        k = min(k, 1 + (hi - lo) // gap)
        for _ in range(100):
            f = np.sort(rng.choice(np.arange(lo, hi + 1), size=k, replace=False))
            if k == 1 or np.diff(f).min() >= gap:
                return [float(x) / 25 for x in f]
        return [float(lo) / 25]

    def make(self, events: list, clip_id: str, rng: np.random.Generator) -> ToyClip:
        """Audio, frames and caption of a scene."""
        c = self.cfg
        n = int(round(c.duration * c.sample_rate))
        audio = np.zeros(n, np.float64)
        for cls in dict.fromkeys(e.cls for e in events):
            onsets = [e.onset for e in events if e.cls == cls]
            audio += synth(cls, onsets, n, c.sample_rate, rng)
        peak = np.abs(audio).max()
        if peak > 0.95:
            audio *= 0.95 / peak
        s = c.size
        slots = {"imp": (s * 0.3, s * 0.5), "cont": (s * 0.72, s * 0.5)}
        layout = {e.cls: slots["imp" if e.impulsive else "cont"] for e in events if e.onscreen}
        t25 = np.arange(int(round(c.duration * c.sync_fps))) / c.sync_fps
        t8 = np.arange(int(round(c.duration * c.semantic_fps))) / c.semantic_fps
        caption, off = caption_of(events)
        return ToyClip(clip_id=clip_id, audio=audio.astype(np.float32),
                       frames_sync=render(events, t25, s, layout), frames_semantic=render(events, t8, s, layout),
                       caption=caption, offscreen=off, events=events, duration=c.duration)

    def clip(self, index: int, split: str = "train", **force) -> ToyClip:
        rng = self.rng(index, split)
        return self.make(self.sample_events(rng, **force), f"toy-{split}-{index:06d}", rng)

    def clips(self, n: int, split: str = "train", start: int = 0, **force) -> list:
        return [self.clip(i, split, **force) for i in range(start, start + n)]

    def mix_offscreen(self, clip: ToyClip, other: ToyClip, gain: float = 1.0) -> ToyClip:
        """Off-screen synthesis (stage 3): add `other`'s sound to `clip` without its picture, and its
        description to the caption as off-screen. Returns a new clip with the combined ground truth."""
        events = list(clip.events) + [Event(e.cls, e.onset, onscreen=False) for e in other.events]
        audio = clip.audio.astype(np.float64) + gain * other.audio[: len(clip.audio)]
        peak = np.abs(audio).max()
        if peak > 0.95:
            audio *= 0.95 / peak
        caption, off = caption_of(events)
        return ToyClip(clip_id=f"{clip.clip_id}+{other.clip_id}", audio=audio.astype(np.float32),
                       frames_sync=clip.frames_sync, frames_semantic=clip.frames_semantic,
                       caption=caption, offscreen=off, events=events, duration=clip.duration)
