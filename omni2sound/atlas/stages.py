"""The SoundAtlas stages, each a small function; thresholds come from `AtlasConfig`.

1. audio-visual consistency routing (`route`): > enhanced_above -> "audio-visual" (enhanced path),
   [discard_below, enhanced_above] -> "audio-only", < discard_below -> "discarded";
2. vision-to-language compression (`vision_to_language`): the vision agent writes a short text context
   of the frames alone (enhanced path only), so the captioner reads text, not pixels;
3. junior-senior handoff (`junior_senior_handoff`, rule in `handoff_reason`): the junior captions from
   the audio plus that context; the senior rewrites when the junior calls the clip complex, the caption
   holds a known hallucination phrase, or CLAP(caption, audio) is under clap_handoff (clap_handoff_music for music);
4. post-hoc filtering (`post_filter`): CLAP(final caption, audio) must reach clap_filter (music:
   clap_filter_music), and on the enhanced path the audio-visual-text verifier must accept it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .backends import verdict_ok
from .config import AtlasConfig
from .types import Clip, Reply

ENHANCED, AUDIO_ONLY, DISCARDED = "audio-visual", "audio-only", "discarded"


@dataclass
class Trace:
    """Every agent call of one clip, for the record."""
    calls: list = field(default_factory=list)

    def add(self, role: str, reply: Reply) -> Reply:
        self.calls.append({"role": role, "agent": reply.agent, "prompt_tokens": reply.prompt_tokens,
                           "completion_tokens": reply.completion_tokens, "reasoning_tokens": reply.reasoning_tokens,
                           "cost": reply.cost, "attempts": reply.attempts})
        return reply

    @property
    def cost(self) -> float:
        return sum(c["cost"] for c in self.calls)


def route(av_score: float, cfg: AtlasConfig) -> str:
    if av_score > cfg.enhanced_above:
        return ENHANCED
    if av_score >= cfg.discard_below:
        return AUDIO_ONLY
    return DISCARDED


async def vision_to_language(clip: Clip, vision, trace: Trace) -> Optional[str]:
    if clip.frames is None or len(clip.frames) == 0:
        return None
    return trace.add("vision", await vision.describe_video(clip)).text.strip() or None


def is_music(record: dict, texts, cfg: AtlasConfig) -> bool:
    """Music clips get the lower CLAP thresholds: a manifest tag ("music": true, or "music" among its
    labels) or a music word in the context or the caption."""
    if record.get("music") is True or "music" in (record.get("labels") or ()):
        return True
    joined = " ".join(t for t in texts if t).lower()
    return any(re.search(r"\b" + re.escape(w) + r"\b", joined) for w in cfg.music_words)


def hallucination_phrase(caption: str, cfg: AtlasConfig) -> Optional[str]:
    low = caption.lower()
    return next((p for p in cfg.hallucination_phrases if p.lower() in low), None)


def handoff_reason(caption: str, complex_: bool, clap: float, music: bool, cfg: AtlasConfig) -> Optional[str]:
    """Why the clip goes to the senior, or None: complex, known hallucination phrase, low CLAP."""
    if complex_:
        return "complex"
    phrase = hallucination_phrase(caption, cfg)
    if phrase:
        return f"hallucination phrase: {phrase!r}"
    thr = cfg.clap_handoff_music if music else cfg.clap_handoff
    if clap < thr:
        return f"clap {clap:.3f} < {thr:g}"
    return None


async def junior_senior_handoff(clip: Clip, context: Optional[str], junior, senior, clap_score, trace: Trace,
                                cfg: AtlasConfig) -> dict:
    """The final caption, its author and the scores along the way. `clap_score(caption)` is async."""
    out: dict = {}
    if cfg.handoff != "senior-only":
        j = trace.add("junior", await junior.caption(clip, context))
        out["junior_caption"] = j.text
        out["clap_junior"] = await clap_score(j.text)
        music = is_music(clip.record, (context, j.text), cfg)
        reason = handoff_reason(j.text, j.complex, out["clap_junior"], music, cfg)
        out["handoff_reason"] = reason
        if cfg.handoff == "junior-only" or reason is None:
            out.update(caption=j.text, author="junior", clap=out["clap_junior"], music=music)
            return out
    s = trace.add("senior", await senior.caption(clip, context))
    out["senior_caption"] = s.text
    out["clap_senior"] = await clap_score(s.text)
    out.update(caption=s.text, author="senior", clap=out["clap_senior"],
               music=is_music(clip.record, (context, s.text), cfg))
    return out


async def post_filter(clip: Clip, caption: str, clap: float, music: bool, route_: str, context: Optional[str],
                      verifier, trace: Trace, cfg: AtlasConfig) -> tuple[bool, Optional[str], Optional[str]]:
    """(kept, reason when dropped, the verifier's answer or None)."""
    if not caption.strip():
        return False, "empty caption", None
    thr = cfg.clap_filter_music if music else cfg.clap_filter
    if clap < thr:
        return False, f"clap filter: {clap:.3f} < {thr:g}", None
    if route_ == ENHANCED and cfg.verify_enhanced:
        v = trace.add("verifier", await verifier.verify(clip, caption, context))
        if not verdict_ok(v.text):
            return False, f"verifier: {v.text.strip()[:200]}", v.text.strip()
        return True, None, v.text.strip()
    return True, None, None
