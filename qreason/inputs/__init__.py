"""What a run reads: models, tasks and their problems, synthetic problems, step splitting, package data."""
