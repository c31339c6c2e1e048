"""HTTP serving of refined models from a model repository (KServe v2 / Open Inference Protocol).

Depends on the artifact format only (serving/schema.py, which refiner writes with), never on `refiner`.
Run with `uvicorn serving.app:app` (settings from REFINER_SERVE_* variables).
"""
