"""What the launch scripts share: one way to show or run a command, and small checks.

Every script under ``launch/`` builds the exact argv lists it would run and hands them to a
`Runner`. With ``--dry_run`` the runner prints each one, shell-quoted (``shlex.join``), one
per line, and runs nothing, so what is printed can be pasted into a shell and is what a real
run executes. Lines starting with ``#`` are comments (what a step waits for, what a path
means); a file a script writes is shown as the ``cat > FILE <<'PERL_JAX_EOF'`` here-document
that writes it. A real run prints each command to stderr before running it with
``subprocess.run(check=True)``; a command that fails stops the script with its exit status.

The scripts use only the standard library, so they run on a laptop with nothing but Python
and the cloud's command-line tool installed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence, TextIO

EXIT_USAGE = 2
HEREDOC_END = "PERL_JAX_EOF"


class LaunchError(Exception):
  """Bad arguments to a launch script; printed as one line, exit status 2."""


def command_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  """`argv` as one shell line, with `env` as ``NAME=value`` assignments in front."""
  prefix = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
  return " ".join(prefix + [shlex.join(argv)])


class Runner:
  """Prints (dry run) or runs commands; `commands` keeps every argv it was given, in order."""

  def __init__(self, dry_run: bool, out: TextIO | None = None):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self.commands: list[list[str]] = []
    self._checked_tools: set[str] = set()

  def comment(self, text: str) -> None:
    """A line for the reader of a dry run (every line prefixed with ``# ``)."""
    if self.dry_run:
      for line in text.splitlines() or [""]:
        print(f"# {line}".rstrip(), file=self.out)

  def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
    """Runs `argv` (with `env` added to the environment); raises CalledProcessError on failure."""
    argv = list(argv)
    self.commands.append(argv)
    line = command_line(argv, env)
    if self.dry_run:
      print(line, file=self.out)
      return
    self._require(argv[0])
    print(f"+ {line}", file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, env={**os.environ, **(env or {})})

  def wait_for(self, argv: Sequence[str], done: Callable[[str], bool], what: str,
               poll_s: float = 30.0, timeout_s: float | None = None) -> None:
    """Runs `argv` every `poll_s` seconds until `done(its stdout)`; a dry run shows it once."""
    argv = list(argv)
    self.commands.append(argv)
    if self.dry_run:
      self.comment(f"repeated every {poll_s:g} s until {what}:")
      print(shlex.join(argv), file=self.out)
      return
    self._require(argv[0])
    print(f"+ {shlex.join(argv)}  (until {what})", file=sys.stderr, flush=True)
    start = time.monotonic()
    while True:
      result = subprocess.run(argv, check=True, capture_output=True, text=True)
      if done(result.stdout):
        return
      if timeout_s is not None and time.monotonic() - start > timeout_s:
        raise LaunchError(f"gave up after {timeout_s:g} s waiting until {what}; last "
                          f"answer: {result.stdout.strip()!r}")
      time.sleep(poll_s)

  def write_file(self, path: str, text: str) -> None:
    """Writes `text` to `path`; a dry run prints the shell here-document that would."""
    if self.dry_run:
      if not text.endswith("\n") or f"\n{HEREDOC_END}\n" in f"\n{text}":
        raise ValueError(f"cannot show {path} as a here-document")
      print(f"cat > {shlex.quote(path)} <<'{HEREDOC_END}'\n{text}{HEREDOC_END}", file=self.out)
      return
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    print(f"+ wrote {path}", file=sys.stderr, flush=True)

  def _require(self, tool: str) -> None:
    if tool not in self._checked_tools and shutil.which(tool) is None:
      raise LaunchError(f"{tool} not found on PATH; install it, or add --dry_run to only "
                        "print the commands")
    self._checked_tools.add(tool)


def split_trainer_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the script's own arguments, the arguments after ``--``, passed on to perl_jax.train)."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def main_wrapper(prog: str, body: Callable[[], int | None]) -> int:
  """Runs `body`; reports bad arguments (exit 2) or a failed command (its exit status)."""
  try:
    return body() or 0
  except LaunchError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except subprocess.CalledProcessError as e:
    print(f"{prog}: command failed with exit status {e.returncode}: "
          f"{shlex.join(map(str, e.cmd))}", file=sys.stderr)
    return e.returncode if e.returncode > 0 else 1
