"""lmms-eval integration: model-argument parsing (always), and with the ``lmms`` extra
(lmms-eval + easy-vqa) the ``saint_llava`` model on a tiny random LLaVA saved to disk
with an offline processor, driven through fake requests and through lmms-eval's own
command line on a small easy-VQA task written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saint.integrations import parse_prune_settings

# the exact model arguments of the command-line run (strings, as a user types them)
PRUNE_ARGS = "mode=hybrid,vit_keep=30,vit_layer=1,llm_layers=0-3,llm_tau=0.3/0.3/0.3/0.2,llm_k=2"
N_IMAGE_TOKENS = 64  # 32 px images, 4 px patches, CLS dropped ("default" strategy)


def _need(name: str):
    """Skip when an optional package (the ``lmms`` extra, easy-vqa) cannot be imported,
    whether it is absent or installed but broken."""
    return pytest.importorskip(name, exc_type=ImportError)


# ---------------------------------------------------------------------------- parsing
def test_parse_prune_settings_strings():
    got = parse_prune_settings({
        "mode": "hybrid", "vit_keep": 375, "llm_layers": "7-16", "llm_tau": "0.8/0.8/0.7",
        "llm_k": "7#4/8#6", "llm_gamma": 10.0, "llm_rope_keys": False, "llm_rate": "batch",
    })
    assert got == {"mode": "hybrid", "vit_keep": 375, "llm_layers": (7, 16), "llm_tau": [0.8, 0.8, 0.7],
                   "llm_k": {7: 4, 8: 6}, "llm_gamma": 10.0, "llm_rope_keys": False, "llm_rate": "batch"}
    for text in ("7-16", "7:16", "7..16", "7/16", " 7 - 16 "):
        assert parse_prune_settings({"llm_layers": text}) == {"llm_layers": (7, 16)}
    assert parse_prune_settings({"llm_layers": [3, 5]}) == {"llm_layers": (3, 5)}
    assert parse_prune_settings({"visual_keep": "12x12"}) == {"visual_keep": (12, 12)}
    assert parse_prune_settings({"visual_keep": "6/8"}) == {"visual_keep": (6, 8)}
    assert parse_prune_settings({"visual_keep": 144}) == {"visual_keep": 144}


@pytest.mark.parametrize("bad", [{"llm_layers": "7"}, {"llm_layers": "7-"}, {"llm_layers": 7},
                                 {"llm_tau": "0.8//0.7"}, {"llm_k": "7#4/5"}])
def test_parse_prune_settings_refuses_malformed(bad):
    with pytest.raises(ValueError):
        parse_prune_settings(bad)


# ---------------------------------------------------------------------------- tiny LLaVA on disk
def _build_llava(path: Path) -> None:
    """A tiny random LLaVA (CLIP tower + Llama decoder) and an offline processor: a
    byte-level BPE tokenizer trained on easy-VQA questions, a CLIP image processor,
    and a LlavaProcessor, saved like a hub checkpoint."""
    easy_vqa = _need("easy_vqa")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    questions = easy_vqa.get_test_questions()[0][:1500]
    corpus = questions + easy_vqa.get_answers() + ["USER: ASSISTANT: A chat between a curious user and an "
                                                   "artificial intelligence assistant. Answer with one word."]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=4,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=2, image_size=32, patch_size=4)
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    transformers.LlavaForConditionalGeneration(config).save_pretrained(path)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("tiny_llava")
    _build_llava(path)
    return path


def _easy_vqa(n: int) -> list[dict]:
    """The first ``n`` easy-VQA test questions with their answers and image paths."""
    easy_vqa = _need("easy_vqa")
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [{"question": t, "answer": a, "image": paths[i]}
            for t, a, i in zip(texts[:n], answers[:n], image_ids[:n], strict=True)]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    """easy-VQA questions of different lengths with the paths of their images."""
    return _easy_vqa(5)


def _visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(doc["image"])]


def _requests(kind: str, items: list[tuple], task: str = "t"):
    from lmms_eval.api.instance import Instance

    return [Instance(kind, args, idx=0, metadata={"task": task, "doc_id": args[3 if kind != "generate_until_multi_round" else 4],
                                                   "repeats": 1}) for args in items]


@pytest.fixture(scope="module")
def lm(llava_dir, docs):
    """saint_llava built from a model-argument string, as lmms-eval builds it."""
    _need("lmms_eval")
    from saint.integrations.lmms_eval import SaintLlava

    model = SaintLlava.create_from_arg_string(f"pretrained={llava_dir},{PRUNE_ARGS}",
                                              {"batch_size": 3, "device": "cpu", "max_batch_size": None})
    model.task_dict = {"t": {"test": docs}}
    return model


def _gen_requests(docs: list[dict], gen_kwargs: dict | None = None):
    kw = gen_kwargs or {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}
    return _requests("generate_until", [(d["question"], dict(kw), _visual, j, "t", "test") for j, d in enumerate(docs)])


def _ll_requests(docs: list[dict]):
    items = [(d["question"], f" {c}", _visual, j, "t", "test") for j, d in enumerate(docs) for c in ("yes", "red")]
    return _requests("loglikelihood", items)


# ---------------------------------------------------------------------------- the model class
def test_entry_point_resolves_saint_llava():
    _need("lmms_eval")
    from importlib.metadata import entry_points

    import lmms_eval.models

    from saint.integrations.lmms_eval import SaintLlava

    eps = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert eps.get("saint_llava") == "saint.integrations:lmms_eval_models", (
        "entry point missing: reinstall saint (pip install -e .) so its metadata lists it")
    assert lmms_eval.models.get_model("saint_llava") is SaintLlava


def test_settings_parsed_and_patched_once(lm):
    import saint
    from saint.adapters.common import get_handle

    handle = get_handle(lm.model)
    cfg = handle.config
    assert (cfg.method, cfg.mode, cfg.vit_keep, cfg.vit_layer) == ("saint", "hybrid", 30, 1)
    assert cfg.llm_layers == (0, 3) and cfg.llm_tau == [0.3, 0.3, 0.3, 0.2] and cfg.llm_k == 2
    assert cfg.llm_gamma == 10.0 and cfg.llm_rate == "sample"  # untouched reference defaults
    assert lm.batch_size == 3 and lm.device.type == "cpu"
    lm.generate_until(_gen_requests(lm.task_dict["t"]["test"][:2]))
    lm.loglikelihood(_ll_requests(lm.task_dict["t"]["test"][:1]))
    assert get_handle(lm.model) is handle and saint.is_patched(lm.model)  # never re-patched


def test_bad_settings_refused_before_loading(tmp_path):
    _need("lmms_eval")
    transformers = pytest.importorskip("transformers")
    from saint.integrations.lmms_eval import SaintLlava

    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(TypeError, match="llm_tauu"):
        SaintLlava(pretrained=missing, llm_tauu=0.5)
    with pytest.raises(TypeError, match="does not use"):
        SaintLlava(pretrained=missing, mode="vit", llm_tau=0.5)
    with pytest.raises(TypeError, match="unpruned"):
        SaintLlava(pretrained=missing, method="none", vit_keep=10)
    with pytest.raises(ValueError, match="batch size"):
        SaintLlava(pretrained=missing, batch_size="auto")
    transformers.LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8,
                             num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llava'"):
        SaintLlava(pretrained=str(tmp_path))


def test_both_request_kinds_are_pruned(lm, docs):
    lm.pruning_log.clear()
    lm.generate_until(_gen_requests(docs))
    lm.loglikelihood(_ll_requests(docs))
    kinds = {e["request"] for e in lm.pruning_log}
    assert kinds == {"generate_until", "loglikelihood"}
    for e in lm.pruning_log:
        assert e["image_tokens"] == [N_IMAGE_TOKENS] * len(e["image_tokens"])
        assert e["llm_input"] == [30] * len(e["image_tokens"])  # vision tower: 64 -> 30 patches
        assert all(o < 30 for o in e["llm_output"])  # SAINT inside the language model
    summary = lm.pruning_summary()
    assert summary["generate_until"]["samples"] == len(docs)
    assert summary["loglikelihood"]["samples"] == 2 * len(docs)
    assert summary["loglikelihood"]["llm_input"] == 30.0


def test_batched_equals_one_by_one(lm, docs):
    """Left-padded batches of prompts of different lengths give each request what it
    gets alone (per-sample SAINT rates), for generation and log-likelihood."""
    gen, ll = _gen_requests(docs), _ll_requests(docs)
    assert lm.batch_size == 3
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    lm.batch_size_per_gpu = 1
    try:
        alone = (lm.generate_until(gen), lm.loglikelihood(ll))
    finally:
        lm.batch_size_per_gpu = 3
    assert batched[0] == alone[0]
    for (nll_b, greedy_b), (nll_a, greedy_a) in zip(batched[1], alone[1], strict=True):
        assert nll_b == pytest.approx(nll_a, abs=1e-4) and greedy_b == greedy_a


def test_loglikelihood_is_the_patched_models_loss(lm, docs):
    """The score is the patched model's own loss over exactly the continuation tokens."""
    from lmms_eval.api.instance import unwrap_generation_output

    req = _ll_requests(docs[:1])[0]
    (result,) = lm.loglikelihood([req])
    assert unwrap_generation_output(result)[0] == tuple(result)  # survives lmms-eval's evaluator
    ids, n, media = lm._loglikelihood_row(req)
    assert lm.tokenizer.decode(ids[-n:]) == " yes"
    labels = torch.full((1, len(ids)), -100)
    labels[0, -n:] = torch.tensor(ids[-n:])
    with torch.no_grad():
        loss = lm.model(input_ids=torch.tensor([ids]), labels=labels, **media).loss
    assert result[0] == pytest.approx(float(loss), abs=1e-5)
    assert lm.pruning_log[-1]["llm_input"] == [30]  # that forward was pruned too


