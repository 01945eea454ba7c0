"""Ctrl-C between compiled computations instead of inside them.

Python raises KeyboardInterrupt at whatever bytecode runs when SIGINT lands. Inside JAX's dispatch (a callback from
C++, a cache update) it can be swallowed, leaving the process working on, or the interpreter exits while XLA
threads still run a computation and the process dies with SIGSEGV (exit 139 instead of 130; seen with sample.py,
development_log.md). Long loops of compiled calls (sampling chunks, the evaluation classifier's steps) therefore
hold the first Ctrl-C and raise it themselves at the next `check()`, after the running call has returned.
"""

import contextlib
import signal
import sys
import threading


class DeferredInterrupt:
    """with DeferredInterrupt() as stop: for ...: stop.check(); <compiled call>. A first Ctrl-C is held until the next
    check() (or the end of the block); a second one raises at once. Only the main thread can own the handler, and a
    handler someone else installed (the training loop's StopFlag) is left alone."""

    def __enter__(self):
        self.pending = False
        self._now = False
        self._previous = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.pending or self._now:   # the second Ctrl-C, or one inside immediate(): out now
            self.pending = False
            raise KeyboardInterrupt
        self.pending = True
        print("\nCtrl-C: stopping when the running computation returns (again to stop at once)", file=sys.stderr,
              flush=True)

    def check(self, *in_flight):
        """Raise a held Ctrl-C, after waiting for `in_flight` (arrays of calls dispatched but maybe not finished)."""
        if self.pending:
            self.pending = False
            if in_flight:
                import jax

                jax.block_until_ready(in_flight)
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def immediate(self):
        """Host work inside the block that Python may stop anywhere, between library calls (a torch VAE decode of a
        chunk, minutes for an SD-sized VAE on CPU): a held Ctrl-C raises on entry, and a new one at once, instead of
        after the work. No compiled call may be in flight here (the chunk's arrays are on the host already)."""
        self.check()
        self._now = True
        try:
            yield
        finally:
            self._now = False

    def __exit__(self, exc_type, exc, tb):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if exc_type is None:
            self.check()    # a Ctrl-C during the last call still stops what comes after
        return False
