"""GPU model code: the Llama-family decoder, paged KV cache, LoRA slot pool and the step runner.

Imports torch and lorasrv_kernels; never asyncio, never lorasrv.engine.
"""
