"""Launching: the `longctx` CLI (`cli.py`), the config resolved once on the driver
(`resolve.py`), the Ray TorchTrainer driver (`driver.py`) and MLflow run set-up (`tracking.py`).
"""
