"""Study specs, trial expansion, training, scheduling and the command line."""
