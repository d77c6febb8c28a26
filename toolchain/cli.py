"""The ``rcomp`` command line: a thin click layer over the pipeline stages.

Torch-using stages are imported inside the commands, so ``rcomp check`` and ``rcomp profiles``
work with the light ``runtime`` install (onnxruntime + numpy + pyyaml) on a target board.
Exit codes: 0 ok, 1 a budget or floor failed, 2 bad input, 3 training failed (a non-finite loss, or
catastrophic overfitting the guard could not recover from).
"""

from __future__ import annotations


import click

from rcomp import __version__
from rcomp.errors import NumericalError, RcompError

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_NUMERICAL = 0, 1, 2, 3


class _Group(click.Group):
    """Turns rcomp's user errors into one line on stderr and the documented exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RcompError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except NumericalError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(EXIT_NUMERICAL)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``1,3,32,32`` or ``3x32x32`` → a tuple; a one-line error otherwise."""
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise RcompError(f"--input {text!r}: expected integers like 1,3,32,32") from None
    if len(shape) not in (3, 4) or min(shape) <= 0:
        raise RcompError(f"--input {text!r}: expected C,H,W or N,C,H,W with positive sizes")
    if len(shape) == 4 and shape[0] != 1:
        raise RcompError(f"--input {text!r}: rcomp counts and exports at batch 1")
    return shape if len(shape) == 4 else (1, *shape)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rcomp")
def cli():
    """rcomp: train a robust CNN that is pruned during training to fit a hardware budget,
    remove the pruned channels, count it, export it to ONNX and check it under onnxruntime.

    \b
    The whole job, on the download-free default data:
      rcomp prune --profile profiles/jetson.yaml --out runs/jetson
    Stage by stage:
      rcomp train  --model resnet20 --data digits --target-ops 0.5 --out runs/r20
      rcomp count  runs/r20/model.pt --profile jetson
      rcomp export runs/r20/model.pt --profile jetson --out runs/r20/model.onnx
      rcomp check  runs/r20/model.onnx --profile jetson --attack-set runs/r20/adv.npz
      rcomp eval   runs/r20/model.pt --data imagefolder:DIR --split test --sanity
    """


def main() -> None:
    cli(prog_name="rcomp")


# The commands live in rcomp.commands; importing them registers them on ``cli``.
from rcomp import commands as _commands  # noqa: E402,F401
