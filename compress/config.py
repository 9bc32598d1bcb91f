"""The base every recipe section derives from: frozen, and unknown keys are errors.

Each module defines the config of what it does (data.py its segments, stages/prune.py its stage);
recipe.py only composes them and reads YAML.
"""

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _compiled(patterns: list[str]) -> list[str]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"bad regular expression {p!r}: {err}") from err
    return patterns


# A stage's `targets` / `ignore`: regexes on full module names, each checked to compile.
LayerPatterns = Annotated[list[str], AfterValidator(_compiled)]
