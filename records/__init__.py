"""The study's record: what a trial's MLflow run holds and how it is written and read.

Below both ``runners`` (which writes runs) and ``analysis`` (which reads them): it
imports neither.
"""
