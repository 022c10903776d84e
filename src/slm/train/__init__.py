"""Training: recipes (config), the loop, checkpoints, data parallelism, metrics, the fused loss.

`slm train` calls `slm.train.loop.train(cfg)`; `slm export` calls `slm.train.export.export()`.
"""
