"""The training engine shared by every task."""
