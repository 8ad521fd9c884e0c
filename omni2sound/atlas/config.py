"""SoundAtlas configuration: every threshold of the pipeline's stages and each agent's backend in one place.

Thresholds are the paper's (audio-visual routing at 0.30 / 0.20 on the ImageBind score, handoff when
CLAP(caption, audio) < 0.35, or < 0.15 for music). The post-hoc CLAP filter's threshold is not given in
the paper; 0.30 (0.10 for music) keeps what the handoff let through unless the final caption still scores
poorly. Prices are USD per million tokens; the toy agents are priced as the models the paper used: Gemini 2.5
Flash (junior, verifier) and Gemini 2.5 Pro (senior, prompts under 200k tokens), Google's Gemini API list prices
(ai.google.dev/gemini-api/docs/pricing, standard tier, unchanged from the models' general availability in June
2025 to this writing, December 2026), so the toy world's cost ratios are those of the real pipeline, not a real
bill. Thinking tokens are billed as output: the `openai` preset turns the junior's thinking off and caps the
senior's at the paper's 128 tokens (Gemini's OpenAI-compatible `thinking_budget`), as the toy agents bill them;
left at its default, Gemini 2.5 Flash thinks on every caption and the junior is no longer cheap.

The config is saved as `config.json` beside the records; its hash (without the run-time fields, which do
not change what a record says) is part of every record's key, so a changed threshold never reuses old work.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

# USD per 1M tokens: input (text, image, video), audio input (None: the input price), output (reasoning included)
# (Gemini API list prices, see above; Pro's audio input is billed as text)
PRICES = {
    "gemini-2.5-flash": {"input": 0.30, "audio_input": 1.00, "output": 2.50},
    "gemini-2.5-pro": {"input": 1.25, "audio_input": None, "output": 10.0},
    "qwen2.5-vl-7b": {"input": 0.0, "audio_input": None, "output": 0.0},     # self-hosted: no per-token price
    "toy-vision": {"input": 0.0, "audio_input": None, "output": 0.0},         # Qwen2.5-VL, self-hosted
    "toy-junior": {"input": 0.30, "audio_input": 1.00, "output": 2.50},
    "toy-senior": {"input": 1.25, "audio_input": None, "output": 10.0},
    "toy-verifier": {"input": 0.30, "audio_input": 1.00, "output": 2.50},
}

HALLUCINATION_PHRASES = (
    # phrases that audio captioners write from priors rather than from the sound (checked case-insensitively)
    "music plays in the background", "background music", "a man speaks", "a woman speaks", "people talk",
    "birds chirp", "crowd cheers", "wind blows",
)

MUSIC_WORDS = ("music", "song", "singing", "sings", "guitar", "piano", "drums play", "orchestra", "melody")


@dataclass
class AgentConfig:
    """One agent of the pipeline: which backend answers and how it is paid for.

    backend: "toy" (the rule-based toy-world agent), "openai" (any OpenAI-compatible chat-completions
    server: `base_url`, `model`), "transformers" (a local model directory in `model`)."""
    backend: str = "toy"
    model: str = ""
    base_url: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 256
    temperature: float = 0.0
    reasoning_tokens: Optional[int] = None     # toy agents: thinking tokens billed per reply (the paper caps at 128)
    extra_body: Optional[dict] = None          # chat backends: server-specific fields (e.g. a thinking budget)
    send_audio: bool = True                    # attach audio as input_audio parts (servers without audio: False)
    send_frames: bool = True                   # attach frames as image parts
    price: Optional[dict] = None               # overrides PRICES[model]
    # the toy agents' behaviour (ignored by the other backends)
    error_rate: float = 0.0                    # a wrong count, a wrong class or a missed source
    hallucination_rate: float = 0.0            # a sound that is not there, appended to the caption
    context_help: float = 0.5                  # the error rate is multiplied by this when a video context is given
    detect_rate: float = 1.0                   # verifier: probability of rejecting a caption that is wrong
    false_reject_rate: float = 0.0             # verifier: probability of rejecting a right caption

    def price_per_token(self) -> dict:
        p = self.price or PRICES.get(self.model) or {"input": 0.0, "audio_input": None, "output": 0.0}
        text = p.get("input", 0.0)
        audio = text if p.get("audio_input") is None else p["audio_input"]
        return {"input": text / 1e6, "audio_input": audio / 1e6, "output": p.get("output", 0.0) / 1e6}


def _toy_agents() -> dict:
    return {
        "vision": AgentConfig(model="toy-vision", max_tokens=96, error_rate=0.02),
        "junior": AgentConfig(model="toy-junior", max_tokens=128, error_rate=0.08, hallucination_rate=0.06),
        "senior": AgentConfig(model="toy-senior", max_tokens=256, reasoning_tokens=128, error_rate=0.02,
                              hallucination_rate=0.01),
        "verifier": AgentConfig(model="toy-verifier", max_tokens=32, detect_rate=0.95, false_reject_rate=0.01),
    }


# fields that change how fast a run goes, never what it writes: left out of the config hash
RUNTIME_FIELDS = ("max_clips_in_flight", "max_requests_in_flight", "request_timeout", "max_attempts",
                  "backoff_base", "backoff_max", "media_threads", "fsync", "score_batch")


@dataclass
class AtlasConfig:
    # audio-visual consistency routing (on the audio-video scorer's cosine)
    enhanced_above: float = 0.30          # > this: audio-visual enhanced path
    discard_below: float = 0.20           # < this: discarded; in between: audio-only path
    # junior-senior handoff
    handoff: str = "auto"                 # "auto" (the paper's rule), "junior-only", "senior-only"
    clap_handoff: float = 0.35            # CLAP(caption, audio) under this hands the clip to the senior
    clap_handoff_music: float = 0.15
    hallucination_phrases: tuple = HALLUCINATION_PHRASES
    music_words: tuple = MUSIC_WORDS
    # post-hoc filtering
    clap_filter: float = 0.30
    clap_filter_music: float = 0.10
    verify_enhanced: bool = True          # the audio-visual-text verifier on the enhanced path
    # scorers: "toy", "imagebind:PATH", "laion-clap:PATH", "ms-clap:PATH", "const:0.5" or "module:callable"
    av_scorer: str = "toy"
    clap_scorer: str = "toy"
    # what the agents see
    frames_fps: float = 1.0               # frames sent to the vision agent and the verifier
    max_frames: int = 8
    frame_size: int = 336                 # shorter side of the frames sent (JPEG)
    audio_sample_rate: int = 16000
    agents: dict = field(default_factory=_toy_agents)   # role -> AgentConfig (vision, junior, senior, verifier)
    seed: int = 0                         # the toy agents' error draws
    # run time
    max_clips_in_flight: int = 256
    max_requests_in_flight: int = 64      # per chat server (agents with one base_url share the bound)
    request_timeout: float = 60.0         # seconds per request
    max_attempts: int = 5                 # per request, on 429 / 5xx / timeouts / dropped connections
    backoff_base: float = 0.5             # seconds; attempt k waits base * 2^k * U(0.5, 1.5), capped
    backoff_max: float = 30.0
    media_threads: int = 4
    score_batch: int = 32                 # clips per batched scorer forward (ImageBind, CLAP)
    fsync: bool = True

    def __post_init__(self):
        self.agents = {k: (v if isinstance(v, AgentConfig) else AgentConfig(**v)) for k, v in self.agents.items()}
        self.hallucination_phrases = tuple(self.hallucination_phrases)
        self.music_words = tuple(self.music_words)
        missing = {"vision", "junior", "senior", "verifier"} - set(self.agents)
        if missing:
            raise ValueError(f"AtlasConfig.agents lacks role(s) {sorted(missing)}")
        if not self.discard_below <= self.enhanced_above:
            raise ValueError(f"discard_below {self.discard_below} must be <= enhanced_above {self.enhanced_above}")
        if self.handoff not in ("auto", "junior-only", "senior-only"):
            raise ValueError(f"handoff must be auto, junior-only or senior-only, got {self.handoff!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hallucination_phrases"] = list(self.hallucination_phrases)
        d["music_words"] = list(self.music_words)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AtlasConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown AtlasConfig field(s) {bad}")
        return cls(**d)

    def save(self, path: str) -> None:
        import os
        import tempfile
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "AtlasConfig":
        with open(path) as f:
            try:
                return cls.from_dict(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None

    def content_hash(self) -> str:
        d = self.to_dict()
        for k in RUNTIME_FIELDS:
            d.pop(k, None)
        for a in d["agents"].values():      # where a model is served from does not change what it writes
            a.pop("api_key_env", None)
            a.pop("base_url", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _thinking_budget(tokens: int) -> dict:
    """The request field of Gemini's OpenAI-compatible endpoint that sets a 2.5 model's thinking budget
    (0 turns Flash's off; Pro's least is 128). Other servers ignore or reject it: set `extra_body` per agent."""
    return {"extra_body": {"google": {"thinking_config": {"thinking_budget": tokens}}}}


def preset(name: str) -> AtlasConfig:
    """Named presets: "toy" (rule-based agents, the default), "toy-junior-only", "toy-senior-only",
    "openai" (every agent on one OpenAI-compatible server; set base_url and models in a JSON config)."""
    if name == "toy":
        return AtlasConfig()
    if name == "toy-junior-only":
        return AtlasConfig(handoff="junior-only")
    if name == "toy-senior-only":
        return AtlasConfig(handoff="senior-only")
    if name == "openai":
        agents = {
            "vision": AgentConfig(backend="openai", model="qwen2.5-vl-7b", send_audio=False, max_tokens=96),
            "junior": AgentConfig(backend="openai", model="gemini-2.5-flash", max_tokens=128,
                                  extra_body=_thinking_budget(0)),
            "senior": AgentConfig(backend="openai", model="gemini-2.5-pro", max_tokens=384, reasoning_tokens=128,
                                  extra_body=_thinking_budget(128)),
            "verifier": AgentConfig(backend="openai", model="gemini-2.5-flash", max_tokens=32),
        }
        return AtlasConfig(agents=agents, av_scorer="imagebind:imagebind_huge.pth",
                           clap_scorer="laion-clap:630k-audioset-best.pt")
    raise ValueError(f"unknown preset {name!r}: toy, toy-junior-only, toy-senior-only, openai")
