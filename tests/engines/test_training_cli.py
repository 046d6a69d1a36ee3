"""`orthrus gen-data`, `orthrus train` and `orthrus eval` end to end on a tiny model that carries the
built-in tokenizer (so chat prompts work): the files each writes, and errors that name the field."""

import json

import pytest

from orthrus_engines.cli import main

PROMPTS = ["Write a haiku about tea.", "What is 7 times 8?", "Explain gravity.", "Write a Python function that adds."]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("cli")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return d


def test_gen_data_train_eval(workdir, tiny_model_dir, capsys):
    data = workdir / "self.jsonl"
    assert main(["gen-data", "--model", str(tiny_model_dir), "--prompts", str(workdir / "prompts.txt"),
                 "--out", str(data), "--max-tokens", "24", "--samples-per-prompt", "2", "--temperature", "0.8"]) == 0
    samples = [json.loads(x) for x in data.read_text().splitlines()]
    assert len(samples) == 8 and all(s["prompt_ids"] and s["output_ids"] for s in samples)

    run = workdir / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(run), "--rank", "0",
                 "--block-size", "4", "--anchors", "4", "--seq-len", "32", "--steps", "4", "--save-every", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    assert {"checkpoint.pt", "head.safetensors", "train_log.jsonl"} <= {p.name for p in run.iterdir()}

    report, plot = workdir / "report.json", workdir / "acc.png"
    assert main(["eval", "--model", str(tiny_model_dir), "--head", str(run / "head.safetensors"), "--prompts",
                 str(workdir / "prompts.txt"), "--max-tokens", "16", "--temperature", "0", "--temperature", "0.7",
                 "--out", str(report), "--plot", str(plot)]) == 0
    r = json.loads(report.read_text())["reports"]
    assert set(r) == {"T=0", "T=0.7"}
    greedy = r["T=0"]
    assert greedy["block_size"] == 4 and greedy["prompts"] == 4 and greedy["cycles"] > 0
    assert greedy["tpf"] == pytest.approx(greedy["output_tokens"] / greedy["forward_passes"])
    assert len(greedy["acceptance_by_position"]) == 3
    assert all(0 <= x <= 1 for x in greedy["acceptance_by_position"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TPF" in capsys.readouterr().out


@pytest.mark.parametrize("argv, field", [
    (["gen-data", "--prompts", "/nonexistent.txt", "--out", "x.jsonl"], "prompts"),
    (["gen-data", "--samples-per-prompt", "3", "--out", "x.jsonl"], "samples_per_prompt"),
    (["train", "--data", "/nonexistent", "--out", "r", "--rank", "0"], "data"),
    (["train", "--data", "x.jsonl", "--out", "r", "--block-size", "1"], "block_size"),
    (["eval", "--head", "/nonexistent.safetensors"], "head"),
])
def test_bad_arguments_name_the_field(workdir, tiny_model_dir, capsys, monkeypatch, argv, field):
    monkeypatch.chdir(workdir)
    argv = argv[:1] + ["--model", str(tiny_model_dir)] + argv[1:]
    assert main(argv) == 2
    assert field in capsys.readouterr().err


def test_record_prior_stores_acceptance_in_the_head(workdir, tiny_model_dir):
    from orthrus_engines import LLM
    from orthrus_engines.models.heads import read_head_metadata

    head = workdir / "run" / "head.safetensors"  # written by test_gen_data_train_eval
    assert main(["eval", "--model", str(tiny_model_dir), "--head", str(head), "--prompts", str(workdir / "prompts.txt"),
                 "--max-tokens", "8", "--record-prior", "--plot", str(workdir / "both.png"),
                 "--plot-with", str(workdir / "report.json"), "--label", "again"]) == 0
    assert (workdir / "both.png").read_bytes()[:4] == b"\x89PNG"
    prior = read_head_metadata(head)["acceptance_by_position"]
    assert len(prior) == 3 and all(0 <= x <= 1 for x in prior)
    eng = LLM(str(tiny_model_dir), head=str(head)).core
    assert eng.policy is not None and eng.acceptance.rates()[0] == pytest.approx(min(1.0, prior[0]), abs=1e-3)
