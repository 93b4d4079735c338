"""Celery workers, tasks and model engines."""
