"""One progress line with an ETA for any long loop (training steps, images inferred, records built).

    line = ProgressLine(total=2310, unit="step")
    line.update(done, metric="test dice 0.812")   # prints when due (rate-limited)
    line.end_line()                                # before printing anything else on a terminal

    # inference: "    a.tif: tile 40/96 (42%)  elapsed ...  1.2 tile/s  3.1 Mpx/s", nothing at the end
    line = ProgressLine(96, unit="tile", label="    a.tif: ", per_unit={"Mpx": 2.6}, final=False)

On a terminal the line is redrawn in place (carriage return, cleared to the end) at most twice a
second; anywhere else (a Slurm log, a pipe, a file) each update is one plain line, at most one every
``interval`` seconds (30 by default), so a log gets a readable record instead of a carriage-return
animation. Standard library only: importing it costs nothing and pulls in no TensorFlow.
"""
import sys
import time

TTY_INTERVAL_S = 0.5
LOG_INTERVAL_S = 30.0


def format_clock(seconds):
    """A duration as "45s", "12m05s" or "3h02m"."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """Done/total, elapsed, remaining (from the rate since the first update) and free-form figures.

    Args:
      total: the count that ends the loop (None: no ETA, just the count and the rate).
      unit: what is counted ("step", "image", "record").
      stream: where to write (default sys.stdout); a terminal gets the in-place line.
      interval: minimum seconds between printed updates (default 0.5 on a terminal, 30 elsewhere).
      clock: a monotonic clock in seconds (tests pass a fake one).
      label: text the line starts with (e.g. the name of the image being segmented).
      per_unit: {name: amount per counted unit}: also print those rates, e.g. {"Mpx": 2.6} gives
        "3.1 Mpx/s" for a tile of 2.6 megapixels.
      final: print a line when ``total`` is reached; False: a short loop prints nothing, and the
        end only closes an open terminal line (a caller that reports each item's end itself).
    """

    def __init__(self, total, unit="step", stream=None, interval=None, clock=time.monotonic, label="",
                 per_unit=None, final=True):
        self.total, self.unit, self.label, self.final = total, unit, label, final
        self.per_unit = per_unit or {}
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval = interval if interval is not None else (TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S)
        self.clock = clock
        self.start_time = self.start_done = None
        self.last_print = None
        self.open = False  # a terminal line without its newline yet

    def text(self, done, metric=None):
        """The line for ``done`` units (without carriage return or newline)."""
        now = self.clock()
        elapsed = now - self.start_time
        rate = (done - self.start_done) / elapsed if elapsed > 0 and done > self.start_done else None
        parts = [f"{self.unit} {done:,}" + (f"/{self.total:,} ({100 * done / self.total:.0f}%)" if self.total else ""),
                 f"elapsed {format_clock(elapsed)}"]
        if self.total and rate:
            parts.append(f"remaining {format_clock((self.total - done) / rate)}")
        elif self.total:
            parts.append("remaining ?")
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s")
            parts += [f"{rate * amount:.3g} {name}/s" for name, amount in self.per_unit.items()]
        if metric:
            parts.append(metric)
        return self.label + "  ".join(parts)

    def update(self, done, metric=None, force=False):
        """Record progress; print the line when ``interval`` has passed since the last one (or
        ``force``, or the loop's end). Returns whether a line was printed."""
        now = self.clock()
        if self.start_time is None:
            # The rate counts from the first update, so a resumed loop's ETA is not skewed by the
            # units done before it, nor by start-up time.
            self.start_time, self.start_done, self.last_print = now, done, now
            return False
        finished = self.total is not None and done >= self.total
        if finished and not self.final and not force:
            self.end_line()
            return False
        if not (force or finished or now - self.last_print >= self.interval):
            return False
        self.last_print = now
        line = self.text(done, metric)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.open = True
            if finished:
                self.end_line()
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return True

    def end_line(self):
        """End an in-place terminal line so the next print starts on a line of its own."""
        if self.open:
            self.stream.write("\n")
            self.stream.flush()
            self.open = False
