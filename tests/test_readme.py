"""README.md and README_en.md: every code block marked runnable runs as written, on the demo checkpoint.

Convention for README authors: put `runnable` after the language in the fence's info string,

    ```bash runnable            ```python runnable

and the block is run from the repository root in a fresh process (bash for bash/sh/shell, `python -c` for python;
stdin is empty; $CHATGLM_MODEL is unset, so scripts load the demo model). Each block stands alone and must finish
within BLOCK_TIMEOUT_S. Leave unmarked what cannot run here: long-running servers, installs, real weights, GPUs.
A block that appears in both READMEs runs once.
"""
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "README_en.md")
BLOCK_TIMEOUT_S = 150
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python", "python3": "python"}
OPENING = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")


def fenced_blocks(text: str):
    """[(line number, info string, code)] of the fenced code blocks in Markdown text (CommonMark fences, also
    indented inside list items)."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = OPENING.match(lines[i])
        if not m or (m.group(2)[0] == "`" and "`" in m.group(3)):  # a backtick fence's info has no backticks
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        closing = re.compile(r"^\s*" + re.escape(fence[0]) + "{" + str(len(fence)) + r",}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not closing.match(lines[j]):
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))):])  # drop the fence's own indent
            j += 1
        blocks.append((i + 1, info, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def runnable_blocks(text: str):
    """[(line number, language as written, code)] of the blocks marked `runnable`."""
    out = []
    for line, info, code in fenced_blocks(text):
        words = info.split()
        if len(words) > 1 and "runnable" in words[1:]:
            out.append((line, words[0].lower(), code))
    return out


def run_block(language: str, code: str, timeout: float = BLOCK_TIMEOUT_S, cwd: Path = ROOT, bin_dir: str = None):
    """(exit status or None on timeout, combined output) of one block, run the way a reader would run it."""
    env = {k: v for k, v in os.environ.items() if k != "CHATGLM_MODEL"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if bin_dir:  # `python` and `python3` in the block mean the interpreter running the tests
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if LANGUAGES[language] == "bash":
        argv = ["bash", "-c", "set -eo pipefail\n" + code]
    else:
        argv = [sys.executable, "-c", code]  # sys.path[0] is then the working directory, as in a REPL
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: bash's children too
        output, _ = proc.communicate()
        return None, output


def _collect():
    """pytest params, one per distinct runnable block; a single skipped param while README.md does not exist."""
    if not (ROOT / "README.md").is_file():
        return [pytest.param(None, None, None, marks=pytest.mark.skip(reason="README.md not written yet"),
                             id="no-README")]
    seen, params = {}, []
    for name in READMES:
        path = ROOT / name
        if not path.is_file():
            continue
        for line, language, code in runnable_blocks(path.read_text(encoding="utf-8")):
            where = f"{name}:{line}"
            if (language, code) in seen:
                continue  # the same command in both languages runs once
            seen[(language, code)] = where
            params.append(pytest.param(where, language, code, id=f"{where}-{language}"))
    return params or [pytest.param(None, None, None, id="none-marked")]


@pytest.fixture(scope="module")
def python_bin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bin")
    for name in ("python", "python3"):  # wrappers, not symlinks: a venv's python must start from its own path
        (folder / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (folder / name).chmod(0o755)
    return str(folder)


def test_each_readme_marks_runnable_blocks():
    if not (ROOT / "README.md").is_file():
        pytest.skip("README.md not written yet")
    for name in READMES:
        path = ROOT / name
        assert path.is_file(), f"{name} is missing (README.md exists; both languages are kept side by side)"
        assert runnable_blocks(path.read_text(encoding="utf-8")), (
            f"{name} has no code block marked runnable (```bash runnable / ```python runnable), so nothing in it "
            f"is checked")


@pytest.mark.parametrize("where, language, code", _collect())
def test_readme_block_runs(where, language, code, python_bin_dir, demo_model_path):
    if where is None:
        pytest.fail("README.md has no code block marked runnable")
    assert language in LANGUAGES, f"{where}: cannot run a {language!r} block; mark only {sorted(LANGUAGES)}"
    status, output = run_block(language, code, bin_dir=python_bin_dir)
    shown = f"\n{code}\n--- output ---\n{output[-3000:]}"
    assert status is not None, f"{where}: still running after {BLOCK_TIMEOUT_S}s{shown}"
    assert status == 0, f"{where}: exit status {status}{shown}"


# ---- the harness itself: a check that cannot fail is worse than none ---------------------------------------------

SAMPLE = """\
# Title

```bash
echo not marked
```

```bash runnable
echo one
```

1. In a list:

   ```python runnable
   print("two")
       indented = True
   ```

~~~~sh runnable
echo ```
```not a fence`
~~~~

```` python runnable extra-words
```
print("four")
````

```text
```bash runnable
```
"""


def test_only_blocks_marked_runnable_are_extracted_with_their_code():
    blocks = runnable_blocks(SAMPLE)
    assert [(lang, code) for _, lang, code in blocks] == [
        ("bash", "echo one\n"),
        ("python", 'print("two")\n    indented = True\n'),
        ("sh", "echo ```\n```not a fence`\n"),
        ("python", '```\nprint("four")\n'),
    ]
    assert [line for line, _, _ in blocks] == [7, 13, 18, 23]


def test_a_failing_block_is_reported(tmp_path):
    assert run_block("bash", "false\necho after\n", cwd=tmp_path)[0] != 0  # set -e: the first failure counts
    assert run_block("bash", "false | cat\n", cwd=tmp_path)[0] != 0  # pipefail
    status, output = run_block("python", "import sys; print('hi'); sys.exit(3)\n", cwd=tmp_path)
    assert (status, output) == (3, "hi\n")
    assert run_block("bash", "echo ok\n", cwd=tmp_path) == (0, "ok\n")


def test_a_hanging_block_is_killed_with_its_children(tmp_path):
    status, _ = run_block("bash", "sleep 60 &\nwait\n", timeout=1, cwd=tmp_path)
    assert status is None
