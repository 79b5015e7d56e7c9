"""Reading and writing files: safetensors checkpoints and the output directories dgemma writes."""
