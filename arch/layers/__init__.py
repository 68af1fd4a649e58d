"""One module per layer type, each registering its ``LayerType`` (arch/registry.py).

Importing this package imports them all: the paper's four first, in the order reports
list them, then every other module here, so a new layer type needs no edit elsewhere.
"""

import importlib
import pkgutil

PAPER_LAYERS = ("mamba2", "mamba1", "attention", "mlp")

_others = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in PAPER_LAYERS)
for _module in (*PAPER_LAYERS, *_others):
    importlib.import_module(f"{__name__}.{_module}")
