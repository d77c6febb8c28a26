"""rcomp: adversarially robust in-train pruning, from training to a budget-checked ONNX model.

Importing ``rcomp`` must stay cheap and must not import torch: the checking half
(``rcomp check``, ``rcomp profiles``) runs on boards that only have onnxruntime. The Python API
(``rcomp.InTrainPruner``, ``rcomp.count_model``, ``rcomp.export_onnx``, ``rcomp.write_attack_set``,
``rcomp.check``, ``rcomp.attacks``; docs/python-api.md) is therefore loaded on first use, by
:func:`__getattr__`.
"""

__version__ = "0.1.0"

#: Public name -> (module, attribute or None for the module itself), imported on first access.
_LAZY = {
    "InTrainPruner": ("rcomp.pruner", "InTrainPruner"),
    "count_model": ("rcomp.api", "count_model"),
    "export_onnx": ("rcomp.api", "export_onnx"),
    "check": ("rcomp.api", "check"),
    "write_attack_set": ("rcomp.api", "write_attack_set"),
    "attacks": ("rcomp.attacks", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """``rcomp.InTrainPruner`` and the other API names, imported when first asked for (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'rcomp' has no attribute {name!r}")
    import importlib

    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
