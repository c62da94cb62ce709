"""What a refine run shows (refine.console, refine.progress): library noise to the log, verbose=true shows it,
progress as a bar on a terminal and as plain lines elsewhere, a crashed child as one line naming its log."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from refine.console import ChildOutput, LogFile, last_relevant, log_path
from refine.core.library_noise import library_noise_to
from refine.progress import EVENT, Events, Progress, parse_event

NOISE = ["/venv/vllm/triton_utils/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated\n",
         "[W1201 04:53:06 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy\n",
         "WARNING 12-01 04:53:07 [base.py:380] Chat template warmup failed\n",
         "Traceback (most recent call last):\n", '  File "vllm/renderers/base.py", line 217, in warmup\n',
         "ValueError: Tokenizer not available when `skip_tokenizer_init=True`\n"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_off_a_terminal_is_plain_lines_every_n_seconds():
    out, clock = io.StringIO(), Clock()
    p = Progress(64, "teacher", out, initial=16, every_s=30, tty=False, clock=clock)
    for _ in range(3):                      # 16 instances of 1,024 tokens every 10 s: a line at 30 s, then the end
        clock.t += 10
        p.update(16, 1024)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 1
    assert lines[0] == "  teacher: 64/64 instances (100%), 1.6 inst/s, 102 tok/s, in 0:00:30"
    out, clock = io.StringIO(), Clock()
    p = Progress(160, "reference", out, every_s=30, tty=False, clock=clock)
    clock.t = 31
    p.update(16, 1024)
    assert out.getvalue() == "  reference: 16/160 instances (10%), 0.5 inst/s, 33 tok/s, ETA 0:04:39\n"


def test_progress_on_a_terminal_is_a_bar_with_rate_and_eta():
    out = io.StringIO()
    p = Progress(64, "teacher", out, tty=True)
    p.update(16, 1024)
    p.write("a line above the bar")
    p.close()
    text = out.getvalue()
    assert "\r" in text and "teacher:" in text and "16/64" in text and "tok/s" in text and "a line above" in text


def test_events_carry_progress_from_the_child_to_the_parent(tmp_path):
    child = io.StringIO()
    ev = Events(48, initial=16, stream=child)
    ev.update(16, 1024)
    lines = child.getvalue().splitlines()
    assert all(line.startswith(EVENT) for line in lines)
    assert parse_event(lines[0]) == {"start": True, "instances": 48, "done": 16}
    assert parse_event("refine-progress not json") is None and parse_event("  teacher: 1/2") is None
    shown, log = io.StringIO(), LogFile(tmp_path / "logs" / "teacher.log", "teacher pass")
    out = ChildOutput(log, "teacher", verbose=False, stream=shown)
    for line in lines:
        out(line + "\n")
    out.close_progress()
    assert shown.getvalue().startswith("  teacher: 32/48 instances (67%)")   # closed early: the last position
    assert "32/48" not in log.path.read_text() and "refine-progress" not in log.path.read_text()


def _route(tmp_path, verbose: bool, lines: list[str]) -> tuple[str, str, ChildOutput]:
    shown = io.StringIO()
    log = LogFile(log_path(tmp_path, "teacher"), "teacher pass: /m (vllm, float32, shard 0/1)")
    out = ChildOutput(log, "teacher", verbose, stream=shown)
    for line in lines:
        out(line)
    log.close()
    return shown.getvalue(), log.path.read_text(), out


def test_child_noise_goes_to_the_log_and_verbose_shows_it(tmp_path):
    shown, logged, out = _route(tmp_path, False, NOISE + ["error: corpus not found: /x\n"])
    assert shown == ""
    assert all(line in logged for line in NOISE) and logged.startswith("==== ") and "teacher pass: /m" in logged
    assert out.errors == ["corpus not found: /x"]
    shown, logged_again, _ = _route(tmp_path, True, NOISE)
    assert shown == "".join(NOISE)
    assert logged_again.count("==== ") == 2                       # appended, a header per run


def test_a_crashed_child_is_one_line_naming_its_log(tmp_path):
    crash = ["Traceback (most recent call last):\n", '  File "refine/score_pass.py", line 9, in main\n',
             "RuntimeError: vLLM returned prompt log-probs for other tokens\n", "\n",
             "[rank0]:[W1201] ProcessGroupGloo destroyed\n"]
    _, logged, out = _route(tmp_path, False, NOISE + crash)
    assert "RuntimeError: vLLM returned" in logged and "Traceback" in logged
    line = out.failure(1)
    assert line == (f"exit 1: RuntimeError: vLLM returned prompt log-probs for other tokens; its output is in "
                    f"{tmp_path / 'logs' / 'teacher.log'}")
    _, _, out = _route(tmp_path, False, [])
    assert out.failure(-9).startswith("killed by signal 9 (SIGKILL): no output; its output is in ")
    assert last_relevant(["loading\n", "Killed\n"]) == "Killed"


def test_library_noise_goes_to_the_log_unless_verbose(tmp_path, capsys):
    path = tmp_path / "out" / "logs" / "refine.log"
    with library_noise_to(path):
        warnings.warn("a library's FutureWarning", FutureWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        print("refine's own line")
    captured = capsys.readouterr()
    assert "FutureWarning" not in captured.err and "transformers warning" not in captured.err
    assert "refine's own line" in captured.out
    assert "a library's FutureWarning" in path.read_text() and "a transformers warning" in path.read_text()
    with library_noise_to(None), pytest.warns(FutureWarning, match="shown when verbose"):   # verbose=true
        warnings.warn("shown when verbose", FutureWarning, stacklevel=1)
    assert "shown when verbose" not in path.read_text()
    empty = tmp_path / "quiet" / "logs" / "refine.log"
    with library_noise_to(empty):
        pass
    assert not (tmp_path / "quiet").exists()                       # nothing logged: no folder made
