"""Export to ONNX and everything that runs on the exported file.

Only :mod:`rcomp.export.onnx_export` needs torch. ``onnx_count``, ``runtime``, ``square`` and
``check`` import nothing heavier than onnx, onnxruntime and numpy, because ``rcomp check`` runs
on target boards that have only the light ``runtime`` install. Keep this file free of imports
so that importing one light submodule never drags torch in.
"""
