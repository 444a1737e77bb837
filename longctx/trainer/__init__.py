"""Training on each worker: the loop (`loop.py`), data sources and packing, the loss, engines
(DeepSpeed ZeRO / DDP), checkpoints, evaluation and metrics to MLflow.
"""
