"""Correlation metrics, result tables and plots."""
