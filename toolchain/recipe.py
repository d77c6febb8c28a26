"""The training recipe: what ``TrainConfig`` holds, and the keys it no longer takes.

Imports no torch, so recipes can be checked where only the light runtime is installed.
"""

from __future__ import annotations

from typing import Any, Mapping

from rcomp.errors import ConfigError

#: The commit where the removed options' code last existed (``git checkout`` it to run them again).
REMOVED_AT = "6311216"

#: Options the benchmarks measured as no gain or a loss (docs/ablations.md), with the value that
#: meant "off": a resumed checkpoint that holds that value trained exactly as rcomp trains now.
REMOVED_KEYS: dict[str, Any] = {
    "mask_norm_stats": "batch",   # BatchNorm on running statistics / a mask pass: -15.4 / -4.1 / -1.0 points
    "width_probe_every": 0,       # removal-based width signal: -1.9 / -0.9 points, 1.35-1.42x slower mask epochs
    "mask_momentum": None,        # with mask_lr_scale: -7.9 points
    "mask_lr_scale": 1.0,
    "lr_restart": False,          # a warm restart after the freeze: -2.5 points at 0.3 of the ops
}


def reject_removed_keys(values: Mapping[str, Any], source: str | None = None, *, only_changed: bool = False) -> None:
    """Refuse a recipe (or a checkpoint's config) that names an option rcomp no longer has.

    Why: silently ignoring it would train something else than the recipe says. A checkpoint
    stores every key, the removed ones at their "off" value too; ``only_changed`` lets those
    through, because such a run trained exactly as the code without the option does.
    """
    for key, off in REMOVED_KEYS.items():
        if key in values and not (only_changed and values[key] == off):
            raise ConfigError(f"was removed from rcomp (no measured gain, docs/ablations.md); its code last existed "
                              f"at commit {REMOVED_AT}: drop the key", path=source, key=key)
