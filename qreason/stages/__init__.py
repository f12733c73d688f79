"""The stages of a run, in the order they run (see ``qreason.pipeline.runner``)."""
