"""Corpora to token shards, the trainer's batches, probe tasks and evaluation."""

from data.corpus import DataError
from data.trial import TrialData, open_data

__all__ = ["DataError", "TrialData", "open_data"]
