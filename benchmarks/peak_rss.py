"""Run a command and write its peak resident set size in KiB to a file; exit with its exit code.

    python -S benchmarks/peak_rss.py PEAK_FILE command [args...]

Why not simply ``os.wait4`` on a ``subprocess.Popen``: Linux starts a child's ``ru_maxrss`` at the
high-water RSS of the memory its ``exec`` replaced, and Popen's vfork shares the caller's memory,
so a large caller (pytest, or a benchmark holding TensorFlow) gets its own peak back as the
child's. Forked from this bare interpreter (about 10 MB), the figure is the command's own.
"""
import os
import sys


def main(argv):
    if len(argv) < 2:
        sys.exit("usage: python -S peak_rss.py PEAK_FILE command [args...]")
    peak_file, command = argv[0], argv[1:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        except OSError as error:  # only reached when exec failed
            print(f"peak_rss.py: cannot run {command[0]}: {error}", file=sys.stderr, flush=True)
        os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    with open(peak_file, "w") as out:
        out.write(f"{usage.ru_maxrss}\n")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
