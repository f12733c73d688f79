"""Run configuration: the schemas (``schema``; ``judge`` for the judge panel) and loading. A leaf: imports no
stage."""
