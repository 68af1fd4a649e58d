"""Scaling-law fits, extrapolation, plots and reports over finished studies."""
