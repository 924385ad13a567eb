"""examples/ and limitations/: the prompt suites cover their categories, the renderers run end to end on the demo
checkpoint (as a user runs them, in a subprocess) and the galleries show every prompt and say which model wrote them."""
import importlib.util
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = {"examples": os.path.join(ROOT, "examples", "prompts.yaml"),
          "limitations": os.path.join(ROOT, "limitations", "prompts.yaml")}
SCRIPTS = {"examples": os.path.join(ROOT, "examples", "render.py"),
           "limitations": os.path.join(ROOT, "limitations", "render.py")}
DEMO_BANNER = "DEMO MODEL OUTPUT"
# Upstream README's example and limitation categories, by the English half of our category names.
EXAMPLE_CATEGORIES = {"Self-introduction", "Outline writing", "Ad copy", "Comments", "Email assistant",
                      "Information extraction", "Role play", "Comparison", "Tour guide"}
LIMITATION_CATEGORIES = {"Factual errors", "Arithmetic", "Self-identity confusion", "English quality"}


def _render_module():
    spec = importlib.util.spec_from_file_location("examples_render", SCRIPTS["examples"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _render_module()


def gallery_problems(text: str, suite: dict, demo: bool = True) -> list:
    """What a gallery of `suite` lacks: prompts, turns, references, one reply per turn, the model statement."""
    problems = []
    for p in suite["prompts"]:
        if f'<a id="{p["id"]}"></a>' not in text or f"`{p['id']}`" not in text:
            problems.append(f"prompt {p['id']} has no section")
        for turn in p["turns"]:
            if render.quote(turn) not in text:
                problems.append(f"prompt {p['id']}: turn {turn[:30]!r} is not shown")
        if p.get("reference") and str(p["reference"]).strip() not in text:
            problems.append(f"prompt {p['id']}: reference is not shown")
    n_turns = sum(len(p["turns"]) for p in suite["prompts"])
    if text.count("**模型 · Model**") != n_turns:
        problems.append(f"{text.count('**模型 · Model**')} replies for {n_turns} turns")
    if demo and (DEMO_BANNER not in text or "not ChatGLM-6B" not in text or "`chatglm-demo" not in text):
        problems.append("no banner saying the demo checkpoint (not ChatGLM-6B) wrote it")
    return problems


@pytest.fixture(scope="module")
def rendered(demo_model_path, tmp_path_factory):
    """Both renderers run at once (2 cores), from a foreign working directory, with short replies."""
    out = tmp_path_factory.mktemp("galleries")
    env = {k: v for k, v in os.environ.items() if k != "CHATGLM_MODEL"}  # no --model-path: the demo model
    env["HF_HUB_OFFLINE"] = "1"
    procs = {name: subprocess.Popen([sys.executable, script, "--max-new-tokens", "4", "--out", str(out / f"{name}.md")],
                                    cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, script in SCRIPTS.items()}
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        text = (out / f"{name}.md").read_text(encoding="utf-8") if (out / f"{name}.md").exists() else None
        results[name] = (proc.returncode, stderr, text)
    return results


def _suite(name):
    with open(SUITES[name], encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", ["examples", "limitations"])
def test_renderer_writes_a_gallery_with_every_prompt_on_the_demo_model(rendered, name):
    rc, stderr, text = rendered[name]
    assert rc == 0, stderr
    assert text is not None, f"{name}: no gallery written\n{stderr}"
    assert gallery_problems(text, _suite(name)) == []
    n = len(_suite(name)["prompts"])
    assert f"[{n}/{n}]" in stderr  # progress is reported per prompt
    assert "max_new_tokens=4" in text and "seed 0 per prompt" in text  # the settings that produced it


@pytest.mark.parametrize("name", ["examples", "limitations"])
def test_committed_gallery_matches_the_suite_and_names_the_demo_model(name):
    path = os.path.join(ROOT, name, "GALLERY.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert gallery_problems(text, _suite(name)) == [], f"regenerate it: python {name}/render.py --max-new-tokens 48"


def test_suites_cover_upstreams_categories():
    def english(category):
        return category.split("·")[-1].strip()
    assert EXAMPLE_CATEGORIES <= {english(p["category"]) for p in render.load_suite(SUITES["examples"])["prompts"]}
    limits = {english(p["category"]) for p in render.load_suite(SUITES["limitations"])["prompts"]}
    assert LIMITATION_CATEGORIES <= limits
    for p in render.load_suite(SUITES["limitations"])["prompts"]:
        assert p.get("reference"), f"limitation {p['id']} needs its correct answer"


def test_gallery_of_a_real_model_names_it_and_has_no_demo_banner():
    suite = render.load_suite(SUITES["examples"])
    suite["prompts"] = suite["prompts"][:2]
    results = [(p, [(q, f"reply to {q}") for q in p["turns"]]) for p in suite["prompts"]]
    facts = {"is_demo": False, "name": "/models/chatglm-6b", "device": "cuda:0", "dtype": "float16", "quantize": 4,
             "ptuning": None}
    settings = dict(script="examples/render.py", suite="examples/prompts.yaml", seed=0, do_sample=True, top_p=0.7,
                    temperature=0.95, max_length=2048, max_new_tokens=None)
    text = render.render_markdown(suite, results, facts, settings, "python examples/render.py --model-path x")
    assert gallery_problems(text, suite, demo=False) == []
    assert DEMO_BANNER not in text and "not ChatGLM-6B" not in text
    assert "`/models/chatglm-6b`" in text and "float16, quantized to int4 on cuda:0" in text


@pytest.mark.parametrize("content, message", [
    ("prompts: []\n", "non-empty 'prompts'"),
    ("prompts:\n  - id: a\n    category: c\n    turns: [hi]\n  - id: a\n    category: c\n    turns: [yo]\n",
     "id 'a' is used twice"),
    ("prompts:\n  - id: a\n    category: c\n    turns: []\n", "prompt #1 (a): 'turns'"),
    ("prompts: [unclosed\n", "not valid YAML"),
])
def test_bad_suite_is_refused_with_the_file_and_entry_named(tmp_path, capsys, content, message):
    suite = tmp_path / "suite.yaml"
    suite.write_text(content, encoding="utf-8")
    assert render.main([str(suite), "--out", str(tmp_path / "g.md")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(suite) in err
    assert not (tmp_path / "g.md").exists()


def test_unknown_only_id_lists_the_known_ones(tmp_path, capsys):
    assert render.main(["--only", "no-such-prompt", "--out", str(tmp_path / "g.md")]) == 2
    err = capsys.readouterr().err
    assert "no-such-prompt" in err and "self-introduction" in err
