"""A run from a config: the plan, the executor, provenance and the loop over the stages."""
