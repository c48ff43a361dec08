"""Tensor parallelism: one worker process per rank behind a coordinator that speaks StepRunner.

Only `lorasrv.engine.gpu_runner` imports this package (like `lorasrv.model`); see
docs/architecture.md for the process layout.
"""
