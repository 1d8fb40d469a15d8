"""The worker service: Celery workers that take explain jobs from Redis and store heatmaps.

It stands on the engine (``onnxcam.worker``); the engine never imports it.
"""
