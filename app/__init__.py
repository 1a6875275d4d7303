"""The FastAPI inference service: `python -m app` serves the model in ARTIFACTS_DIR."""
