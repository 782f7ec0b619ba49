"""A finding's warning during a tqdm loop, on a real terminal: a training script runs in a
pseudo-terminal (``pty.fork``), and the screen it leaves shows the warning on a line of its
own, not glued to the bar, pointing at the script's ``optimizer.step()`` line.

The screen is rebuilt from the bytes the terminal received: ``\\r`` returns to column 0 and
later text overwrites earlier text, ``\\n`` starts a new line; ANSI escapes are dropped.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import struct
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tqdm")
pty = pytest.importorskip("pty")  # POSIX only

_SCRIPT = textwrap.dedent(
    """\
    import torch
    from torch import nn
    from tqdm import tqdm

    import gradwatch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    with torch.no_grad():  # every hidden unit negative on every input: dead ReLUs
        model[0].weight.mul_(0.01)
        model[0].bias.fill_(-10.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gw = gradwatch.watch(model, optimizer, show=False)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for step in tqdm(range(60), ascii=True, ncols=70, mininterval=0, file=None):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()  # the user's line
        optimizer.zero_grad()
    gw.close()
    print("DONE")
    """
)
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TIMEOUT_S = 120.0


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``: overwrite on ``\\r``, new line on ``\\n``."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    for ch in _ESCAPE.sub("", raw):
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
    if line:
        lines.append("".join(line).rstrip())
    return lines


def _run_in_pty(script: Path) -> tuple[str, int]:
    """Run ``script`` with this Python on a pseudo-terminal; its output and exit status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHONWARN"))}
    env.update(OMP_NUM_THREADS="1", TERM="xterm", COLUMNS="100", LINES="40")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the script, its stdout and stderr on the terminal
        try:
            # a new pty is 0 x 0, which tqdm takes for "no room to draw"
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
            os.execve(sys.executable, [sys.executable, str(script)], env)
        finally:
            os._exit(127)
    chunks: list[bytes] = []
    deadline = time.monotonic() + _TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return b"".join(chunks).decode("utf-8", errors="replace"), status


def test_warning_during_a_tqdm_loop_is_on_its_own_line_at_the_users_line(
    tmp_path: Path,
) -> None:
    script = tmp_path / "train_with_tqdm.py"
    script.write_text(_SCRIPT)
    user_line = 1 + _SCRIPT.splitlines().index("    optimizer.step()  # the user's line")

    raw, status = _run_in_pty(script)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, raw[-3000:]
    screen = _screen(raw)
    assert "DONE" in screen, raw[-3000:]

    warning_lines = [i for i, text in enumerate(screen) if "GradwatchWarning" in text]
    assert len(warning_lines) == 1, screen  # one warning per rule
    at = warning_lines[0]
    text = screen[at]
    # on its own line: it starts there, at the user's file and line, not after the bar
    assert text.startswith(f"{script}:{user_line}: GradwatchWarning: gradwatch"), text
    assert "[dead_relu]" in text
    assert "%|" not in text and "it/s" not in text, text
    # the bar it interrupted is left whole on the line above, and the bar goes on below
    assert re.search(r"\d+%\|[#0-9 ]*\| \d+/60 ", screen[at - 1]), screen[at - 1]
    assert any("100%|" in line for line in screen[at + 1 :]), screen[at + 1 :]
    # nothing of gradwatch's own files is named as the warning's place
    assert not any(re.search(r"gradwatch[/\\][\w/\\]+\.py:\d+:", line) for line in screen)
