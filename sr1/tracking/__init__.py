"""Run tracking: the DuckDB run/result store (``store``), MLflow (``mlflow_log``), and the run context (``run``)."""
