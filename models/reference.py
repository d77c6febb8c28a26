"""Models by reference: the zoo, any torchvision classifier, or the user's own factory.

``--model`` takes one of

* a zoo name (``resnet20``, ``tiny_cnn`` ... see ``rcomp count --list-models``);
* ``torchvision:NAME`` — any classification builder of ``torchvision.models`` (random init, weights
  are never downloaded), built with the data's classes; when the data has other than 3 channels
  the first 3-channel convolution is replaced by one that takes them;
* ``path/to/file.py:factory`` or ``package.module:factory`` — the user's code:
  ``factory(num_classes=..., in_channels=..., **model_kwargs)`` returns an ``nn.Module`` mapping
  images to logits (arguments the factory does not take are not passed).

The result is wrapped like every zoo model, ``Classifier(Normalize(mean, std), net)``, so the
network sees normalized data while attacks, ONNX and the target see pixels in [0, 1]; with
``normalizes=True`` the user's module is used as is (it normalizes itself).

A checkpoint stores the reference string, the factory kwargs and the flag; loading it imports the
same code again (nothing is unpickled), so a pruned foreign model rebuilds wherever its code is
importable.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rcomp.errors import RcompError

TORCHVISION_PREFIX = "torchvision:"
#: Input (C, H, W) rcomp uses for a non-zoo model when no profile gives one.
DEFAULT_FOREIGN_INPUT = (3, 32, 32)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``: user code raises multi-line errors, the CLI prints one."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_zoo_name(ref: str) -> bool:
    """A bare name (no ``:``) refers to rcomp's own zoo."""
    return ":" not in str(ref)


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """``width=32,se=true,act=relu,drop=0.1`` → ``{"width": 32, "se": True, "act": "relu", "drop": 0.1}``.

    Values are read as int, then float, then bool (true/false/yes/no), else kept as strings, so a
    checkpoint can store them as plain values and rebuild the model with exactly the same call.
    """
    if not text:
        return {}
    out: dict[str, Any] = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise RcompError(f"--model-kwargs {text!r}: expected key=value pairs separated by commas, got {part.strip()!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        if not key.isidentifier():
            raise RcompError(f"--model-kwargs: {key!r} is not a valid argument name")
        out[key] = _parse_value(value)
    return out


def _parse_value(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    lowered = value.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("none", "null"):
        return None
    return value


# --------------------------------------------------------------------------------------------
# resolving a reference to a factory
# --------------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    """The torchvision builder as a ``factory(num_classes, in_channels, **kw)``, random init only."""
    import torchvision

    if name not in _torchvision_names():
        raise RcompError(f"torchvision:{name}: not a torchvision classification model; "
                         f"see torchvision.models.list_models(module=torchvision.models), e.g. resnet18, mobilenet_v3_small")
    builder = torchvision.models.get_model_builder(name)

    def factory(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> nn.Module:
        if kwargs.get("weights") is not None or kwargs.get("weights_backbone") is not None:
            raise RcompError("torchvision: rcomp never downloads weights; load your own with --weights FILE")
        kwargs.pop("weights", None)
        if name.startswith(("inception", "googlenet")):
            kwargs.setdefault("aux_logits", False)  # the auxiliary heads return tuples in train mode
            kwargs.setdefault("init_weights", True)  # what torchvision does anyway, without its warning
        net = builder(weights=None, num_classes=num_classes, **kwargs)
        return adapt_input_channels(net, in_channels)

    return factory


def _file_module(path: Path):
    """Import ``path`` once under a name derived from its absolute path (same file, same classes)."""
    path = path.resolve()
    name = f"rcomp_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RcompError(f"--model {path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in the user's file is reported in one line
        del sys.modules[name]
        raise RcompError(f"--model {path}: importing the file failed: {_one_line(exc)}") from None
    return module


def _python_module(dotted: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        raise RcompError(f"--model {dotted}: module not found ({exc.name}); is it installed or on PYTHONPATH?") from None
    except Exception as exc:  # noqa: BLE001
        raise RcompError(f"--model {dotted}: importing the module failed: {_one_line(exc)}") from None


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def resolve_factory(ref: str) -> Callable[..., nn.Module]:
    """The callable behind a ``torchvision:NAME``, ``file.py:factory`` or ``package.module:factory`` reference."""
    ref = str(ref)
    if ref.startswith(TORCHVISION_PREFIX):
        return _torchvision_factory(ref[len(TORCHVISION_PREFIX):])
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise RcompError(f"--model {ref!r}: expected a zoo name, torchvision:NAME, path/to/file.py:factory "
                         "or package.module:factory")
    if _looks_like_file(target):
        path = Path(target)
        if not path.is_file():
            raise RcompError(f"--model {ref}: file not found: {path}")
        module = _file_module(path)
    else:
        module = _python_module(target)
    factory = getattr(module, attr, None)
    if factory is None:
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise RcompError(f"--model {ref}: {target} has no {attr!r} (it defines: {', '.join(defined) or 'nothing callable'})")
    if not callable(factory):
        raise RcompError(f"--model {ref}: {attr} is a {type(factory).__name__}, not a callable factory")
    return factory


def _accepted(factory: Callable, kwargs: dict) -> dict:
    """The keyword arguments ``factory`` takes (all of them when it has ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def build_foreign(ref: str, num_classes: int, in_channels: int, factory_kwargs: dict | None = None) -> nn.Module:
    """Call the factory behind ``ref``; a one-line RcompError whatever goes wrong in the user's code."""
    factory = resolve_factory(ref)
    user = dict(factory_kwargs or {})
    base = _accepted(factory, {"num_classes": int(num_classes), "in_channels": int(in_channels)})
    unknown = set(user) - set(_accepted(factory, user))
    if unknown:
        raise RcompError(f"--model {ref}: the factory takes no argument {', '.join(sorted(unknown))} (--model-kwargs)")
    try:
        net = factory(**{**base, **user})
    except RcompError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
        raise RcompError(f"--model {ref}: the factory raised {_one_line(exc)}") from None
    if not isinstance(net, nn.Module):
        raise RcompError(f"--model {ref}: the factory returned a {type(net).__name__}, not a torch.nn.Module")
    if "in_channels" not in base and "in_channels" not in user:
        net = adapt_input_channels(net, in_channels)
    return net


def adapt_input_channels(net: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first convolution that reads 3 channels by one reading ``in_channels``.

    torchvision's classifiers take RGB; grayscale data (digits, GTSRB in gray) needs its own first
    layer. The first ``nn.Conv2d`` registered with 3 input channels is the stem in every torchvision
    classifier. Its weights are drawn anew (random init, like the rest of the model).
    """
    if in_channels == 3:
        return net
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                            module.dilation, 1, module.bias is not None, module.padding_mode)
            parent_name, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, leaf, new)
            return net
    raise RcompError(f"{type(net).__name__}: found no 3-channel convolution to adapt to {in_channels} input channels")


# --------------------------------------------------------------------------------------------
# checks and weights
# --------------------------------------------------------------------------------------------


def check_logits(model: nn.Module, input_shape, num_classes: int, ref: str) -> None:
    """One forward pass at ``(2, C, H, W)`` in eval mode: the output must be a ``[2, num_classes]`` tensor."""
    shape = (2, *tuple(input_shape)[-3:])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.rand(shape))
    except Exception as exc:  # noqa: BLE001 - the user's forward may raise anything
        raise RcompError(f"--model {ref}: forward pass at input {'x'.join(map(str, shape))} failed: {_one_line(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise RcompError(f"--model {ref}: forward returned a {type(out).__name__}, expected a logits tensor [N, {num_classes}]")
    if tuple(out.shape) != (shape[0], num_classes):
        raise RcompError(f"--model {ref}: output shape {list(out.shape)} at input {'x'.join(map(str, shape))}, "
                         f"expected [N, num_classes] = [{shape[0]}, {num_classes}]")


def read_state_dict(path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (``torch.load(weights_only=True)``: tensors and plain values only).

    With ``key`` the file is a checkpoint dict holding the state dict under it (``--weights-key``).
    A ``module.`` prefix on every key (a DataParallel/DDP save) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise RcompError(f"--weights {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RcompError(f"--weights {path}: holds objects that weights_only=True refuses to unpickle "
                         f"(save model.state_dict(), not the model): {_one_line(exc, 120)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise RcompError(f"--weights {path}: not a readable torch file: {_one_line(exc, 120)}") from None
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise RcompError(f"--weights-key {key!r}: not in {path} (top-level keys: {keys})")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise RcompError(f"--weights {path}: expected a state dict (name → tensor), got {type(obj).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        holders = [str(k) for k, v in obj.items() if isinstance(v, dict) and v and
                   all(isinstance(t, torch.Tensor) for t in v.values())]
        hint = f"; pass --weights-key {holders[0]}" if holders else ""
        raise RcompError(f"--weights {path}: a checkpoint dict, not a state dict (top-level keys: "
                         f"{', '.join(map(str, list(obj)[:8]))}){hint}")
    if all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module."):]: v for k, v in obj.items()}
    return obj


def _names(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(model: nn.Module, path, key: str | None = None) -> str:
    """Load ``--weights`` into ``model`` (into its ``net`` when the file holds the bare network).

    Every tensor must match by name and shape: missing, unexpected and differently shaped tensors
    are named in one line (exit 2), so a user sees which layers of their model and file disagree.
    Returns which module was loaded ("model" or "net").
    """
    state = read_state_dict(path, key)
    target, where = model, "model"
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and not any(str(k).startswith(("net.", "normalize.")) for k in state):
        target, where = net, "net"
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    shaped = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{len(v)} {what}: {_names(v)}" for what, v in
                (("missing", missing), ("unexpected", unexpected), ("with another shape", shaped)) if v]
    if problems:
        raise RcompError(f"--weights {path} does not fit the model: " + "; ".join(problems))
    target.load_state_dict(state, strict=True)
    return where
