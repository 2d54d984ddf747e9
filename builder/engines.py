"""What gets compiled: the engines of one build, each a tensor-in / tensor-out module with static shapes per
resolution profile. The public import path of the builder's engine model; the engines themselves are declared
by their stage families in `fvrt.builder.stages` (text, dit, video, audio), the shapes in `fvrt.runtime.shapes`.
"""

from __future__ import annotations

from fvrt.builder.stages import ENGINE_NAMES, STAGE_GROUPS, engine_specs
from fvrt.builder.stages.base import EngineSpec
from fvrt.builder.stages.dit import (
    BLOCK_ENGINE,
    DiTBlockEngine,
    block_engine_name,
    dit_forward_kwargs,
    dit_reference,
    is_block_engine,
)
from fvrt.runtime.shapes import PRESET_PROFILES, Profile

__all__ = [
    "BLOCK_ENGINE",
    "ENGINE_NAMES",
    "PRESET_PROFILES",
    "STAGE_GROUPS",
    "DiTBlockEngine",
    "EngineSpec",
    "Profile",
    "block_engine_name",
    "dit_forward_kwargs",
    "dit_reference",
    "engine_specs",
    "is_block_engine",
]
