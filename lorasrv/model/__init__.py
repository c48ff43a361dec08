"""GPU model code: the Llama-family decoder, the arena (KV pages and LoRA rows), the step runner.

Imports torch and lorasrv_kernels; never asyncio, never lorasrv.engine.
"""
