"""rcomp: adversarially robust in-train pruning, from training to a budget-checked ONNX model.

Importing ``rcomp`` must stay cheap and must not import torch: the checking half
(``rcomp check``, ``rcomp profiles``) runs on boards that only have onnxruntime.
"""

__version__ = "0.1.0"