def test_pruning_changes_scores_and_none_is_unpatched(lm, llava_dir, docs):
    import saint
    from saint.integrations.lmms_eval import SaintLlava

    base = SaintLlava(pretrained=str(llava_dir), method="none", device="cpu", batch_size=3)
    base.task_dict = lm.task_dict
    assert not saint.is_patched(base.model)
    ll = _ll_requests(docs)
    pruned, plain = lm.loglikelihood(ll), base.loglikelihood(ll)
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(pruned, plain, strict=True))
    assert all("llm_input" not in e for e in base.pruning_log)  # image tokens only: nothing pruned


def test_until_cuts_generation(lm, docs):
    free = lm.generate_until(_gen_requests(docs[:2], {"max_new_tokens": 8, "temperature": 0}))
    text = free[0]
    assert len(text) >= 4, f"tiny model generated too little to test stop strings: {text!r}"
    stop = text[2:4]
    cut = lm.generate_until(_gen_requests(docs[:2], {"max_new_tokens": 8, "temperature": 0, "until": [stop]}))
    assert cut == [t.split(stop)[0] for t in free]


def test_multi_round(lm, docs):
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return _visual(doc), "and the shape?", False, previous_output, {"round": round_idx}

    gen_kwargs = {"max_new_tokens": 3, "temperature": 0}
    reqs = _requests("generate_until_multi_round",
                     [(docs[0]["question"], gen_kwargs, _visual, doc_to_text, 0, "t", "test")])
    (rounds,) = lm.generate_until_multi_round(reqs)
    assert len(rounds) == 2 and all(isinstance(r, str) for r in rounds)
    assert rounds[0] == lm.generate_until(_gen_requests(docs[:1], dict(gen_kwargs)))[0]
    assert calls == [(1, [rounds[0]], None), (2, rounds, {"round": 1})]


