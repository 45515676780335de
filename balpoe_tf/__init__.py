"""BalPoE: Balanced Product of Calibrated Experts for long-tailed recognition.

Importing this package sets the TensorFlow defaults the project relies on, so
import it before `tensorflow` or `keras`.
"""

import contextlib
import os
import signal
import sys

# Keras 3 picks its backend at import time; the custom train_step is TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# oneDNN kernels doubled ResNet-32 training throughput on the project's CPUs
# (see docs in README); TensorFlow reads this only when it is first imported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# Whether the user set TensorFlow's C++ log level: then the tools show what it lets through.
_USER_TF_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


def logs_wanted(argv=None) -> bool:
    """Whether the user asked for TensorFlow's C++ logs: TF_CPP_MIN_LOG_LEVEL set, or absl's
    --verbosity (-v) on the command line."""
    args = sys.argv[1:] if argv is None else argv
    return _USER_TF_LOG_LEVEL is not None or any(
        a in ("-v", "--verbosity") or a.startswith(("-v=", "--verbosity=", "--v=")) for a in args)


@contextlib.contextmanager
def quiet_native_stderr():
    """Hide what native code writes to standard error inside the block (TensorFlow's C++
    start-up lines, libjpeg's complaints about the damaged files the image check names)
    unless the user asked for logs (`logs_wanted`). Python's own errors still show: an
    exception leaves the block before it is printed."""
    if logs_wanted():
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _stop_while_starting(stderr: int):
    """A SIGINT handler that ends the process with one line on file descriptor `stderr` (the
    terminal's, which `quiet_native_stderr` may have pointed elsewhere meanwhile)."""
    def stop(signum, frame):
        os.write(stderr, b"stopped by SIGINT (Ctrl-C) while starting: nothing was done\n")
        os._exit(128 + signum)  # at once: unwinding a half-done import would print its traceback

    return stop


def import_tensorflow_quietly():
    """Import TensorFlow for a command-line tool without its C++ start-up lines (among them
    a CUDA error on every machine without a GPU), unless the user asked for logs: then
    with every level of them (or the level TF_CPP_MIN_LOG_LEVEL sets).

    Until the tool starts (`cli.run_tool`), Ctrl-C ends it with one line and exit code 130:
    loading TensorFlow takes seconds, and a KeyboardInterrupt there is a page of traceback."""
    signal.signal(signal.SIGINT, _stop_while_starting(os.dup(2)))
    if not logs_wanted():
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    elif _USER_TF_LOG_LEVEL is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    with quiet_native_stderr():
        import tensorflow  # noqa: F401
