"""``platform sweep``: a YAML sweep -> Ray Tune (grid or Optuna) -> MLflow, resumable.

plan.py expands and validates a sweep; driver.py runs it (pre-trainings first, then the trials
as a Tune function trainable); trial.py is what one trial runs; progress.py the live table.
"""
