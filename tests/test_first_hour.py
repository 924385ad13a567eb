"""What a newcomer meets first: the installable package and its requirement files agreeing, the Hugging Face Spaces
header on README.md, and a browser test's message when no Chromium is installed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib


def requirement_lines(path: Path) -> list:
    lines = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("-r ")]


def test_requirement_files_list_what_pyproject_declares():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    assert requirement_lines(ROOT / "requirements.txt") == project["dependencies"]
    assert requirement_lines(ROOT / "ptuning" / "requirements.txt") == extras["ptuning"]
    assert requirement_lines(ROOT / "requirements-dev.txt") == [r for r in extras["dev"] if r != "chatglm[ptuning]"]
    assert "chatglm[ptuning]" in extras["dev"]


def test_the_package_imports_from_outside_the_repository(tmp_path):
    """`pip install -e .` makes `from chatglm import load_model` work anywhere (here: the installed package, or the
    repository on PYTHONPATH when the tests run from a plain checkout)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
    out = subprocess.run([sys.executable, "-c", "import chatglm, os; print(os.path.dirname(chatglm.__file__))"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "chatglm"


def spaces_header() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "README.md must open with the Hugging Face Spaces YAML header between --- lines"
    return yaml.safe_load(m.group(1))


def test_readme_opens_with_a_spaces_header_for_the_installed_gradio():
    import gradio
    header = spaces_header()
    assert header["sdk"] == "gradio"
    assert str(header["sdk_version"]) == gradio.__version__
    assert (ROOT / header["app_file"]).is_file() and header["app_file"] == "web_demo_old.py"
    assert header["title"] and header["license"] == "apache-2.0"


def test_a_browser_test_without_any_chromium_says_how_to_install_one(tmp_path):
    """Neither Debian's Chromium (CHATGLM_CHROMIUM points elsewhere) nor Playwright's own (an empty browsers
    folder): a browser test fails with the two install commands, not a traceback."""
    env = {**os.environ, "CHATGLM_CHROMIUM": str(tmp_path / "no-chromium"),
           "PLAYWRIGHT_BROWSERS_PATH": str(tmp_path / "browsers")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_web_demo.py",
                          "-k", "conversation_comes_first and old"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-3000:]
    assert "apt-get install chromium" in out.stdout and "python -m playwright install chromium" in out.stdout
    assert "Traceback" not in out.stdout and "playwright._impl" not in out.stdout, out.stdout[-3000:]
