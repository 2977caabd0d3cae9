"""Serving albef models: the MLflow pyfunc wrapper for retrieval."""
