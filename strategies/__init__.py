"""Flower Message-API strategies, registered in :data:`fedsim.strategy.STRATEGIES`.

Every module here registers one strategy (the file stem is the registry key
and the ``name:`` of ``configs/strategy/<name>.yaml``). Importing this package
imports them all.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
