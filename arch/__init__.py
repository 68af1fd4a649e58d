"""Model code: layer allocation, layers, the hybrid LM, parameter and FLOP accounting."""
