"""Run the examples of README.md and docs/*.md, so the docs cannot go stale silently.

``tests/test_docs.py`` drives it; this module only extracts, runs and compares.

**Markers.** An HTML comment on the line right before a fence (GitHub renders
nothing for it) says what the block is:

- ``<!-- doc-test -->`` before a ```` ```sh ```` block: the block is run against
  a real fleet (below). Unmarked shell blocks are not run.
- ```` ```toml ```` blocks are all checked, marked or not. Unmarked: a whole fleet
  file, parsed with ``schemas.config.parse_fleet``. ``<!-- doc-test: fragment -->``:
  tables that go into the demo fleet (``config/demo.toml``), merged by the rule of
  `merge_fragment` (tables merge key by key; other values replace the demo's).
  ``<!-- doc-test: error -->`` (alone or with ``fragment``): the example shows a
  mistake and must raise ``ConfigError``. ``<!-- doc-test: file=NAME -->`` also
  writes the block, as it is, to ``NAME`` in the working directory of the shell
  blocks, which may use it.

**Shell blocks.** A block whose lines start with ``$ `` is a session: each
``$ `` line is a command, and the lines after it, up to the next ``$ ``, are its
expected output (none shown: not compared); a last expected line ``[exit N]``
says the command exits with N. A block without ``$ `` lines is a
list of commands with no output shown. Comments and blank lines between
commands are skipped. The commands of one block run in order in one ``bash``
(so ``export`` and ``cd`` carry over to the next line), with stdout and stderr
merged as a terminal shows them, in a working directory where ``config``,
``tests`` and ``.venv`` are the repo's (as in a clone after ``make run``), and
with the venv's ``bin`` first on ``PATH``. A command that exits non-zero (unless
its output ends in ``[exit N]`` with that N) fails the block. The demo fleet
(``corral up``, ``config/demo.toml``) is already up under ``$CORRAL_HOME`` when a
block runs.

**Background commands** (a line ending in ``&``):

- ``corral up &`` with no ``--config`` or with ``config/demo.toml`` does nothing:
  that fleet is already up.
- Anything else is started with its output going to a log file; the runner
  waits for its first line of output (for ``corral up``, for the line saying
  ``ready``; at most 60 s) before the next command, and stops it (SIGTERM, then
  SIGKILL after 30 s) when the block ends.

**Comparing output.** Expected and actual output are masked by `mask` (the one
place that says what is volatile), then compared line by line:

- clock times (``06:01:41``, ``03:12:40.116``) become ``<time>``;
- durations (``0.14s``, ``3m12s``, ``(6 ms)``, ``41s``) become ``<dur>``;
- runs of 8 or more hex digits with at least one digit (hashes, generated task
  ids, agent versions, instance ids) become ``<hex>``;
- ``pid 4242`` / a number in a ``PID`` column, ports (``127.0.0.1:44921``) and
  node names (``vm-4242``) become ``<n>``;
- runs of spaces become one space, and trailing spaces go (column widths may
  change without making a doc wrong).

An expected line that is ``...`` or ``…`` alone matches any number of actual
lines (including none). An expected line ending in ``...`` or ``…`` matches an
actual line that starts with the part before it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DEMO_CONFIG = REPO / "config" / "demo.toml"

_MARKER = re.compile(r"^\s*<!--\s*doc-test(?::\s*(?P<words>[^>]*?))?\s*-->\s*$")
_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[A-Za-z0-9_-]*)\s*$")
_DONE = re.compile(r"@@doc-test-done@@ (\d+)\n")
_ELLIPSIS = ("...", "…")
_EXIT = re.compile(r"^\[exit (\d+)\]$")


@dataclass(frozen=True)
class Block:
    """One fenced block of a document and its marker."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    marks: frozenset[str] = frozenset()
    file: str = ""  # the ``file=NAME`` of the marker

    @property
    def where(self) -> str:
        """``docs/operator.md:123``, for test ids and failure messages."""
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def runnable(self) -> bool:
        """A shell block marked to be run."""
        return self.lang in ("sh", "bash", "console") and "run" in self.marks


@dataclass
class Step:
    """One command of a shell block and the output the doc shows (None: not shown)."""

    command: str
    expected: list[str] | None = None


@dataclass
class Outcome:
    """What running a block did: one problem per failing command."""

    problems: list[str] = field(default_factory=list)


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker on the line before it."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None or not m["lang"]:
            if m is not None:  # an unlabeled block: skip to its end
                i = _close(lines, i)
            i += 1
            continue
        end = _close(lines, i)
        indent = len(m["indent"])
        body = "\n".join(x[indent:] for x in lines[i + 1:end])
        marks: set[str] = set()
        file = ""
        prev = _MARKER.match(lines[i - 1]) if i > 0 else None
        if prev is not None:
            marks.add("run")
            for word in (prev["words"] or "").split():
                if word.startswith("file="):
                    file = word.removeprefix("file=")
                else:
                    marks.add(word)
        found.append(Block(path, i + 1, m["lang"], body + "\n", frozenset(marks), file))
        i = end + 1
    return found


