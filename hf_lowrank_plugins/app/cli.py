"""``hf-lowrank``: list methods, train one, compare several, merge an adapter, talk to a model.

The arguments are read in :mod:`.parser`, each command runs in :mod:`.commands`; here is what every
command shares: signals, logging, and how an error ends the process. Bad input exits with status 2 and exactly one line on stderr (no traceback) and writes
nothing; a broken plugin or a diverged run exits 1 with one line; an unexpected internal error
prints one line and the hint to rerun with ``--debug`` (or ``HF_LOWRANK_DEBUG=1``) for the traceback.
A normal run prints our own lines, the progress bar and the Trainer's logs; ``-v`` shows every
library's warnings and logs too.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
import traceback
import warnings

from ..errors import DivergenceError, LowRankError, PluginError
from . import commands
from .parser import parse_args
from .push import PushError


def quiet_third_parties() -> None:
    """Hide other libraries' warnings and info logs (our own lines, the progress bar and the Trainer's
    logs stay); ``-v`` skips this."""
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for name in ("bitsandbytes", "peft", "accelerate", "torch", "datasets", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``kill``, torchrun ending its workers), handled as Ctrl-C is: every
    ``with OutputSet`` and the Trainer unwind as for an interrupt, so outputs stay consistent."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-lowrank`` command."""
    debug = os.environ.get("HF_LOWRANK_DEBUG", "").lower() in ("1", "true", "yes")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        ns = parse_args(argv)
        debug = debug or ns.debug
        if not ns.verbose:
            quiet_third_parties()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars; the Trainer's own progress bar stays
        status = int(getattr(commands, f"{ns.command}_command")(ns))
        sys.stdout.flush()  # here, not at exit: a reader gone by now is a BrokenPipeError this function handles
        return status
    except SystemExit as exc:  # --help, or a library calling sys.exit
        return int(exc.code or 0) if isinstance(exc.code, int) else 0
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        _end_progress_bars()
        print(f"hf-lowrank: {how}; completed outputs are intact, partial ones were not written", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `hf-lowrank list | head -1`: the reader left, as `head` means it to
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would fail again on the closed pipe
        return 141
    except (PluginError, DivergenceError, PushError) as exc:  # not the input: a broken plugin, a diverged run, ...
        print(f"hf-lowrank: error: {_one_line(exc)}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return 1
    except LowRankError as exc:
        if os.environ.get("RANK", "0") in ("", "0"):  # every rank of a launch meets bad input alike: rank 0 says it
            print(f"hf-lowrank: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"hf-lowrank: error: {_one_line(exc)}; check the path and its permissions", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in _FULL_DISK:
            where = f" writing {exc.filename}" if exc.filename else ""
            print(
                f"hf-lowrank: error: no space left{where} ({exc.strerror}): free space or raise the file-size limit, "
                "then run again; no complete output was replaced",
                file=sys.stderr,
            )
            return 1
        print(
            f"hf-lowrank: internal error: {type(exc).__name__}: {_one_line(exc)[:300]}; rerun with --debug for the "
            "traceback",
            file=sys.stderr,
        )
        return 1


#: A full disk, a file-size limit or a quota: the environment, not the input, and not our bug.
_FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, after ending a progress bar that was cut off mid-line."""
    _end_progress_bars()
    return " ".join(str(exc).split())


def _end_progress_bars() -> None:
    """Close the bars an exception cut off, so their line ends before ours (and none redraws after it)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        for bar in list(tqdm.tqdm._instances):
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
