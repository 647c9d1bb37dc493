"""Built-in methods, one small file each under prefill/ and decode/; importing this package imports
every module there, which registers them (a new method file needs no edit here)."""

import importlib
import pkgutil

from attnpatch.methods import decode, prefill

for _package in (prefill, decode):
    for _info in pkgutil.iter_modules(_package.__path__):
        importlib.import_module(f"{_package.__name__}.{_info.name}")