def _close(lines: list[str], start: int) -> int:
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```":
            return j
    raise ValueError(f"unclosed fence at line {start + 1}")


def all_blocks() -> list[Block]:
    """The blocks of README.md and docs/*.md."""
    return [b for path in DOCS for b in blocks(path)]


def steps(block: Block) -> list[Step]:
    """The commands of a shell block, with their expected output."""
    lines = block.text.splitlines()
    if not any(x.startswith("$ ") or x == "$" for x in lines):
        return [Step(x) for x in lines if x.strip() and not x.lstrip().startswith("#")]
    out: list[Step] = []
    for line in lines:
        if line.startswith("$ "):
            out.append(Step(line[2:], None))
        elif out:
            if out[-1].expected is None:
                out[-1].expected = []
            out[-1].expected.append(line)
    for s in out:  # trailing blank lines are layout, not output
        while s.expected and not s.expected[-1].strip():
            s.expected.pop()
        if s.expected == []:
            s.expected = None
    return out


# --- masking: the one place that says what is volatile -----------------------------------
_MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b\d{2}:\d{2}:\d{2}(?:\.\d+)?\b"), "<time>"),
    (re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b"), "<hex>"),
    (re.compile(r"\bpid \d+"), "pid <n>"),
    (re.compile(r"(127\.0\.0\.1|localhost):\d+"), r"\1:<n>"),
    (re.compile(r"\b(node|host) \S+"), r"\1 <n>"),
    (re.compile(r"\(\d+(?:\.\d+)? ?ms(?=[,)])"), "(<dur>"),
    # a heartbeat age may read `-0.0s ago` when clocks are a hair apart
    (re.compile(r"(?:-|\b)(?:\d+h)?(?:\d+m)?\d+(?:\.\d+)?s\b"), "<dur>"),
    # `corral ps`: the PID column, after the STATE column
    (re.compile(r"\b(starting|running|backoff|stopping|down|gave_up) +\d+\b"), r"\1 <n>"),
    (re.compile(r"[ \t]+"), " "),
]


def mask(line: str) -> str:
    """A line with its volatile parts replaced (the rules are in the module docstring)."""
    for pattern, repl in _MASKS:
        line = pattern.sub(repl, line)
    return line.rstrip()


def compare(expected: list[str], actual: list[str]) -> str | None:
    """None when ``actual`` shows what ``expected`` does; otherwise what differs."""
    want = [mask(x) for x in expected]
    got = [mask(x) for x in actual]
    while got and not got[-1]:  # a trailing blank line is layout
        got.pop()
    if _match(want, got):
        return None
    return ("expected (masked):\n  " + "\n  ".join(want)
            + "\nactual (masked):\n  " + "\n  ".join(got))


def _match(want: list[str], got: list[str]) -> bool:
    if not want:
        return not got
    head = want[0]
    if head.strip() in _ELLIPSIS:
        return any(_match(want[1:], got[k:]) for k in range(len(got) + 1))
    if not got:
        return False
    for tail in _ELLIPSIS:
        if head.endswith(tail):
            if not got[0].startswith(head[: -len(tail)].rstrip()):
                return False
            return _match(want[1:], got[1:])
    return head == got[0] and _match(want[1:], got[1:])


# --- toml fragments ------------------------------------------------------------------------
def merge_fragment(fragment: str, base: str | None = None) -> str:
    """The demo fleet with a fragment's tables merged in, as TOML text for ``parse_fleet``.

    The rule: tables merge key by key, recursively; any other value of the fragment
    (a string, a number, an array, an array of tables) replaces the demo's. So
    ``[agents.billing] replicas = 2`` changes one key of the demo's billing agent,
    and ``[supervisors.agents] children = [...]`` replaces that list. A fragment with
    no ``[supervision]`` or ``[supervisors.*]`` table merges into the demo without its
    supervision tables (the default tree), so it may add actors.

    Example:
        >>> "replicas = 2" in merge_fragment("[agents.billing]\\nreplicas = 2\\n")
        True
    """
    demo = tomllib.loads(base if base is not None else DEMO_CONFIG.read_text())
    extra = tomllib.loads(fragment)
    if not {"supervision", "supervisors"} & extra.keys():
        # The demo lists every actor in its tree, so a fragment that adds one would have to
        # repeat the tree; without those tables the fleet gets the default tree instead.
        demo.pop("supervision", None)
        demo.pop("supervisors", None)
    return _dump(_merge(demo, extra))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _dump(table: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """TOML text for a table as ``tomllib`` reads it (str, int, float, bool, lists, tables)."""
    plain = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    text = ""
    if prefix and (plain or not table):
        text += f"[{'.'.join(map(_key, prefix))}]\n"
    text += "".join(f"{_key(k)} = {_value(v)}\n" for k, v in plain.items())
    for k, v in table.items():
        if _is_table(v):
            text += _dump(v, (*prefix, k))
        elif _is_table_array(v):
            for item in v:  # nested tables of an item are written inline
                text += f"[[{'.'.join(map(_key, (*prefix, k)))}]]\n"
                text += "".join(f"{_key(ik)} = {_value(iv)}\n" for ik, iv in item.items())
    return text


def _is_table(v: Any) -> bool:
    return isinstance(v, dict)


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


# --- running shell blocks ------------------------------------------------------------------
def workdir(root: Path) -> Path:
    """A directory that looks like a clone after ``make run``: config, tests, .venv."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("config", "tests", ".venv", "corral"):
        link = root / name
        if not link.exists():
            link.symlink_to(REPO / name)
    return root


def doc_env(home: Path) -> dict[str, str]:
    """The environment of a block: the fleet's ``CORRAL_HOME``, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NATS_URL", "CORRAL_FAULTS", "VIRTUAL_ENV")}
    env["CORRAL_HOME"] = str(home)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _is_demo_up(words: list[str]) -> bool:
    """``corral up`` of the demo fleet (the one the runner already runs)."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    if words[:2] != ["corral", "up"]:
        return False
    if "--config" not in words:
        return True
    i = words.index("--config")
    return i + 1 < len(words) and Path(words[i + 1]).name == "demo.toml"


def script(block: Block, cmds: list[Step], scratch: Path) -> str:
    """The bash script for a block: each command, then a marker with its exit status."""
    out = ["set +e"]
    for n, s in enumerate(cmds):
        words = shlex.split(s.command, comments=True)
        background = bool(words) and words[-1] == "&"
        if background:
            words = words[:-1]
            if _is_demo_up(words):
                out.append("true")
            else:
                log = scratch / f"bg{n}.log"
                line = shlex.join(words)
                ready = "ready" if "up" in words and "corral" in words else "."
                out.append(f"{line} >{shlex.quote(str(log))} 2>&1 &")
                out.append(f"echo $! >>{shlex.quote(str(scratch / 'bg.pids'))}")
                out.append(f"__bg=$!; for __i in $(seq 600); do grep -q {shlex.quote(ready)} "
                           f"{shlex.quote(str(log))} 2>/dev/null && break; "
                           f"kill -0 $__bg 2>/dev/null || break; sleep 0.1; done; "
                           f"cat {shlex.quote(str(log))}")
        else:
            out.append(s.command)
        out.append('echo "@@doc-test-done@@ $?"')
    return "\n".join(out) + "\n"


def run_block(block: Block, cwd: Path, env: dict[str, str], *,
              timeout_s: float = 60.0) -> Outcome:
    """Run a shell block's commands in one bash and compare what the doc shows."""
    cmds = steps(block)
    scratch = cwd / ".doc-test" / block.where.replace("/", "_").replace(":", "_")
    scratch.mkdir(parents=True, exist_ok=True)
    text = script(block, cmds, scratch)
    outcome = Outcome()
    try:
        done = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
                              check=False, start_new_session=True)
        output = done.stdout
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or b""
        output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        outcome.problems.append(f"{block.where}: timed out after {timeout_s:.0f}s")
    finally:
        _stop_background(scratch / "bg.pids")
    parts = _DONE.split(output)
    # parts: [out0, rc0, out1, rc1, ..., rest]
    for n, s in enumerate(cmds):
        if 2 * n + 1 >= len(parts):
            outcome.problems.append(f"{block.where}: `{s.command}` did not finish")
            break
        shown, rc = parts[2 * n], int(parts[2 * n + 1])
        expected = list(s.expected) if s.expected is not None else None
        want_rc = 0
        if expected and (m := _EXIT.match(expected[-1].strip())):
            want_rc = int(m[1])
            expected = expected[:-1]
        if rc != want_rc:
            outcome.problems.append(f"{block.where}: `{s.command}` exited with {rc}, not "
                                    f"{want_rc}:\n{shown}")
            continue
        if expected:
            diff = compare(expected, shown.splitlines())
            if diff is not None:
                outcome.problems.append(f"{block.where}: `{s.command}` printed other output\n"
                                        f"{diff}")
    return outcome


def _stop_background(pids_file: Path) -> None:
    if not pids_file.exists():
        return
    pids = [int(x) for x in pids_file.read_text().split()]
    pids_file.unlink()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 30
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)
    return done == 0


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
