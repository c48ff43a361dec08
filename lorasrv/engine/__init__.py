"""Engine core: actors, pure scheduling and adapter rules. Only gpu_runner.py imports the model."""
