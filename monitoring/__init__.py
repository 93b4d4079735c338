"""Prometheus metrics, dashboards and alert rules."""
