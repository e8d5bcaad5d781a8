"""Hook stages, compatible with nvalchemi's ``HookStageEnum`` by name and by value.

Why our own enum: we are duck-type compatible with nvalchemi and do not depend on it. Engines pass
their own enum members; we compare by *name* first (robust to renumbering in newer releases that add
stages such as ON_ADMISSION) and fall back to the integer value. Unknown stages never match.
"""
from __future__ import annotations

import enum
from typing import Any


class Stage(enum.IntEnum):
    BEFORE_STEP = 0
    BEFORE_PRE_UPDATE = 1
    AFTER_PRE_UPDATE = 2
    BEFORE_COMPUTE = 3
    AFTER_COMPUTE = 4
    BEFORE_POST_UPDATE = 5
    AFTER_POST_UPDATE = 6
    AFTER_STEP = 7
    ON_CONVERGE = 8


def as_stage(stage: Any) -> Stage | None:
    """Map an engine's stage (enum member, name or int) to ours; ``None`` when it is unknown."""
    if stage is None:
        return None
    if isinstance(stage, Stage):
        return stage
    name = getattr(stage, "name", stage if isinstance(stage, str) else None)
    if isinstance(name, str):
        return Stage.__members__.get(name.upper())
    try:
        return Stage(int(stage))
    except (TypeError, ValueError):
        return None


def stage_matches(wanted: Any, got: Any) -> bool:
    """True when ``got`` is the stage ``wanted`` (each given as enum, name or value)."""
    w, g = as_stage(wanted), as_stage(got)
    return w is not None and w == g
