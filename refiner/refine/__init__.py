"""Stage 4, build: the refined model, its fine-tuning and controls, ONNX export and the model repository."""
