"""Run a prompt suite (examples/prompts.yaml by default) through a model and write a Markdown gallery.

    python examples/render.py                                   # built-in demo model -> examples/GALLERY.md
    python examples/render.py --model-path /path/to/chatglm-6b  # the real model
    python examples/render.py limitations/prompts.yaml --out /tmp/limits.md --max-new-tokens 256

The gallery states which model wrote it (path, precision, device, sampling settings) and, for the demo
checkpoint, says in a banner that the replies are not ChatGLM-6B's. limitations/render.py reuses this script.
"""
import argparse
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from anywhere: the chatglm package sits at the repo root

import yaml  # noqa: E402

from chatglm.options import add_model_args, load_from_args  # noqa: E402

DEFAULT_SUITE = os.path.join(ROOT, "examples", "prompts.yaml")


class SuiteError(ValueError):
    """A prompt suite file that cannot be used; the message names the file and the entry."""


def load_suite(path: str) -> dict:
    """The suite as a dict with title, about, reference_label and a checked list of prompts."""
    try:
        with open(path, encoding="utf-8") as f:
            suite = yaml.safe_load(f)
    except OSError as e:
        raise SuiteError(f"cannot read prompt suite {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise SuiteError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(suite, dict) or not isinstance(suite.get("prompts"), list) or not suite["prompts"]:
        raise SuiteError(f"{path}: expected a mapping with a non-empty 'prompts' list")
    seen = set()
    for n, p in enumerate(suite["prompts"], 1):
        where = f"{path}: prompt #{n}"
        if not isinstance(p, dict):
            raise SuiteError(f"{where} is not a mapping")
        pid = p.get("id")
        if not isinstance(pid, str) or not pid or not all(c.isalnum() or c in "-_" for c in pid):
            raise SuiteError(f"{where}: 'id' must be a slug of letters, digits, '-' or '_', got {pid!r}")
        if pid in seen:
            raise SuiteError(f"{where}: id {pid!r} is used twice")
        seen.add(pid)
        if not isinstance(p.get("category"), str) or not p["category"].strip():
            raise SuiteError(f"{where} ({pid}): 'category' is missing")
        turns = p.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise SuiteError(f"{where} ({pid}): 'turns' must be a non-empty list of non-empty strings")
        if p.get("reference") is not None:
            p["reference"] = str(p["reference"])
    suite.setdefault("title", os.path.basename(path))
    return suite


def quote(text: str) -> str:
    """text as a Markdown blockquote, so a reply's own headings or lists stay inside its box."""
    if not text.strip():
        return "> *（空回复 · empty reply）*"
    return "\n".join(f"> {line}" if line.strip() else ">" for line in text.strip("\n").split("\n"))


def model_facts(model, args) -> dict:
    param = next(model.parameters())
    # the demo checkpoint marks its config, so it is named as the demo even when passed by --model-path
    version = getattr(model.config, "chatglm_demo_version", None)
    facts = {"is_demo": bool(getattr(model, "is_demo", False)) or version is not None, "device": str(param.device),
             "dtype": str(param.dtype).replace("torch.", ""), "quantize": args.quantize,
             "ptuning": args.ptuning_checkpoint}
    if facts["is_demo"]:
        facts["name"] = "chatglm-demo" + (f" v{version}" if version else "")
    else:
        facts["name"] = str(getattr(model, "name_or_path", args.model_path))
    return facts


def run_suite(suite: dict, tokenizer, model, args, log=sys.stderr) -> list:
    """[(prompt, [(query, reply), ...]), ...]: every turn of every prompt, seeded per prompt."""
    import torch
    results = []
    for n, p in enumerate(suite["prompts"], 1):
        torch.manual_seed(args.seed)  # per prompt, so one prompt's text does not depend on the others
        history, t0 = [], time.perf_counter()
        for query in p["turns"]:
            # stream_chat, not chat: it honours max_new_tokens on its own, and its last yield is chat()'s reply
            for _, history in model.stream_chat(
                    tokenizer, query, history, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
                    do_sample=not args.greedy, top_p=args.top_p, temperature=args.temperature):
                pass
        print(f"[{n}/{len(suite['prompts'])}] {p['id']}: {len(p['turns'])} turn(s), "
              f"{time.perf_counter() - t0:.1f}s", file=log, flush=True)
        results.append((p, history))
    return results


def render_markdown(suite: dict, results: list, facts: dict, settings: dict, command: str) -> str:
    out = [f"# {suite['title']}", ""]
    if facts["is_demo"]:
        out += ["> [!WARNING]",
                "> **演示模型输出 · DEMO MODEL OUTPUT — 不是 ChatGLM-6B 的回答 · not ChatGLM-6B's replies.**",
                ">",
                f"> 下面的回答由本仓库内置的演示模型（{facts['name']}）生成：它是一个很小的模型，"
                "只在一小段文本上训练了几秒，输出是没有意义的文字，只用来检验这个脚本能跑通。"
                "用真实权重重新生成：",
                "> `python " + settings["script"] + " --model-path /path/to/chatglm-6b`",
                ">",
                f"> The replies below were written by the built-in demo checkpoint ({facts['name']}), a tiny model "
                "trained for a few seconds on a short text file. They are meaningless and only show that this "
                "script works. Re-render with real weights using the command above.", ""]
    else:
        rerun_zh, rerun_en = ("", "")
        if settings["do_sample"]:
            rerun_zh, rerun_en = "采样生成，重跑会得到不同的文字。", " They are sampled, so a rerun gives different text."
        out += [f"> 下面的回答由 `{facts['name']}` 生成（设置见下表）。{rerun_zh}",
                f"> Replies below were generated by `{facts['name']}` with the settings in the table.{rerun_en}", ""]
    if suite.get("about"):
        out += [suite["about"].strip(), ""]
    sampling = ("greedy" if not settings["do_sample"] else
                f"sampling, top_p={settings['top_p']}, temperature={settings['temperature']}")
    precision = facts["dtype"] + (f", quantized to int{facts['quantize']}" if facts["quantize"] else "")
    rows = [("模型 · model", f"`{facts['name']}`" + (" — demo checkpoint, **not ChatGLM-6B**" if facts["is_demo"]
                                                      else "")),
            ("精度 · precision", f"{precision} on {facts['device']}"),
            ("生成 · decoding", f"{sampling}, seed {settings['seed']} per prompt"),
            ("长度 · length", f"max_length={settings['max_length']}"
             + (f", max_new_tokens={settings['max_new_tokens']}" if settings["max_new_tokens"] else "")),
            ("提示 · prompts", f"{len(results)} from `{settings['suite']}`"),
            ("命令 · command", f"`{command}`")]
    if facts["ptuning"]:
        rows.insert(1, ("P-Tuning", f"`{facts['ptuning']}`"))
    out += ["| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '&#124;')} |" for k, v in rows] + [""]
    out += ["## 目录 · Contents", ""]
    out += [f"{n}. [{p['category']} — `{p['id']}`](#{p['id']})" for n, (p, _) in enumerate(results, 1)] + [""]
    label = suite.get("reference_label", "参考 · Reference")
    for n, (p, turns) in enumerate(results, 1):
        out += [f'<a id="{p["id"]}"></a>', "", f"## {n}. {p['category']} — `{p['id']}`", ""]
        for query, reply in turns:
            out += ["**用户 · User**", "", quote(query), "", "**模型 · Model**", "", quote(reply), ""]
        if p.get("reference"):
            out += [f"*{label}:* {p['reference'].strip()}", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def build_parser(default_suite: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("suite", nargs="?", default=default_suite, help="prompt suite (YAML)")
    parser.add_argument("--out", default=None, help="gallery to write (default: GALLERY.md beside the suite)")
    parser.add_argument("--only", nargs="+", metavar="ID", help="render only these prompt ids")
    parser.add_argument("--max-length", type=int, default=2048, help="prompt + reply tokens, as in chat()")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap each reply (default: no cap)")
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.95)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0, help="torch seed, set before each prompt")
    add_model_args(parser)
    return parser


def main(argv=None, default_suite: str = DEFAULT_SUITE) -> int:
    args = build_parser(default_suite).parse_args(argv)
    try:
        suite = load_suite(args.suite)
        if args.only:
            known = [p["id"] for p in suite["prompts"]]
            unknown = [i for i in args.only if i not in known]
            if unknown:
                raise SuiteError(f"unknown prompt id(s) {', '.join(unknown)}; {args.suite} has: {', '.join(known)}")
            suite["prompts"] = [p for p in suite["prompts"] if p["id"] in args.only]
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise SuiteError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(args.suite)), "GALLERY.md")

    from chatglm import ModelLoadError
    try:
        tokenizer, model = load_from_args(args)
    except (ModelLoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        results = run_suite(suite, tokenizer, model, args)
    except ValueError as e:  # generation settings the model cannot use (e.g. --max-length beyond its context)
        print(f"error: {e}", file=sys.stderr)
        return 2

    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    if script.startswith(".."):
        script = sys.argv[0]
    command = shlex.join(["python", script] + (sys.argv[1:] if argv is None else list(argv)))
    suite_name = os.path.relpath(os.path.abspath(args.suite), ROOT)
    settings = dict(script=script, suite=args.suite if suite_name.startswith("..") else suite_name, seed=args.seed,
                    do_sample=not args.greedy, top_p=args.top_p, temperature=args.temperature,
                    max_length=args.max_length, max_new_tokens=args.max_new_tokens)
    text = render_markdown(suite, results, model_facts(model, args), settings, command)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # write then rename: an interrupted run leaves the old gallery
        f.write(text)
    os.replace(tmp, out_path)
    print(f"wrote {out_path} ({len(results)} prompts)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
