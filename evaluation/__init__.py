"""Metrics, operating-point selection, reports, model comparison, waiting-list simulation."""
