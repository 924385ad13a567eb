"""ptuning/: P-Tuning v2 and full fine-tuning on transformers' Seq2SeqTrainer, evaluation, the shell scripts.

Real training steps on the demo checkpoint (CPU, seconds each); the scripts run as a user runs them, under torchrun
(2 processes, gloo) where the issue asks for it.
"""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
PTUNING = ROOT / "ptuning"
sys.path.insert(0, str(ROOT))

from chatglm import load_model  # noqa: E402
from ptuning.data import TrainCollator, prompts_and_answers, train_example  # noqa: E402
from ptuning.main import main  # noqa: E402
from ptuning.metrics import score_pair, score_texts  # noqa: E402

PREFIX = "transformer.prefix_encoder."

# Two ad-attribute prompts whose targets are sentences the demo model has seen, so a few P-Tuning steps can make
# its greedy output reproduce them.
LEARN_ROWS = [{"content": "类型#上衣*颜色#白色*风格#简约", "summary": "春天来了，花儿开了，小鸟在树上唱歌。"},
              {"content": "类型#裙*颜色#黑色*风格#优雅", "summary": "北京是中国的首都，长城和故宫都是著名的景点。"}]


@pytest.fixture(scope="module", autouse=True)
def restore_transformers_logging():
    """main() configures transformers' logging as a script should; give the next test files theirs back."""
    level = transformers.utils.logging.get_verbosity()
    yield
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.reset_format()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_rows(name, n):
    lines = (PTUNING / "data" / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def run_script(script, env_overrides, *args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_overrides}
    proc = subprocess.run(["bash", str(PTUNING / script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def logged_losses(output_dir):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def greedy_texts(tokenizer, model, prompts, **limit):
    out = []
    for prompt in prompts:
        inputs = tokenizer([prompt], return_tensors="pt")
        ids = model.generate(**inputs, do_sample=False, **(limit or {"max_new_tokens": 40}))
        out.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


# ---- example construction and loss: the original's numbers ---------------------------------------------------

@pytest.mark.parametrize("folder", ["tiny", "tiny-ptuning", "tiny-ptuning-proj"])
def test_training_examples_loss_and_prefix_gradients_match_the_original(golden_dir, folder):
    gold = json.loads((golden_dir / folder / "golden.json").read_text(encoding="utf-8"))["training"]
    checkpoint = None if folder == "tiny" else str(golden_dir / folder)
    tokenizer, model = load_model(str(golden_dir / "tiny"), device="cpu", dtype="float32",
                                  ptuning_checkpoint=checkpoint)
    model.eval()  # the goldens were computed in eval mode (no prefix dropout)
    rows = [e["example"] for e in gold["examples"]]
    pairs = prompts_and_answers(rows, "prompt", "response", "history")
    examples = [train_example(tokenizer, p, a, 24, 20) for p, a in pairs]  # the golden's lengths
    for (prompt, _), example, expected in zip(pairs, examples, gold["examples"]):
        assert prompt == expected["prompt"]
        assert example["input_ids"] == expected["input_ids"]
        assert example["labels"] == expected["labels"]

    batch = TrainCollator(tokenizer.pad_token_id)(examples)
    with torch.set_grad_enabled(checkpoint is not None):
        loss = model(**batch).loss
    assert abs(loss.item() - gold["loss_eval_no_grad"]) <= 1e-4
    if checkpoint is not None:  # only the prefix trains, and its gradients are the original's
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert sorted(grads) == sorted(gold["trainable_parameters"])
        for name, expected in gold["grad_norms"].items():
            assert abs(grads[name].norm().item() - expected) <= 1e-4 * expected, name


# ---- metrics ---------------------------------------------------------------------------------------------------

def test_metrics_score_jieba_words_and_characters_and_survive_empty_predictions():
    assert score_pair("这款上衣很好看", "这款上衣很好看") == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0,
                                                           "bleu-4": 100.0}
    # jieba: 这/款/上衣/很/好看 vs 这/款/上衣/好看 -> unigrams P 4/5, R 1, F 8/9; bigrams P 2/4, R 2/3, F 4/7
    partial = score_pair("这款上衣很好看", "这款上衣好看")
    assert partial["rouge-1"] == pytest.approx(100 * 8 / 9, abs=1e-3)
    assert partial["rouge-2"] == pytest.approx(100 * 4 / 7, abs=1e-3)
    assert 0 < partial["bleu-4"] < 100
    # upstream crashed here ("Hypothesis is empty"); an empty or blank prediction scores zero instead
    assert score_pair("", "这款上衣好看") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    assert score_pair("  ", "这款上衣好看")["rouge-1"] == 0.0
    mean = score_texts(["这款上衣很好看", ""], ["这款上衣很好看", "这款上衣好看"])
    assert mean == {"rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 50.0}


# ---- a P-Tuning run: learning, the checkpoint, reloading, evaluation --------------------------------------------

@pytest.fixture(scope="module")
def tuned(demo_model_path, tmp_path_factory):
    """One short P-Tuning v2 run through main.py (training, then greedy prediction on the training prompts).
    max_source_length 48 leaves the prompts (~37 demo-tokenizer tokens) uncut."""
    tmp = tmp_path_factory.mktemp("ptuning")
    data = write_jsonl(tmp / "train.json", LEARN_ROWS)
    out = tmp / "out"
    trainer = main(["--do_train", "--do_predict", "--train_file", str(data), "--test_file", str(data),
                    "--prompt_column", "content", "--response_column", "summary",
                    "--model_name_or_path", demo_model_path, "--output_dir", str(out),
                    "--max_source_length", "48", "--max_target_length", "64", "--per_device_train_batch_size", "2",
                    "--max_steps", "36", "--logging_steps", "4", "--save_steps", "1000", "--learning_rate", "0.3",
                    "--pre_seq_len", "16", "--do_sample", "false", "--seed", "42", "--disable_tqdm", "true",
                    "--log_level", "warning"])
    return trainer, out, out / "checkpoint-36"


def test_ptuning_lowers_the_loss_and_moves_greedy_output_toward_the_targets(tuned, demo_model_path):
    trainer, out, _ = tuned
    losses = logged_losses(out)
    assert len(losses) == 9 and losses[-1] < 0.5 * losses[0], losses

    prompts = [r["content"] for r in LEARN_ROWS]
    targets = [r["summary"] for r in LEARN_ROWS]
    tokenizer, base = load_model(demo_model_path, device="cpu", dtype="float32")
    before = score_texts(greedy_texts(tokenizer, base, prompts), targets)["bleu-4"]
    predictions = [json.loads(line) for line in (out / "generated_predictions.txt").read_text().splitlines()]
    assert [p["labels"] for p in predictions] == targets
    after = score_texts([p["predict"] for p in predictions], targets)["bleu-4"]
    assert after > before + 25, (before, after, predictions)
    assert any(p["predict"].startswith(t[:6]) for p, t in zip(predictions, targets)), predictions


def test_checkpoint_holds_only_the_prefix_and_reloads_to_the_same_model(tuned, demo_model_path):
    trainer, out, checkpoint = tuned
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-36"]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["pre_seq_len"] == 16 and config["prefix_projection"] is False
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert list(weights) == [PREFIX + "embedding.weight"]
    assert weights[PREFIX + "embedding.weight"].shape == (16, 2 * 2 * 128)  # P x (2 * layers * hidden)
    assert (checkpoint / "model.safetensors").stat().st_size < 100_000

    # a fresh base model + the checkpoint computes what the trained model computes
    tokenizer, reloaded = load_model(demo_model_path, device="cpu", dtype="float32", ptuning_checkpoint=str(checkpoint))
    assert reloaded.config.pre_seq_len == 16
    tuned_model = trainer.model.eval()
    batch = tokenizer([r["content"] for r in LEARN_ROWS] + ["你好"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = tuned_model(**batch).logits
        got = reloaded.eval()(**batch).logits
    assert torch.equal(reloaded.transformer.prefix_encoder.embedding.weight,
                       tuned_model.transformer.prefix_encoder.embedding.weight)
    assert (got - expected).abs().max().item() <= 1e-5
    predictions = [json.loads(line)["predict"] for line in (out / "generated_predictions.txt").read_text().splitlines()]
    # prediction generated up to max_source_length + max_target_length + 1 tokens in all, one batch
    assert greedy_texts(tokenizer, reloaded, [r["content"] for r in LEARN_ROWS], max_length=48 + 64 + 1) == predictions


def test_prediction_writes_the_four_metrics(tuned):
    _, out, _ = tuned
    results = json.loads((out / "predict_results.json").read_text())
    for name in ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"):
        assert 0.0 <= results[name] <= 100.0, name
    assert results["predict_samples"] == 2
    assert json.loads((out / "all_results.json").read_text())["train_samples"] == 2


@pytest.mark.skipif(not (ROOT / "web_demo.py").is_file() or importlib.util.find_spec("gradio") is None,
                    reason="needs the top-level web_demo.py and gradio")
def test_web_demo_sh_serves_the_base_model_with_the_trained_prefix(tuned, demo_model_path):
    _, _, checkpoint = tuned
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MODEL": demo_model_path, "PTUNING_CHECKPOINT": str(checkpoint)}
    proc = subprocess.Popen(["bash", str(PTUNING / "web_demo.sh"), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None and status != 200:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else "no answer in 90 s"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.skipif(not (ROOT / "web_common.py").is_file() or importlib.util.find_spec("gradio") is None,
                    reason="needs the top-level web demo and gradio")
def test_upstream_web_demo_command_line_maps_onto_the_shared_options():
    import web_common
    from ptuning.web_demo import translate
    argv = translate(["--model_name_or_path", "THUDM/chatglm-6b", "--ptuning_checkpoint", "output/x/checkpoint-3000",
                      "--pre_seq_len", "128", "--prefix_projection", "true", "--quantization_bit=4", "--port", "7861"])
    args = web_common.parse_args("test", argv)
    assert (args.model_path, args.ptuning_checkpoint, args.pre_seq_len, args.quantize, args.port) == (
        "THUDM/chatglm-6b", "output/x/checkpoint-3000", 128, 4, 7861)


# ---- the scripts, as users run them ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adgen_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("AdvertiseGen")
    write_jsonl(folder / "train.json", sample_rows("AdvertiseGen-sample/train.json", 8))
    write_jsonl(folder / "dev.json", LEARN_ROWS + [{"content": "类型#裤*颜色#蓝色", "summary": "谢谢你的提问。"}])
    return folder


def script_env(demo_model_path, **extra):
    # the scripts' own INT4 base (QUANTIZATION_BIT is left alone); a short prefix keeps the test quick
    return {"MODEL": demo_model_path, "PRE_SEQ_LEN": "8", **extra}


def test_train_sh_and_evaluate_sh_under_torchrun_with_two_processes(demo_model_path, adgen_dir, tmp_path):
    out = tmp_path / "run"
    log = run_script("train.sh", script_env(demo_model_path, NUM_GPUS="2", DATA_DIR=str(adgen_dir),
                                            OUTPUT_DIR=str(out)),
                     "--ddp_backend", "gloo", "--max_steps", "2", "--gradient_accumulation_steps", "2",
                     "--max_source_length", "32", "--max_target_length", "32", "--logging_steps", "1")
    # 2 processes x batch 1 x 2 accumulation steps, trained for 2 steps and saved once, by one process
    assert "2 process(es), distributed type MULTI_CPU" in log  # data-parallel (gloo), not 2 separate runs
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in log
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    config = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert config["quantization_bit"] == 4 and config["pre_seq_len"] == 8  # a prefix trained over an INT4 base
    assert all(k.startswith(PREFIX) for k in load_file(str(out / "checkpoint-2" / "model.safetensors")))
    assert len(logged_losses(out)) == 2

    # prediction with the checkpoint, also on 2 processes: one line per dev row, in order (3 rows over 2
    # processes: the repeated row that evens out the last batch must not show up)
    result = tmp_path / "eval"
    run_script("evaluate.sh", script_env(demo_model_path, NUM_GPUS="2", DATA_DIR=str(adgen_dir),
                                         PTUNING_CHECKPOINT=str(out / "checkpoint-2"), OUTPUT_DIR=str(result)),
               "--ddp_backend", "gloo", "--max_source_length", "32", "--max_target_length", "64")
    lines = [json.loads(line) for line in (result / "generated_predictions.txt").read_text().splitlines()]
    dev = [json.loads(line)["summary"] for line in (adgen_dir / "dev.json").read_text().splitlines()]
    assert [line["labels"] for line in lines] == dev
    metrics = json.loads((result / "predict_results.json").read_text())
    assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"} <= set(metrics)


def test_train_chat_sh_trains_on_multi_turn_history_with_a_projected_prefix(demo_model_path, tmp_path):
    out = tmp_path / "chat"
    log = run_script("train_chat.sh", script_env(demo_model_path, CHECKPOINT_NAME=str(out)),
                     "--max_steps", "1", "--gradient_accumulation_steps", "1", "--max_source_length", "96",
                     "--max_target_length", "48", "--prefix_projection")
    # the first sample row has one earlier turn: the prompt is the chat format model.chat uses
    assert "inputs '[Round 0]\\n问：下雨天雨刮器刮不干净是怎么回事？\\n答：" in log
    checkpoint = out / "checkpoint-1"
    assert json.loads((checkpoint / "config.json").read_text())["prefix_projection"] is True
    assert sorted(load_file(str(checkpoint / "model.safetensors"))) == [
        PREFIX + k for k in ("embedding.weight", "trans.0.bias", "trans.0.weight", "trans.2.bias", "trans.2.weight")]
    _, model = load_model(demo_model_path, device="cpu", ptuning_checkpoint=str(checkpoint))  # projection from config
    assert model.config.prefix_projection is True and model.config.pre_seq_len == 8


def test_resuming_from_a_prefix_checkpoint_continues_exactly(demo_model_path, tmp_path):
    data = write_jsonl(tmp_path / "train.json", sample_rows("AdvertiseGen-sample/train.json", 8))

    def run(out, steps, *extra):
        main(["--do_train", "--train_file", str(data), "--prompt_column", "content", "--response_column", "summary",
              "--model_name_or_path", demo_model_path, "--output_dir", str(out), "--max_source_length", "24",
              "--max_target_length", "24", "--per_device_train_batch_size", "2", "--max_steps", str(steps),
              "--save_steps", "2", "--learning_rate", "0.05", "--lr_scheduler_type", "constant",  # same schedule
              "--pre_seq_len", "4", "--disable_tqdm", "true",
              "--log_level", "warning", *extra])
        return load_file(str(out / f"checkpoint-{steps}" / "model.safetensors"))

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "interrupted", 2)
    halfway = tmp_path / "interrupted" / "checkpoint-2"
    resumed = run(tmp_path / "interrupted", 4, "--resume_from_checkpoint", str(halfway))
    assert not torch.equal(straight[PREFIX + "embedding.weight"],
                           load_file(str(halfway / "model.safetensors"))[PREFIX + "embedding.weight"])
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-6)


# ---- full fine-tuning ------------------------------------------------------------------------------------------

def test_full_finetuning_trains_every_weight_and_saves_a_loadable_model(demo_model_path, tmp_path):
    data = write_jsonl(tmp_path / "train.json", LEARN_ROWS)
    out = tmp_path / "ft"
    main(["--do_train", "--train_file", str(data), "--prompt_column", "content", "--response_column", "summary",
          "--model_name_or_path", demo_model_path, "--output_dir", str(out), "--max_source_length", "32",
          "--max_target_length", "64", "--per_device_train_batch_size", "2", "--max_steps", "3",
          "--logging_steps", "1", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--log_level", "warning"])
    checkpoint = out / "checkpoint-3"
    tokenizer, tuned = load_model(str(checkpoint), device="cpu", dtype="float32")  # as evaluate_finetune.sh does
    _, base = load_model(demo_model_path, device="cpu", dtype="float32")
    assert tuned.config.pre_seq_len is None
    assert tuned.config.use_cache is True  # generation keeps its KV cache with the saved config
    before, after = base.state_dict(), tuned.state_dict()
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].to(p.dtype))]
    assert "transformer.layers.0.attention.query_key_value.weight" in changed
    assert "transformer.word_embeddings.weight" in changed
    losses = logged_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]
    examples = [train_example(tokenizer, r["content"], r["summary"], 32, 64) for r in LEARN_ROWS]
    batch = TrainCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        assert tuned.eval()(**batch).loss < base.eval()(**batch).loss


def test_deepspeed_json_is_zero2_and_the_trainer_fills_its_auto_values():
    """DeepSpeed itself needs GPUs; what can be checked here is the file and, where deepspeed is installed,
    that transformers' integration accepts it and fills the "auto" values from the script's arguments."""
    script = (PTUNING / "ds_train_finetune.sh").read_text()
    assert "--deepspeed deepspeed.json" in script and "--fp16" in script and "--pre_seq_len" not in script
    if importlib.util.find_spec("deepspeed") is None:
        config = json.loads((PTUNING / "deepspeed.json").read_text())
        assert config["zero_optimization"]["stage"] == 2
        pytest.skip("deepspeed is not installed: checked the file only")
    from transformers import Seq2SeqTrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    args = Seq2SeqTrainingArguments(output_dir="unused", per_device_train_batch_size=4, learning_rate=1e-4)
    args.fp16 = True  # as the script asks (set afterwards: on a machine without GPUs the flag itself is refused)
    config = HfTrainerDeepSpeedConfig(str(PTUNING / "deepspeed.json"))
    config.trainer_config_process(args)
    assert config.is_zero2() and not config.is_zero3()
    assert config.config["train_micro_batch_size_per_gpu"] == 4
    assert config.config["fp16"]["enabled"] is True and config.config["bf16"]["enabled"] is False
    assert config.config["gradient_clipping"] == 1.0


# ---- mistakes a user makes -------------------------------------------------------------------------------------

def test_bad_input_is_refused_with_a_message_that_says_what_to_fix(demo_model_path, tmp_path):
    data = write_jsonl(tmp_path / "train.json", LEARN_ROWS)
    base = ["--do_train", "--train_file", str(data), "--model_name_or_path", demo_model_path,
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--disable_tqdm", "true"]

    def refusal(*args):
        with pytest.raises(SystemExit) as e:
            main(base + list(args))
        return str(e.value)

    msg = refusal("--prompt_column", "content", "--response_column", "answer")
    assert "no field 'answer'" in msg and "summary" in msg
    assert "--prompt_column" in refusal()
    assert "--pre_seq_len" in refusal("--prompt_column", "content", "--response_column", "summary",
                                      "--quantization_bit", "4")
    missing = refusal("--prompt_column", "content", "--response_column", "summary",
                      "--train_file", str(tmp_path / "nope.json"))
    assert "not found" in missing and "nope.json" in missing
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    held = refusal("--prompt_column", "content", "--response_column", "summary", "--pre_seq_len", "4")
    assert "--overwrite_output_dir" in held and "--resume_from_checkpoint" in held
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"content": "a", "summary": "b"}\n{"content": \n', encoding="utf-8")
    assert "line 2" in refusal("--prompt_column", "content", "--response_column", "summary",
                               "--train_file", str(bad_json), "--overwrite_output_dir")


def test_a_prefix_checkpoint_with_another_prefix_length_is_refused(golden_dir, tmp_path):
    data = write_jsonl(tmp_path / "test.json", LEARN_ROWS)
    with pytest.raises(SystemExit) as e:
        main(["--do_predict", "--test_file", str(data), "--prompt_column", "content", "--response_column", "summary",
              "--model_name_or_path", str(golden_dir / "tiny"), "--ptuning_checkpoint",
              str(golden_dir / "tiny-ptuning"), "--pre_seq_len", "128", "--output_dir", str(tmp_path / "o")])
    assert "pre_seq_len" in str(e.value)


# ---- the README's "try it first" commands, verbatim, on the demo model -------------------------------------------

def readme_demo_commands():
    """The three commands of ptuning/README_en.md's "Try it first" block (train, evaluate, web demo)."""
    text = (PTUNING / "README_en.md").read_text(encoding="utf-8")
    section = text[text.index("## Try it first"):]
    block = section[section.index("```bash\n") + 8:section.index("```", section.index("```bash\n") + 8)]
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split("bash ")[1].split()[0] for c in commands] == ["train.sh", "evaluate.sh", "web_demo.sh"]
    return commands


def demo_env():
    """A user's shell with no model named: the scripts must choose the demo model themselves."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "CHATGLM_MODEL")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_readme_demo_commands_train_evaluate_and_serve_on_the_demo_model(demo_model_path):
    train, evaluate, serve = readme_demo_commands()
    out = PTUNING / "output" / "adgen-chatglm-6b-pt-128-2e-2"
    for command in (train, evaluate):
        proc = subprocess.run(["bash", "-c", command], cwd=PTUNING, env=demo_env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-4000:]}"
        assert "NOTICE: running the built-in DEMO checkpoint" in proc.stdout + proc.stderr
    assert json.loads((out / "checkpoint-20" / "trainer_state.json").read_text())["global_step"] == 20
    assert len((out / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()) == 8
    assert "predict_bleu-4" in json.loads((out / "predict_results.json").read_text())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["bash", "-c", f"{serve} --port {port}"], cwd=PTUNING, env=demo_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None and page is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
            except OSError:
                time.sleep(0.5)
        assert page, proc.stdout.read() if proc.poll() is not None else "no answer in 120 s"
        # the banner names the demo model and the P-Tuning checkpoint in use
        assert "Model: demo model, NOT ChatGLM-6B" in page
        assert "P-Tuning: output/adgen-chatglm-6b-pt-128-2e-2/checkpoint-20 (prefix 128)" in page
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_model_that_does_not_load_is_the_first_and_only_thing_train_sh_prints(tmp_path):
    env = {**demo_env(), "MODEL": str(tmp_path / "missing"), "DATA_DIR": "data/AdvertiseGen-sample"}
    proc = subprocess.run(["bash", str(PTUNING / "train.sh")], env=env, capture_output=True, text=True, timeout=300)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0
    assert output.splitlines() == [output.splitlines()[0]] and output.startswith("error: model folder"), output
    assert str(tmp_path / "missing") in output
