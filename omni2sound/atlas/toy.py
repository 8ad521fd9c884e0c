"""The toy world's SoundAtlas: a manifest of toy clips, rule-based agents and content-based scorers.

These are simulations, not models. The agents read the toy world's ground truth (`omni2sound.toy`) and
make mistakes at set rates, so that what routing, handoff and filtering do can be measured exactly:
  - the vision agent describes the objects on screen and how often each is struck;
  - a captioner writes `toy.caption_of` of the clip's events, except that with probability `error_rate`
    (times `context_help` when a video context is given) it miscounts, names a wrong class or misses a
    source, and with probability `hallucination_rate` it appends a sound that is not there (half of those
    are phrases on the known-hallucination list, half are not);
  - the verifier rejects a caption that differs from the truth with probability `detect_rate` and a
    right one with `false_reject_rate`.
Token counts follow what a real request of that shape would use (32 audio tokens per second and 258
tokens per frame, as Gemini counts them; 1.3 tokens per word), so costs come out of the price table.

The scorers are computed from the media, not from the truth: the audio-video score compares the classes
seen in the frames (by colour) with the classes the oracle hears; the text-audio score compares the sound
items a caption names with those the oracle hears. They stand in for ImageBind and CLAP on this world
only, on the same scale as the paper's thresholds (a matching pair scores 0.40 / 0.60).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from typing import Optional

import numpy as np

from ..toy import CLASSES, CONTINUOUS, COUNTS, IMPULSIVE, LOOKS, VERBS, Event, ToyConfig, ToyWorld, caption_of
from .config import AgentConfig
from .types import Clip, Reply

# sounds a captioner may invent: the first four are on the config's known-hallucination list, the rest not
FOREIGN = ("music plays in the background", "a man speaks", "birds chirp", "crowd cheers",
           "a dog barks", "rain falls", "a car horn honks", "footsteps approach")
_COUNT_WORDS = {v: k for k, v in COUNTS.items()}
_ITEM_RE = {cls: re.compile(re.escape(VERBS[cls]) + (r"(?: (once|twice|three times))?" if cls in IMPULSIVE else ""))
            for cls in CLASSES}
SHAPES = {"rect": "a grey rectangle", "square": "a red square", "disc": "a yellow disc", "bar": "a green bar",
          "triangle": "a blue triangle"}


# ---------------------------------------------------------------------------------------------- truth
def toy_truth(record: dict) -> tuple[list, list]:
    """(audio events, video events) of a toy manifest record (its "toy" field)."""
    t = record["toy"]
    world = _world(t["seed"], t.get("duration", 2.0), t.get("p_offscreen", 0.1))
    audio = world.sample_events(world.rng(t["index"], t["split"]))
    vi = t.get("video_index", t["index"])
    video = audio if vi == t["index"] else world.sample_events(world.rng(vi, t["split"]))
    return audio, video


_WORLDS: dict = {}


def _world(seed: int, duration: float, p_offscreen: float) -> ToyWorld:
    key = (seed, duration, p_offscreen)
    if key not in _WORLDS:
        _WORLDS[key] = ToyWorld(ToyConfig(seed=seed, duration=duration, p_offscreen=p_offscreen))
    return _WORLDS[key]


def items_of_events(events: list) -> Counter:
    """The sound items a perfect caption names: (class, strike count) for impulsive, (class, 0) for continuous."""
    c = Counter(e.cls for e in events)
    return Counter({(k, n if k in IMPULSIVE else 0): 1 for k, n in c.items()})


def parse_caption(text: str) -> tuple[Counter, list]:
    """(toy sound items named, foreign sounds named) of a caption; an impulsive class without a count is count 1."""
    text = (text or "").lower()
    items = Counter()
    for cls, rx in _ITEM_RE.items():
        for m in rx.finditer(text):
            n = _COUNT_WORDS.get(m.group(1), 1) if cls in IMPULSIVE else 0
            items[(cls, n)] += 1
    foreign = [f for f in FOREIGN if f in text]
    return items, foreign


def caption_correct(text: str, audio_events: list) -> bool:
    items, foreign = parse_caption(text)
    return not foreign and items == items_of_events(audio_events)


def has_hallucination(text: str) -> bool:
    return bool(parse_caption(text)[1])


# ---------------------------------------------------------------------------------------------- manifest
def write_toy_manifest(out_dir: str, n: int, seed: int = 0, split: str = "train", p_mismatch: float = 0.1,
                       p_offscreen: float = 0.15, duration: float = 2.0, size: int = 64) -> str:
    """Write n toy clips (WAV + MP4) and their manifest under out_dir; returns the manifest's path.

    A fraction p_mismatch of the clips pairs the audio with another clip's video (what routing discards);
    p_offscreen of the scenes have an off-screen source (what routing sends to the audio-only path)."""
    import soundfile as sf

    from ..video import write_video
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    world = _world(seed, duration, p_offscreen)
    world.cfg.size = size
    rng = np.random.default_rng([seed, 7])
    path = os.path.join(out_dir, "manifest.jsonl")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(n):
            clip = world.clip(i, split)
            vi = int((i + 1 + rng.integers(n - 1)) % n) if (n > 1 and rng.random() < p_mismatch) else i
            vclip = clip if vi == i else world.clip(vi, split)
            wav = os.path.join("clips", f"{clip.clip_id}.wav")
            mp4 = os.path.join("clips", f"{clip.clip_id}.mp4")
            if not os.path.exists(os.path.join(out_dir, wav)):
                sf.write(os.path.join(out_dir, wav), clip.audio, world.cfg.sample_rate, subtype="PCM_16")
            if not os.path.exists(os.path.join(out_dir, mp4)):
                write_video(os.path.join(out_dir, mp4), vclip.frames_semantic, world.cfg.semantic_fps)
            rec = {"clip_id": clip.clip_id, "audio": wav, "video": mp4, "start": 0.0, "duration": duration,
                   "source": "toy", "split": split,
                   "toy": {"seed": seed, "split": split, "index": i, "video_index": vi, "duration": duration,
                           "p_offscreen": p_offscreen}}
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- scorers
_ORACLE = None


def _heard(audio: np.ndarray) -> Counter:
    global _ORACLE
    if _ORACLE is None:
        from ..oracle import Oracle
        _ORACLE = Oracle()
    return items_of_events([Event(e["cls"], e["onset"]) for e in _ORACLE.analyse(audio)])


def seen_classes(frames: np.ndarray, min_pixels: int = 24, tol: int = 45) -> set:
    """Classes whose colour (or its strike flash) covers min_pixels of some frame. Video coding blends the
    edges of objects into greys, so a handful of near-matching pixels is not an object (an object at the
    toy manifest's 64 x 64 frames covers 70 pixels or more)."""
    if frames is None or len(frames) == 0:
        return set()
    f = frames.astype(np.int32)
    seen = set()
    for cls, (colour, _) in LOOKS.items():
        c = np.asarray(colour, np.int32)
        for ref in (c, (0.4 * c + 0.6 * 255).astype(np.int32)):
            if ((np.abs(f - ref).sum(-1) < tol).sum(axis=(1, 2)) >= min_pixels).any():
                seen.add(cls)
                break
    return seen


class ToyAVScorer:
    """Audio-video agreement on the toy world: 0.05 + 0.35 * Jaccard(classes seen, classes heard)."""
    name = "toy-av"

    def score(self, clip: Clip) -> float:
        heard = {k for k, _ in _heard(clip.audio)}
        seen = seen_classes(clip.frames)
        if not heard and not seen:
            return 0.05
        return 0.05 + 0.35 * len(heard & seen) / len(heard | seen)


class ToyClapScorer:
    """Text-audio agreement on the toy world: 0.15 + 0.45 * (items both named and heard) /
    (items named or heard, a named sound that is not a toy sound counted twice)."""
    name = "toy-clap"

    def score(self, clip: Clip, caption: str) -> float:
        named, foreign = parse_caption(caption)
        heard = _heard(clip.audio)
        match = sum((named & heard).values())
        union = sum((named | heard).values()) + 2 * len(foreign)
        return 0.15 + 0.45 * (match / union if union else 0.0)


# ---------------------------------------------------------------------------------------------- agents
def _rng(*keys) -> np.random.Generator:
    """The draws of one agent on one clip: the same clip gets the same draws under every config."""
    h = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _tokens(words: str) -> int:
    return max(1, int(round(1.3 * len(words.split()))))


def _perturb(events: list, rng: np.random.Generator) -> list:
    """One mistake: a wrong strike count, a wrong class, or a source left out (never an empty scene)."""
    events = [Event(e.cls, e.onset, e.onscreen) for e in events]
    kinds = ["count", "class"] + (["miss"] if len({e.cls for e in events}) > 1 else [])
    kind = kinds[rng.integers(len(kinds))]
    classes = sorted({e.cls for e in events})
    target = classes[rng.integers(len(classes))]
    if kind == "miss":
        return [e for e in events if e.cls != target]
    if kind == "class":
        pool = [c for c in (IMPULSIVE if target in IMPULSIVE else CONTINUOUS) if c not in classes]
        if not pool:
            kind = "count"
        else:
            new = pool[rng.integers(len(pool))]
            return [Event(new if e.cls == target else e.cls, e.onset, e.onscreen) for e in events]
    imp = [c for c in classes if c in IMPULSIVE]
    target = imp[rng.integers(len(imp))]
    hits = [e for e in events if e.cls == target]
    if len(hits) > 1 and rng.random() < 0.5:
        drop = hits[-1]
        return [e for e in events if e is not drop]
    return events + [Event(target, hits[-1].onset + 0.3, hits[-1].onscreen)] if len(hits) < 3 else \
        [e for e in events if e is not hits[-1]]


class ToyAgent:
    """A rule-based agent of one role (vision, junior, senior, verifier) on the toy world."""

    def __init__(self, role: str, cfg: AgentConfig, seed: int = 0):
        self.role, self.cfg, self.seed = role, cfg, seed
        self.name = f"{cfg.backend}:{cfg.model or role}"
        self.prices = cfg.price_per_token()

    def _reply(self, text: str, prompt_tokens: int, audio_tokens: int, completion_tokens: int,
               reasoning: int = 0, **extra) -> Reply:
        p = self.prices
        cost = (prompt_tokens - audio_tokens) * p["input"] + audio_tokens * p["audio_input"] + \
            (completion_tokens + reasoning) * p["output"]
        return Reply(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens + reasoning,
                     reasoning_tokens=reasoning, cost=cost, agent=self.name, **extra)

    async def describe_video(self, clip: Clip) -> Reply:
        _, video = toy_truth(clip.record)
        rng = _rng(self.seed, self.role, clip.record["clip_id"])
        on = [e for e in video if e.onscreen]
        if rng.random() < self.cfg.error_rate:
            on = [e for e in _perturb(on, rng) if e.onscreen]
        by = Counter(e.cls for e in on)
        parts = [f"{SHAPES[LOOKS[c][1]]} ({c}) " + (f"jumps and flashes {COUNTS[n]}" if c in IMPULSIVE else
                                                     "stays in place and vibrates" if c == "engine" else "stays still")
                 for c, n in by.items()]
        text = "On screen: " + "; ".join(parts) + "." if parts else "Nothing moves on screen."
        n_frames = len(clip.frames) if clip.frames is not None else 0
        return self._reply(text, 120 + 258 * n_frames, 0, _tokens(text))

    async def caption(self, clip: Clip, context: Optional[str]) -> Reply:
        audio, _ = toy_truth(clip.record)
        rng = _rng(self.seed, self.role, clip.record["clip_id"])
        rate = self.cfg.error_rate * (self.cfg.context_help if context else 1.0)
        events = _perturb(audio, rng) if rng.random() < rate else audio
        text, _ = caption_of(events)
        injected = None
        if rng.random() < self.cfg.hallucination_rate:
            injected = FOREIGN[rng.integers(len(FOREIGN))]
            text = f"{text} while {injected}"
        complex_ = len({e.cls for e in events}) >= 3       # three sources overlap
        audio_tokens = int(round(32 * clip.duration))
        prompt = 150 + audio_tokens + (_tokens(context) if context else 0)
        reasoning = self.cfg.reasoning_tokens or 0
        return self._reply(text, prompt, audio_tokens, _tokens(text) + 8, reasoning, complex=complex_,
                           injected=injected)

    async def verify(self, clip: Clip, caption: str, context: Optional[str]) -> Reply:
        audio, _ = toy_truth(clip.record)
        rng = _rng(self.seed, self.role, clip.record["clip_id"], caption)
        right = caption_correct(caption, audio)
        reject = rng.random() < (self.cfg.false_reject_rate if right else self.cfg.detect_rate)
        text = "no: the caption does not match the clip" if reject else "yes"
        n_frames = len(clip.frames) if clip.frames is not None else 0
        audio_tokens = int(round(32 * clip.duration))
        return self._reply(text, 130 + audio_tokens + 258 * n_frames + _tokens(caption) + _tokens(context or ""),
                           audio_tokens, _tokens(text))