# ---------------------------------------------------------------------------- lmms-eval's CLI
def _write_task(root: Path, docs_gen: list[dict], docs_mc: list[dict]) -> None:
    """Two lmms-eval tasks on local easy-VQA data: open answers (exact match) and
    yes/no multiple choice (log-likelihood)."""
    for name, rows in (("gen", docs_gen), ("mc", docs_mc)):
        with open(root / f"{name}.jsonl", "w") as f:
            for d in rows:
                f.write(json.dumps(d) + "\n")
    (root / "easyvqa_utils.py").write_text(
        "from PIL import Image\n\n\n"
        "def doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n"
        "    return doc['question'] + '\\nAnswer the question using a single word.'\n"
    )
    for name, body in (
        ("gen", "output_type: generate_until\ngeneration_kwargs:\n  max_new_tokens: 4\n  temperature: 0\n"
                "  until: [\"\\n\"]\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                "    higher_is_better: true\n"),
        ("mc", "output_type: multiple_choice\ndoc_to_choice: [\"yes\", \"no\"]\nmetric_list:\n  - metric: acc\n"
               "    aggregation: mean\n    higher_is_better: true\n"),
    ):
        (root / f"saint_easyvqa_{name}.yaml").write_text(
            f"task: saint_easyvqa_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {root / (name + '.jsonl')}\ntest_split: test\n"
            "doc_to_visual: !function easyvqa_utils.doc_to_visual\ndoc_to_text: !function easyvqa_utils.doc_to_text\n"
            "doc_to_target: answer\nmetadata:\n  - version: 0.0\n" + body
        )


def _run_cli(llava_dir: Path, root: Path, processes: int = 1) -> tuple[dict, list[Path]]:
    """Run lmms-eval's CLI on the two easy-VQA tasks (4 documents each) in ``processes``
    CPU processes (``accelerate launch``); returns the results and the stats files."""
    rows = _easy_vqa(60)
    task_dir = root / "tasks"
    task_dir.mkdir()
    _write_task(task_dir, [r for r in rows if r["answer"] not in ("yes", "no")][:4],
                [r for r in rows if r["answer"] in ("yes", "no")][:4])
    stats, out = root / "stats.jsonl", root / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:  # accelerate's multi-process launcher; without GPUs each process runs on CPU (gloo)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "lmms_eval"]
    cmd = [*launch, "--model", "saint_llava",
           "--model_args", f"pretrained={llava_dir},{PRUNE_ARGS},stats_path={stats}",
           "--tasks", "saint_easyvqa_gen,saint_easyvqa_mc", "--include_path", str(task_dir),
           "--limit", "4", "--batch_size", "2", "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = out.rglob("*_results.json")
    return json.loads(result_file.read_text())["results"], sorted(root.glob("stats*.jsonl"))


@pytest.fixture(scope="module")
def single_process_run(llava_dir, tmp_path_factory):
    _need("lmms_eval")
    return _run_cli(llava_dir, tmp_path_factory.mktemp("lmms_single"))


def test_lmms_eval_cli_end_to_end(single_process_run):
    """``python -m lmms_eval --model saint_llava ...`` with ``--include_path``: the run
    completes, reports exact_match and acc, and the stats file shows both kinds of
    request pruned (64 -> 30 patches in the tower, fewer again inside the LLM)."""
    results, stats_files = single_process_run
    assert [p.name for p in stats_files] == ["stats.jsonl"]
    stats = stats_files[0]
    assert 0.0 <= results["saint_easyvqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["saint_easyvqa_mc"]["acc,none"] <= 1.0
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    summary = lines[-1]["summary"]
    assert summary["settings"]["llm_layers"] == [0, 3] and summary["settings"]["llm_tau"] == [0.3, 0.3, 0.3, 0.2]
    assert summary["generate_until"]["samples"] == 4 and summary["loglikelihood"]["samples"] == 8
    for kind in ("generate_until", "loglikelihood"):
        s = summary[kind]
        assert s["image_tokens"] == N_IMAGE_TOKENS and s["llm_input"] == 30 and s["llm_output"] < 30
    assert max(len(e["image_tokens"]) for e in lines[:-1]) == 2  # batches of two
    first = lines[0]
    assert first["rank"] == 0 and first["blocks"][0] == "vision_tower" and len(first["tokens"]) == len(first["blocks"])


def test_lmms_eval_data_parallel_shards_the_documents(llava_dir, single_process_run, tmp_path):
    """Two processes (``accelerate launch``): each rank writes its own stats file and
    evaluates a disjoint share of the documents (together exactly the single run's), and
    the aggregated metrics equal the single-process run."""
    results, stats_files = _run_cli(llava_dir, tmp_path, processes=2)
    single, _ = single_process_run
    for task, metric in (("saint_easyvqa_gen", "exact_match,none"), ("saint_easyvqa_mc", "acc,none")):
        assert results[task][metric] == single[task][metric]
    assert [p.name for p in stats_files] == ["stats.rank0.jsonl", "stats.rank1.jsonl"]
    summaries = []
    for rank, path in enumerate(stats_files):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert {line["rank"] for line in lines} == {rank}
        summaries.append(lines[-1]["summary"])
    for kind, total in (("generate_until", 4), ("loglikelihood", 8)):  # 4 + 4 documents, two choices each
        per_rank = [s[kind]["samples"] for s in summaries]
        assert per_rank == [total // 2, total // 2], per_rank  # an even split: lmms-eval pads no rank
