"""progress.py's options for inference: a label, rates in other units, and no line at the end."""
import time

import inference
import progress
from test_plan import FakeStream  # beside progress.py's first tests


def test_a_labelled_line_with_megapixels_and_nothing_at_the_end():
    now = [0.0]
    stream = FakeStream(tty=False)
    line = progress.ProgressLine(8, unit="tile", stream=stream, interval=15, clock=lambda: now[0],
                                 label="    a.tif: ", per_unit={"Mpx": 0.5}, final=False)
    line.update(0)
    now[0] += 20
    assert line.update(4)
    assert stream.written == ["    a.tif: tile 4/8 (50%)  elapsed 20s  remaining 20s  0.2 tile/s  0.1 Mpx/s\n"]
    now[0] += 20
    assert not line.update(8) and len(stream.written) == 1  # the caller prints the image's own line


def test_the_end_closes_an_open_terminal_line():
    now = [0.0]
    stream = FakeStream(tty=True)
    line = progress.ProgressLine(3, unit="tile", stream=stream, interval=1, clock=lambda: now[0], final=False)
    line.update(0)
    now[0] += 2
    line.update(1)
    now[0] += 2
    line.update(3)
    assert stream.written[0].startswith("\rtile 1/3") and stream.written[1:] == ["\n"]


def test_inference_reports_tiles_of_an_image_after_its_first_network_call(capsys, monkeypatch):
    monkeypatch.setattr(inference, "PROGRESS_SECONDS", 0.0)  # a line at every call
    report = inference._tile_progress("a.tif", 4_000_000)
    for done in range(1, 5):
        time.sleep(0.01)
        report(done, 4)
    lines = capsys.readouterr().out.splitlines()
    # The first call starts the clock (tracing does not count), the last prints nothing.
    assert [line[:25] for line in lines] == ["    a.tif: tile 2/4 (50%)", "    a.tif: tile 3/4 (75%)"]
    assert all("remaining" in line and " tile/s  " in line and line.endswith(" Mpx/s") for line in lines)
