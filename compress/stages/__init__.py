"""Stage kinds: a plain table from the recipe's `kind` to (config class, apply function).

To add a kind: write a module with a Config subclass (with `kind: Literal["..."]`) and
`apply(model, ctx, cfg) -> (model, record)`, then add one line here.
"""

from compress.stages import prune

STAGES = {
    "prune": (prune.PruneConfig, prune.apply),
}
