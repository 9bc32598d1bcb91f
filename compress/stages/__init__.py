"""Stage kinds: a plain table from the recipe's `kind` to (config class, apply function).

To add a kind: write a module with a Config subclass (with `kind: Literal["..."]`, `targets`,
`ignore` and `check_layers(layers, stage_key)`) and `apply(model, ctx, cfg) -> (model, record)`,
where the record has `as_dict()`, `summary()` and `seconds`; then add one line here.
"""

from compress.stages import lowrank, prune, quantize, recover, structured

STAGES = {
    "prune": (prune.PruneConfig, prune.apply),
    "lowrank": (lowrank.LowRankConfig, lowrank.apply),
    "quantize": (quantize.QuantizeConfig, quantize.apply),
    "recover": (recover.RecoverConfig, recover.apply),
    "structured": (structured.StructuredConfig, structured.apply),
}
