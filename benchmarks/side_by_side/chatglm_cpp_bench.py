"""Time chatglm.cpp 0.4.2 (ggml, CPU) decode on the random-weight ChatGLM-6B GGML files made by chatglm_cpp_convert.py.

    python chatglm_cpp_bench.py --main-binary SDIST/build/bin/main --models-dir MODELS
        [--types q4_0,q8_0,f16] [--layers 28] [--prompt-len 32] [--new-tokens 32] [--repeats 3]

Runs MODELS/glm6b-random-<layers>l-<type>.bin through chatglm.cpp's `main` (--mode generate, greedy: --temp 0),
once untimed to page the mmapped file in, then --repeats times. Nothing is extrapolated: time 28-layer files.
Per run it prints chatglm.cpp's own PerfStreamer lines ("prompt time" / "output time") and a corrected decode
figure: chatglm.cpp's "output ms/token" divides the time of N-1 decode steps (its clock starts when the first new
token, produced by the prefill, arrives) by N, so it understates the per-step cost; decode_ms_step =
output_total / (N-1) is the true per-step cost and the figure to compare with bench.py's ms/token.
Threads: 0.4.2's main has no -t flag; it uses std::thread::hardware_concurrency() threads for prefill and decode
when that is <= 4 (else half of it, decode capped at 16), so on a 2-core machine both use 2.
Precision mapping: see chatglm_cpp_convert.py (q8_0 / q4_0 also quantize the shared embedding / output layer).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

PROMPT_RE = re.compile(r"prompt time: ([\d.]+) ms / (\d+) tokens \(([\d.]+) ms/token\)")
OUTPUT_RE = re.compile(r"output time: ([\d.]+) ms / (\d+) tokens \(([\d.]+) ms/token\)")


def prompt_text(n_tokens):
    # the demo sentencepiece model (only used for the prompt; weights are random) encodes "a a a ..." as one token
    # per "a"; chatglm.cpp's ChatGLM tokenizer appends [gMASK] <sop>, so n_tokens - 2 words give n_tokens in all
    assert n_tokens >= 3
    return " ".join(["a"] * (n_tokens - 2))


def run_once(main_binary, model, prompt_file, prompt_len, new_tokens):
    cmd = [main_binary, "-m", model, "--mode", "generate", "--sync", "--temp", "0", "--pp", prompt_file,
           "-c", str(max(prompt_len, 512)), "-l", "2048", "--max_new_tokens", str(new_tokens), "-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    p, o = PROMPT_RE.search(out), OUTPUT_RE.search(out)
    if not (p and o):
        sys.exit(f"could not parse chatglm.cpp output:\n{out}")
    return dict(prompt_ms=float(p[1]), prompt_tokens=int(p[2]), prompt_ms_tok=float(p[3]),
                out_ms=float(o[1]), out_tokens=int(o[2]), out_ms_tok=float(o[3]),
                decode_ms_step=float(o[1]) / max(int(o[2]) - 1, 1)), cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--main-binary", required=True,
                    help="chatglm.cpp's built example, e.g. chatglm_cpp-0.4.2/build/bin/main")
    ap.add_argument("--models-dir", required=True,
                    help="folder with glm6b-random-<layers>l-<type>.bin (chatglm_cpp_convert.py); the prompt file "
                         "prompt_<prompt-len>.txt is written here too, so the printed command can be rerun")
    ap.add_argument("--types", default="q4_0,q8_0,f16", help="comma-separated GGML types to time")
    ap.add_argument("--layers", type=int, default=28, help="layers of the converted files (the <layers> in their name)")
    ap.add_argument("--prompt-len", type=int, default=32, help="total prompt tokens incl. [gMASK] <sop>")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed run that pages the mmapped file in")
    args = ap.parse_args()
    assert args.prompt_len + args.new_tokens <= 2048, "chatglm.cpp caps prompt + output at max_length 2048"
    main_binary = os.path.abspath(args.main_binary)
    if not os.access(main_binary, os.X_OK):
        sys.exit(f"{main_binary} is not an executable: build chatglm.cpp first (README.md)")

    prompt_file = os.path.join(args.models_dir, f"prompt_{args.prompt_len}.txt")
    with open(prompt_file, "w") as fh:
        fh.write(prompt_text(args.prompt_len))
    for t in args.types.split(","):
        model = os.path.join(args.models_dir, f"glm6b-random-{args.layers}l-{t}.bin")
        if not os.path.isfile(model):
            print(f"{t}: missing {model}, skipped")
            continue
        if not args.no_warmup:
            run_once(main_binary, model, prompt_file, args.prompt_len, 2)
        runs = []
        for _ in range(args.repeats):
            r, cmd = run_once(main_binary, model, prompt_file, args.prompt_len, args.new_tokens)
            runs.append(r)
            print(f"  {t}: prompt {r['prompt_tokens']} tok {r['prompt_ms']:.1f} ms ({r['prompt_ms_tok']:.2f} ms/tok) | "
                  f"output {r['out_tokens']} tok {r['out_ms']:.1f} ms ({r['out_ms_tok']:.2f} ms/tok as reported) | "
                  f"decode {r['decode_ms_step']:.2f} ms/step", flush=True)
        if runs[0]["out_tokens"] != args.new_tokens:
            print(f"  WARNING: generated {runs[0]['out_tokens']} tokens, asked {args.new_tokens}")
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        print(f"{t} layers={args.layers} prompt_len={med('prompt_tokens'):.0f} new={args.new_tokens}: "
              f"prefill {med('prompt_ms'):.1f} ms ({med('prompt_ms_tok'):.2f} ms/tok), "
              f"decode {med('decode_ms_step'):.2f} ms/step (reported {med('out_ms_tok'):.2f} ms/tok) "
              f"[median of {len(runs)}]")
        print("  cmd: " + " ".join(cmd))


if __name__ == "__main__":
    main()
