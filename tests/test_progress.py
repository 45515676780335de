import io

from balpoe_tf.progress import Progress, hms


class _Stream(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


def _clock(times):
    ticks = iter(times)
    return lambda: next(ticks)


def test_hms():
    assert (hms(0), hms(59.6), hms(3661), hms(36000)) == ("0:00:00", "0:01:00", "1:01:01", "10:00:00")


def test_log_lines_at_most_every_n_seconds():
    stream = _Stream(terminal=False)
    # Start at 0; steps end at 5, 12, 19, 25 s: lines at 12 (>= 10 s after the start) and 25 (13 s after 12).
    bar = Progress("epoch 1/2", total=10, images=300, every=10, stream=stream, clock=_clock([0, 5, 12, 19, 25]))
    for done in (1, 2, 3, 4):
        bar.update(done)
    bar.close()
    # 2 steps of 30 images in 12 s: 5 img/s, 8 steps left at 6 s each: 48 s. 4 steps in 25 s: 4.8 -> 5 img/s, 37.5 s.
    assert stream.getvalue() == ("epoch 1/2  step 2/10  5 img/s  ETA 0:00:48\n"
                                 "epoch 1/2  step 4/10  5 img/s  ETA 0:00:38\n")
    quiet = _Stream(terminal=False)
    bar = Progress("x", total=3, images=3, every=0, stream=quiet, clock=_clock([0, 100]))
    bar.update(1)
    assert quiet.getvalue() == ""


def test_terminal_gets_one_updating_line_cleared_at_the_end():
    stream = _Stream(terminal=True)
    bar = Progress("evaluating", total=4, images=10, every=30, stream=stream, clock=_clock([0, 1, 2]))
    bar.update(1)
    bar.update(4)  # the last step holds the 10 - 3 * 3 = 1 remaining image: 10 images in 2 s
    bar.close()
    first, second = "evaluating  step 1/4  3 img/s  ETA 0:00:03", "evaluating  step 4/4  5 img/s  ETA 0:00:00"
    assert stream.getvalue() == ("\r" + first + "\r" + second.ljust(len(first))
                                 + "\r" + " " * len(second) + "\r")
