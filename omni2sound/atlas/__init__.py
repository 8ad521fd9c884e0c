"""SoundAtlas: the agentic caption pipeline (routing, vision-to-language, junior-senior handoff, filtering).

    python -m omni2sound.atlas --manifest clips.jsonl --out atlas/        # or no --manifest: the toy world
"""
from .config import PRICES, AgentConfig, AtlasConfig, preset
from .runner import Runner, finalize, load_done, read_input_manifest
from .stages import handoff_reason, junior_senior_handoff, post_filter, route, vision_to_language

__all__ = ["PRICES", "AgentConfig", "AtlasConfig", "preset", "Runner", "finalize", "load_done",
           "read_input_manifest", "handoff_reason", "junior_senior_handoff", "post_filter", "route",
           "vision_to_language"]
