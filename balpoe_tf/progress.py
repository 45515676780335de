"""Progress of long loops (training epochs, evaluations): one updating line on a terminal,
and a plain line at most every few seconds when output goes to a log file."""

import sys
import time


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Steps done out of `total`, images/s and the ETA of one loop.

    Args:
        what: what the loop is, the line's start (e.g. "epoch 3/200").
        total: steps in the loop.
        images: images in the loop (the last step may be smaller), for images/s.
        every: when the stream is not a terminal, seconds between lines (0: no lines).
        stream: where lines go (standard output by default).
        clock: seconds now (for tests).
    """

    def __init__(self, what: str, total: int, images: int, every: float = 30.0, stream=None,
                 clock=time.perf_counter):
        self.what, self.total, self.images, self.every = what, max(int(total), 1), images, every
        self.stream = stream if stream is not None else sys.stdout
        self.terminal = self.stream.isatty()
        self.clock = clock
        self.start = self.last = clock()
        self.width = 0

    def line(self, done: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        images = min(self.images, done * -(-self.images // self.total))
        eta = (self.total - done) * elapsed / max(done, 1)
        return f"{self.what}  step {done}/{self.total}  {images / elapsed:.0f} img/s  ETA {hms(eta)}"

    def update(self, done: int):
        """`done` steps of `total` are finished."""
        now = self.clock()
        if self.terminal:
            text = self.line(done, now)
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
            self.stream.flush()
        elif self.every and now - self.last >= self.every:
            self.stream.write(self.line(done, now) + "\n")
            self.stream.flush()
            self.last = now

    def close(self):
        """Clear the terminal line, so that the loop's summary line takes its place."""
        if self.terminal and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
