"""Text loaders on fixtures in the real datasets' formats, the embedded variants, and source errors.

The Hugging Face libraries run offline with an empty cache here (see conftest), so every Hub id
is unreachable: that is exactly the situation the missing-source errors describe.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from hydra import compose, initialize_config_dir

from attrbench.app import CONFIG_DIR
from attrbench.causal_lm import IGNORE_INDEX
from attrbench.data.hub import SourceUnavailableError
from attrbench.data.sft import DEFAULT_TEMPLATES, load_alpaca_samsum, load_embedded_sft
from attrbench.data.text_blocks import load_embedded_text, load_wikitext2
from attrbench.data.tokenization import load_tokenizer, pydoc_documents, train_embedded_tokenizer

from lm_problems import TOKENIZER

WIKITEXT_TRAIN = " \n = Valley Railway = \n \n The valley line opened in 1872 and closed in 1963 .\n" \
                 " It carried coal , timber and passengers between four villages .\n \n"
WIKITEXT_VALID = " \n = River Dee = \n \n The river rises in the hills and flows north to the sea .\n"
ALPACA = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Give the opposite.", "input": "hot", "output": "cold"},
]
SAMSUM = [
    {"id": "13818513", "summary": "Amanda baked cookies.", "dialogue": "Amanda: I baked cookies\r\nJerry: nice"},
    {"id": "13728867", "summary": "Olivia votes.", "dialogue": "Olivia: who are you voting for?\r\nOliver: Liberals"},
]


def _tokens(tokenizer, texts: list[str]) -> list[int]:
    return [token for text in texts for token in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _write_wikitext(directory: Path) -> None:
    (directory / "wiki.train.raw").write_text(WIKITEXT_TRAIN)
    (directory / "wiki.valid.raw").write_text(WIKITEXT_VALID)


def _write_json(path: Path, records: list[dict]) -> str:
    path.write_text(json.dumps(records, indent=2))
    return str(path)


def test_wikitext_raw_files_give_consecutive_blocks(tmp_path):
    _write_wikitext(tmp_path)
    splits = load_wikitext2(TOKENIZER, path=str(tmp_path), block_size=8, num_train=5, num_test=3)

    tokenizer = load_tokenizer(TOKENIZER)
    train_tokens = _tokens(tokenizer, WIKITEXT_TRAIN.splitlines(keepends=True))[:40]
    test_tokens = _tokens(tokenizer, WIKITEXT_VALID.splitlines(keepends=True))[:24]
    assert splits.train["input_ids"].tolist() == torch.tensor(train_tokens).view(5, 8).tolist()
    assert splits.test["input_ids"].tolist() == torch.tensor(test_tokens).view(3, 8).tolist()
    assert torch.equal(splits.train["labels"], splits.train["input_ids"])
    assert bool(splits.train["attention_mask"].eq(1).all())
    assert splits.info["variant"] == "full"


def test_wikitext_saved_dataset_directory(tmp_path):
    lines = {"train": WIKITEXT_TRAIN.splitlines(keepends=True), "validation": WIKITEXT_VALID.splitlines(keepends=True)}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": rows}) for name, rows in lines.items()}) \
        .save_to_disk(str(tmp_path / "saved"))
    from_files = tmp_path / "raw"
    from_files.mkdir()
    _write_wikitext(from_files)

    saved = load_wikitext2(TOKENIZER, path=str(tmp_path / "saved"), block_size=8, num_train=5, num_test=3)
    raw = load_wikitext2(TOKENIZER, path=str(from_files), block_size=8, num_train=5, num_test=3)
    assert torch.equal(saved.train["input_ids"], raw.train["input_ids"])
    assert torch.equal(saved.test["input_ids"], raw.test["input_ids"])


def test_wikitext_too_few_tokens(tmp_path):
    _write_wikitext(tmp_path)
    with pytest.raises(ValueError, match="data.num_train=500 blocks of 8 tokens need 4000 tokens"):
        load_wikitext2(TOKENIZER, path=str(tmp_path), block_size=8, num_train=500, num_test=3)


@pytest.mark.parametrize("block_size, message", [(1, "data.block_size=1 must be at least 2"),
                                                  (2.5, "data.block_size=2.5 must be a whole number")])
def test_embedded_text_rejects_bad_block_size(block_size, message):
    with pytest.raises(ValueError, match=message):
        load_embedded_text({"name": "embedded_bpe", "vocab_size": 1024}, block_size=block_size)


def test_embedded_text_holds_out_topics():
    splits = load_embedded_text({"name": "embedded_bpe", "vocab_size": 1024})
    assert splits.train["input_ids"].shape == (128, 32)
    assert splits.test["input_ids"].shape == (32, 32)
    assert int(splits.train["input_ids"].max()) < 1024
    documents = len(pydoc_documents())
    assert splits.info["num_documents"] == {"train": documents - documents // 5, "test": documents // 5}
    assert splits.info["variant"] == "embedded"
    again = load_embedded_text({"name": "embedded_bpe", "vocab_size": 1024})
    assert torch.equal(splits.train["input_ids"], again.train["input_ids"])


def test_embedded_tokenizer_is_deterministic_and_lossless():
    first, second = train_embedded_tokenizer(400), train_embedded_tokenizer(400)
    assert len(first) == 400
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    text = "Summarize: Tom can't come — café at 5?\r\n"
    assert first.decode(first(text, add_special_tokens=False)["input_ids"]) == text


def test_alpaca_and_samsum_records_are_masked(tmp_path):
    alpaca = _write_json(tmp_path / "alpaca_data.json", ALPACA)
    samsum = _write_json(tmp_path / "test.json", SAMSUM)
    splits = load_alpaca_samsum(TOKENIZER, {"path": alpaca}, {"path": samsum}, num_train=3, num_test=2, max_length=512)
    tokenizer = load_tokenizer(TOKENIZER)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    prompts = [
        "### Instruction:\nName a color.\n\n### Response:\n",
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "### Instruction:\nGive the opposite.\n\n### Input:\nhot\n\n### Response:\n",
    ]
    for row, (prompt, record) in enumerate(zip(prompts, ALPACA)):
        context = [bos] + _tokens(tokenizer, [prompt])
        target = _tokens(tokenizer, [record["output"]]) + [eos]
        length = len(context) + len(target)
        width = splits.train["input_ids"].shape[1]
        assert splits.train["input_ids"][row].tolist() == context + target + [pad] * (width - length)
        assert splits.train["labels"][row].tolist() == [IGNORE_INDEX] * len(context) + target + [IGNORE_INDEX] * (width - length)
        assert splits.train["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)

    summary_prompt = DEFAULT_TEMPLATES["prompt"].format(
        instruction=DEFAULT_TEMPLATES["summary_instruction"], input=SAMSUM[1]["dialogue"])
    context = [bos] + _tokens(tokenizer, [summary_prompt])
    target = _tokens(tokenizer, [SAMSUM[1]["summary"]]) + [eos]
    labels = splits.test["labels"][1]
    assert labels[: len(context)].eq(IGNORE_INDEX).all()
    assert labels[len(context) : len(context) + len(target)].tolist() == target
    assert splits.info["variant"] == "full"


def test_alpaca_json_lines_and_first_records(tmp_path):
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps(record) + "\n" for record in ALPACA))
    samsum = _write_json(tmp_path / "test.json", SAMSUM)
    splits = load_alpaca_samsum(TOKENIZER, {"path": str(alpaca)}, {"path": samsum}, num_train=2, num_test=1)
    assert splits.num_train == 2
    assert splits.num_test == 1


def test_truncation_cuts_response_or_rejects(tmp_path):
    alpaca = _write_json(tmp_path / "alpaca_data.json", ALPACA)
    samsum = _write_json(tmp_path / "test.json", SAMSUM)
    tokenizer = load_tokenizer(TOKENIZER)
    prompt_tokens = 1 + len(_tokens(tokenizer, ["### Instruction:\nName a color.\n\n### Response:\n"]))
    long_enough = prompt_tokens + 2
    with pytest.raises(ValueError, match="data.samsum record 0: its prompt alone has"):
        load_alpaca_samsum(TOKENIZER, {"path": alpaca}, {"path": samsum}, num_train=1, num_test=2, max_length=long_enough)

    only_train = _write_json(tmp_path / "one.json", SAMSUM[:1] * 1)
    with pytest.raises(ValueError, match="raise data.max_length"):
        load_alpaca_samsum(TOKENIZER, {"path": alpaca}, {"path": only_train}, num_train=1, num_test=1,
                           max_length=prompt_tokens)


def test_response_cut_at_max_length(tmp_path):
    long_output = "Rain falls when droplets in a cloud grow heavy enough to fall. " * 4
    alpaca = _write_json(tmp_path / "alpaca_data.json", [{"instruction": "Explain rain.", "input": "", "output": long_output}])
    samsum = _write_json(tmp_path / "test.json", SAMSUM[:1])
    full = load_alpaca_samsum(TOKENIZER, {"path": alpaca}, {"path": samsum}, num_train=1, num_test=1)
    length = int(full.train["attention_mask"].sum())
    cut = load_alpaca_samsum(TOKENIZER, {"path": alpaca}, {"path": samsum}, num_train=1, num_test=1,
                             max_length=length - 2)
    assert cut.train["input_ids"].shape[1] == length - 2
    assert cut.train["input_ids"][0].tolist() == full.train["input_ids"][0, : length - 2].tolist()
    assert cut.info["train_tokens"]["truncated"] == 1


def test_too_few_records_and_missing_fields(tmp_path):
    alpaca = _write_json(tmp_path / "alpaca_data.json", ALPACA)
    samsum = _write_json(tmp_path / "test.json", SAMSUM)
    with pytest.raises(ValueError, match="data.num_train=10 exceeds the 3 records of data.alpaca"):
        load_alpaca_samsum(TOKENIZER, {"path": alpaca}, {"path": samsum}, num_train=10, num_test=1)
    wrong = _write_json(tmp_path / "wrong.json", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(ValueError, match=r"data.alpaca records lack the fields \['instruction', 'input', 'output'\]"):
        load_alpaca_samsum(TOKENIZER, {"path": wrong}, {"path": samsum}, num_train=1, num_test=1)


def test_embedded_fixture_has_real_record_formats():
    fixtures = Path(__file__).resolve().parent.parent / "attrbench" / "fixtures"
    alpaca = json.loads((fixtures / "alpaca_embedded.json").read_text())
    samsum = json.loads((fixtures / "samsum_embedded.json").read_text())
    assert all(set(record) == {"instruction", "input", "output"} for record in alpaca)
    assert all(set(record) == {"id", "summary", "dialogue"} for record in samsum)

    splits = load_embedded_sft({"name": "embedded_bpe", "vocab_size": 1024})
    assert splits.num_train == len(alpaca) == 64
    assert splits.num_test == len(samsum) == 16
    assert splits.info["variant"] == "embedded"
    assert splits.info["train_tokens"]["truncated"] == 0


def test_missing_wikitext_names_ways_out():
    with pytest.raises(SourceUnavailableError) as raised:
        load_wikitext2(TOKENIZER, block_size=8, num_train=1, num_test=1)
    message = str(raised.value)
    assert "'Salesforce/wikitext'" in message
    assert "network access" in message
    assert "data.path" in message
    assert "data=embedded_text model=tiny_gpt2" in message


def test_missing_alpaca_names_ways_out(tmp_path):
    samsum = _write_json(tmp_path / "test.json", SAMSUM)
    with pytest.raises(SourceUnavailableError) as raised:
        load_alpaca_samsum(TOKENIZER, {"name": "tatsu-lab/alpaca", "split": "train"}, {"path": samsum})
    message = str(raised.value)
    assert "'tatsu-lab/alpaca'" in message
    assert "data.alpaca.path" in message
    assert "data=embedded_sft model=tiny_llama" in message


def test_missing_samsum_names_ways_out(tmp_path):
    alpaca = _write_json(tmp_path / "alpaca_data.json", ALPACA)
    with pytest.raises(SourceUnavailableError, match="data.samsum.path"):
        load_alpaca_samsum(TOKENIZER, {"path": alpaca}, {"name": "knkarthick/samsum", "split": "test"}, num_train=1)


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path=.*does not exist"):
        load_wikitext2(TOKENIZER, path=str(tmp_path / "absent"))


def test_setting_configs_follow_protocol():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        gpt2 = compose("config", overrides=["setting=gpt2"])
        llama = compose("config", overrides=["setting=llama"])
    assert (gpt2.data.block_size, gpt2.data.num_train, gpt2.data.num_test) == (128, 512, 256)
    assert (gpt2.train.epochs, gpt2.train.batch_size, gpt2.optimizer.lr) == (3, 32, 1e-4)
    assert (list(gpt2.optimizer.betas), gpt2.optimizer.eps, gpt2.optimizer.weight_decay) == ([0.9, 0.999], 1e-8, 0.0)
    assert (gpt2.schedule.name, gpt2.schedule.warmup_ratio) == ("linear", 0.1)
    assert (gpt2.groundtruth.num_samples, gpt2.evaluation.num_scored) == (50, 64)
    assert (gpt2.model.name, gpt2.data.tokenizer.name) == ("gpt2", "gpt2")
    assert (llama.data.num_train, llama.data.num_test, llama.data.max_length, llama.train.epochs) == (512, 100, 512, 1)
    assert (llama.model.name, llama.dtype, gpt2.dtype) == ("meta-llama/Llama-3.2-1B", "float32", "float64")
    assert llama.optimizer.lr >= 5e-7
    assert dict(llama.data.templates) == DEFAULT_TEMPLATES
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        embedded = compose("config", overrides=["setting=llama", "data=embedded_sft", "model=tiny_llama"])
    assert dict(embedded.data.templates) == DEFAULT_TEMPLATES
    assert embedded.dtype == "float64"


def test_model_configs_set_memory_sizes():
    overrides = {"gpt2": ["setting=gpt2"], "tiny_gpt2": ["setting=gpt2", "data=embedded_text", "model=tiny_gpt2"],
                 "llama": ["setting=llama"], "tiny_llama": ["setting=llama", "data=embedded_sft", "model=tiny_llama"]}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        configs = {name: compose("config", overrides=values) for name, values in overrides.items()}
    sizes = {name: (cfg.train.micro_batch_size, cfg.groundtruth.chunk_size, cfg.influence.query_chunk_size,
                    cfg.trajectory.checkpoint_every, cfg.optimizer.lr) for name, cfg in configs.items()}
    assert sizes == {"gpt2": (4, 10, 8, 4, 1e-4), "tiny_gpt2": (None, 25, 16, 1, 1e-4),
                     "llama": (1, 4, 2, 2, 2e-6), "tiny_llama": (None, 16, 16, 1, 2e-6)}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        override = compose("config", overrides=["setting=gpt2", "train.micro_batch_size=2", "dtype=float32"])
    assert (override.train.micro_batch_size, override.dtype) == (2, "float32")
