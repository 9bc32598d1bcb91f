"""A run from recipe to published folder: the recipe schema, the engine, resume and publish, identity, validate, re-export, eval, sweep."""
