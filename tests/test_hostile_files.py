"""Broken and hostile files: a model folder whose config.json is wrong or disagrees with the weights, a weight file
that would run code when unpickled, a bad P-Tuning config, and training data with wrong values, shapes or encodings.
Each is refused with one message naming the file and the field or line, before any work is done on it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatglm import ModelLoadError, load_model
from ptuning.data import check_columns, read_rows_and_lines

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model_copy(demo_model_path, tmp_path):
    """A writable copy of the demo checkpoint and a function that edits its config.json."""
    folder = tmp_path / "model"
    shutil.copytree(demo_model_path, folder)

    def edit(**fields):
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return str(folder)
    return folder, edit


@pytest.mark.parametrize("fields, words", [
    ({"num_attention_heads": 3}, "num_attention_heads 3 must divide hidden_size 128"),
    ({"hidden_size": "128"}, "hidden_size must be a positive integer, got '128'"),
    ({"num_layers": None}, "num_layers must be a positive integer, got None"),
    ({"layernorm_epsilon": "tiny"}, "layernorm_epsilon must be a small positive number"),
    ({"eos_token_id": 10**6}, "eos_token_id must be a token id in 0..823"),
    ({"pre_seq_len": -3}, "pre_seq_len must be a positive integer"),
    ({"num_layers": 1}, "have 2 layers, but"),  # fewer layers than the weights: used to load, dropping one
    ({"num_layers": 3}, "have 2 layers, but"),
])
def test_a_config_that_cannot_work_or_disagrees_with_the_weights_is_refused(model_copy, fields, words):
    folder, edit = model_copy
    with pytest.raises(ModelLoadError) as e:
        load_model(edit(**fields), device="cpu")
    assert words in str(e.value) and str(folder / "config.json") in str(e.value)


def test_a_negative_prefix_length_is_refused_naming_the_option(demo_model_path):
    with pytest.raises(ModelLoadError, match=r"--pre-seq-len: pre_seq_len must be a positive integer .*got -3"):
        load_model(demo_model_path, device="cpu", pre_seq_len=-3)


def test_a_broken_ptuning_config_is_reported_with_its_file(demo_model_path, tmp_path):
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"pre_seq_len": 8,', encoding="utf-8")
    with pytest.raises(ModelLoadError) as e:
        load_model(demo_model_path, device="cpu", ptuning_checkpoint=str(checkpoint))
    assert str(checkpoint / "config.json") in str(e.value) and "not a valid P-Tuning config" in str(e.value)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_MARKER",))


def test_a_weight_file_that_would_run_code_is_called_unsafe_and_not_run(model_copy, tmp_path, monkeypatch):
    folder, _ = model_copy
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**weights, "extra": RunsCode()}, folder / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        load_model(str(folder), device="cpu")
    message = str(e.value)
    assert "UNSAFE" in message and "system" in message and str(folder / "pytorch_model.bin") in message
    assert "truncated" not in message and "weights_only" not in message  # no advice to turn the guard off
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_a_truncated_weight_file_is_still_called_truncated(model_copy):
    folder, _ = model_copy
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(str(folder), device="cpu")


def test_the_front_doors_print_the_config_problem_as_one_line(model_copy):
    _, edit = model_copy
    out = subprocess.run([sys.executable, "cli_demo.py", "--model-path", edit(num_attention_heads=3)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "config.json: num_attention_heads 3" in errors[0], out.stderr


# ---- P-Tuning training data ---------------------------------------------------------------------------------

GOOD = {"content": "类型#裙", "summary": "一条裙子", "history": [["你好", "你好！"]]}


@pytest.mark.parametrize("rows, bad_row, message", [
    ([GOOD, {**GOOD, "content": 42}], 2, "content must be text, got int"),
    ([GOOD, GOOD, {**GOOD, "summary": ["a", "b"]}], 3, "summary must be text, got list"),
    ([{**GOOD, "history": [["only one"]]}], 1, "history[0] must be a [query, response] pair, got ['only one']"),
    ([{**GOOD, "history": [["q", 7]]}], 1, "history[0][1] must be text, got int"),
    ([{**GOOD, "history": "你好"}], 1, "history must be a list of [query, response] pairs, got str"),
    ([{**GOOD, "content": "a\ud800"}], 1, "content contains a lone surrogate (U+D800) at character 1"),
    ([{**GOOD, "summary": "a\x00"}], 1, "summary contains a NUL character at character 1"),
    ([GOOD, 5], 2, "expected a JSON object, got int"),
])
def test_bad_training_rows_name_the_file_line_and_field(tmp_path, rows, bad_row, message):
    path = tmp_path / "train.json"
    path.write_text("\n\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")  # row k on line 2k-1
    with pytest.raises(ValueError) as e:
        rows, lines = read_rows_and_lines(path)
        check_columns(rows, path, ("content", "summary", "history"), lines)
    assert str(e.value).startswith(f"{path} line {2 * bad_row - 1}: {message}"), str(e.value)


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "gbk.json"
    path.write_bytes(json.dumps(GOOD, ensure_ascii=False).encode() + b"\n" +
                     json.dumps(GOOD, ensure_ascii=False).encode("gbk") + b"\n")
    with pytest.raises(ValueError, match=r"gbk\.json line 2: not valid UTF-8 \(byte 0x\w\w\); save the file as UTF-8"):
        read_rows_and_lines(path)


def test_training_refuses_bad_data_naming_the_file_and_line(demo_model_path, tmp_path):
    from ptuning.main import main
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "summary": 3.5}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["--do_train", "--train_file", str(path), "--prompt_column", "content", "--response_column", "summary",
              "--model_name_or_path", demo_model_path, "--output_dir", str(tmp_path / "out"),
              "--max_steps", "1"])
    assert f"{path} line 2: summary must be text, got float" in str(e.value)
