"""The ``rcomp`` command line: a thin click layer over the pipeline stages.

Torch-using stages are imported inside the commands, so ``rcomp check`` and ``rcomp profiles``
work with the light ``runtime`` install (onnxruntime + numpy + pyyaml) on a target board.
Exit codes: 0 ok, 1 a budget or floor failed, 2 bad input, 3 training failed (a non-finite loss, or
catastrophic overfitting the guard could not recover from), 4 an internal error (a bug in rcomp),
130 interrupted (Ctrl-C). docs/bad-input.md lists what maps to which.
"""

from __future__ import annotations

import errno
import math
import os
import traceback

import click

from rcomp import __version__
from rcomp.errors import NumericalError, RcompError

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_NUMERICAL, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

#: OSErrors that are the machine's or the user's doing (a full disk, a read-only or forbidden path), not a bug.
_ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.EDQUOT)


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _bad_input_message(err: BaseException) -> str | None:
    """The one-line message of an exception that is bad input although it is not an RcompError."""
    if isinstance(err, MemoryError):
        return "out of memory: an input (data, image, input shape or attack set) is too large for this machine"
    if type(err).__name__ == "DecompressionBombError":  # PIL's, without importing PIL here
        return f"refusing a decompression-bomb image: {_one_line(err)}"
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or err}"
    return None


class _Group(click.Group):
    """Turns every failure into one line on stderr and the documented exit code.

    rcomp's user errors and the bad inputs that surface as other exceptions exit 2, numerical
    faults 3, Ctrl-C 130; anything else is a bug and exits 4 (never 1, which means "a budget or
    floor failed"), with its traceback when RCOMP_DEBUG=1.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own usage errors (exit 2) and exits
        except RcompError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except NumericalError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(EXIT_NUMERICAL)
        except KeyboardInterrupt:
            click.echo("error: interrupted; outputs were not published "
                       "(a train or prune run continues from its last checkpoint with --resume)", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as err:  # noqa: BLE001 - the last line of defence: never a bare traceback + exit 1
            message = _bad_input_message(err)
            if message is not None:
                click.echo(f"error: {message}", err=True)
                ctx.exit(EXIT_BAD_INPUT)
            if os.environ.get("RCOMP_DEBUG"):
                traceback.print_exc()
            click.echo(f"error: internal error: {type(err).__name__}: {_one_line(err)} "
                       "(a bug in rcomp; rerun with RCOMP_DEBUG=1 for the traceback)", err=True)
            ctx.exit(EXIT_INTERNAL)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which lets ``nan`` (and ``inf`` without a max) through, minus those."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


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
    from rcomp.guards import check_input_shape

    check_input_shape(shape, "--input")
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
