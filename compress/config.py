"""The base every recipe section derives from: frozen, and unknown keys are errors.

Each module defines the config of what it does (data.py its segments, stages/prune.py its stage);
recipe.py only composes them and reads YAML.
"""

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
