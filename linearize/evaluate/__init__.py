"""Scoring teacher and student side by side."""
