"""lmms-eval integration: model-argument parsing (always), and with the ``lmms`` extra
(lmms-eval + easy-vqa) the ``saint_llava`` model on a tiny random LLaVA saved to disk
with an offline processor, driven through fake requests and through lmms-eval's own
command line on a small easy-VQA task written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from saint.integrations import parse_prune_settings

from .lmms_helpers import (
    assert_alone_equals_batched,
    build_llava,
    continuation_loss,
    easy_vqa_docs,
    gen_requests,
    ll_requests,
    make_lm,
    need,
    requests,
    run_cli,
    visual,
)

# the exact model arguments of the command-line run (strings, as a user types them)
PRUNE_ARGS = "mode=hybrid,vit_keep=30,vit_layer=1,llm_layers=0-3,llm_tau=0.3/0.3/0.3/0.2,llm_k=2"
N_IMAGE_TOKENS = 64  # 32 px images, 4 px patches, CLS dropped ("default" strategy)


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
    # lmms-eval's parser hands a negative integer over as a float: a whole seed is an integer again
    assert parse_prune_settings({"seed": -1.0}) == {"seed": -1} and type(parse_prune_settings({"seed": -1.0})["seed"]) is int
    assert parse_prune_settings({"seed": 0.5}) == {"seed": 0.5}  # refused later, as not an integer


@pytest.mark.parametrize("bad", [{"llm_layers": "7"}, {"llm_layers": "7-"}, {"llm_layers": 7},
                                 {"llm_tau": "0.8//0.7"}, {"llm_k": "7#4/5"}])
def test_parse_prune_settings_refuses_malformed(bad):
    with pytest.raises(ValueError):
        parse_prune_settings(bad)


# ---------------------------------------------------------------------------- tiny LLaVA on disk
@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, one_thread) -> Path:
    path = tmp_path_factory.mktemp("tiny_llava")
    build_llava(path)
    return path


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    """easy-VQA questions of different lengths with the paths of their images."""
    return easy_vqa_docs(5)


@pytest.fixture(scope="module")
def lm(llava_dir, docs):
    """saint_llava built from a model-argument string, as lmms-eval builds it."""
    return make_lm("SaintLlava", llava_dir, PRUNE_ARGS, docs)


# ---------------------------------------------------------------------------- the model class
def test_entry_point_resolves_saint_llava():
    need("lmms_eval")
    from importlib.metadata import entry_points

    import lmms_eval.models

    from saint.integrations.lmms_eval import SaintLlava

    eps = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert eps.get("saint_llava") == "saint.integrations:lmms_eval_models", (
        "entry point missing: reinstall saint (pip install -e .) so its metadata lists it")
    assert lmms_eval.models.get_model("saint_llava") is SaintLlava


def test_every_registered_model_resolves_to_its_class():
    """Each name of the entry point's table resolves, through lmms-eval's registry, to the
    class that carries that name."""
    need("lmms_eval")
    import lmms_eval.models

    from saint.integrations import LMMS_MODELS

    for name in LMMS_MODELS:
        assert lmms_eval.models.get_model(name).NAME == name


def test_settings_parsed_and_patched_once(lm):
    import saint
    from saint.adapters.common import get_handle

    handle = get_handle(lm.model)
    cfg = handle.config
    assert (cfg.method, cfg.mode, cfg.vit_keep, cfg.vit_layer) == ("saint", "hybrid", 30, 1)
    assert cfg.llm_layers == (0, 3) and cfg.llm_tau == [0.3, 0.3, 0.3, 0.2] and cfg.llm_k == 2
    assert cfg.llm_gamma == 10.0 and cfg.llm_rate == "sample"  # untouched reference defaults
    assert lm.batch_size == 3 and lm.device.type == "cpu"
    lm.generate_until(gen_requests(lm.task_dict["t"]["test"][:2]))
    lm.loglikelihood(ll_requests(lm.task_dict["t"]["test"][:1]))
    assert get_handle(lm.model) is handle and saint.is_patched(lm.model)  # never re-patched


def test_bad_settings_refused_before_loading(tmp_path):
    need("lmms_eval")
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
    lm.generate_until(gen_requests(docs))
    lm.loglikelihood(ll_requests(docs))
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


def test_beam_search_logs_one_value_per_request(lm, docs):
    """With ``num_beams`` generate repeats each request's row per beam: the log still has
    one ``llm_input`` / ``llm_output`` per request, lined up with ``image_tokens`` (it had
    one per beam row, so value i was not request i)."""
    lm.pruning_log.clear()
    lm.generate_until(gen_requests(docs, {"max_new_tokens": 2, "num_beams": 2}))
    assert sum(len(e["image_tokens"]) for e in lm.pruning_log) == len(docs)
    for e in lm.pruning_log:
        assert len(e["llm_input"]) == len(e["llm_output"]) == len(e["image_tokens"])


def test_batched_equals_one_by_one(lm, docs):
    """Left-padded batches of prompts of different lengths give each request what it
    gets alone (per-sample SAINT rates), for generation and log-likelihood."""
    gen, ll = gen_requests(docs), ll_requests(docs)
    assert lm.batch_size == 3
    batched = (lm.generate_until(gen), lm.loglikelihood(ll))
    assert_alone_equals_batched(lm, gen, ll, batched)


def test_loglikelihood_is_the_patched_models_loss(lm, docs):
    """The score is the patched model's own loss over exactly the continuation tokens."""
    from lmms_eval.api.instance import unwrap_generation_output

    req = ll_requests(docs[:1])[0]
    (result,) = lm.loglikelihood([req])
    assert unwrap_generation_output(result)[0] == tuple(result)  # survives lmms-eval's evaluator
    ids, n, media = lm._loglikelihood_row(req)
    assert lm.tokenizer.decode(ids[-n:]) == " yes"
    assert result[0] == pytest.approx(continuation_loss(lm, ids, n, media), abs=1e-5)
    assert lm.pruning_log[-1]["llm_input"] == [30]  # that forward was pruned too


def test_pruning_changes_scores_and_none_is_unpatched(lm, llava_dir, docs):
    import saint
    from saint.integrations.lmms_eval import SaintLlava

    base = SaintLlava(pretrained=str(llava_dir), method="none", device="cpu", batch_size=3)
    base.task_dict = lm.task_dict
    assert not saint.is_patched(base.model)
    ll = ll_requests(docs)
    pruned, plain = lm.loglikelihood(ll), base.loglikelihood(ll)
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(pruned, plain, strict=True))
    assert all("llm_input" not in e for e in base.pruning_log)  # image tokens only: nothing pruned


def test_until_cuts_generation(lm, docs):
    free = lm.generate_until(gen_requests(docs[:2], {"max_new_tokens": 8, "temperature": 0}))
    text = free[0]
    assert len(text) >= 4, f"tiny model generated too little to test stop strings: {text!r}"
    stop = text[2:4]
    cut = lm.generate_until(gen_requests(docs[:2], {"max_new_tokens": 8, "temperature": 0, "until": [stop]}))
    assert cut == [t.split(stop)[0] for t in free]


def test_multi_round(lm, docs):
    calls = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        calls.append((round_idx, list(previous_output), previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return visual(doc), "and the shape?", False, previous_output, {"round": round_idx}

    gen_kwargs = {"max_new_tokens": 3, "temperature": 0}
    reqs = requests("generate_until_multi_round",
                     [(docs[0]["question"], gen_kwargs, visual, doc_to_text, 0, "t", "test")])
    (rounds,) = lm.generate_until_multi_round(reqs)
    assert len(rounds) == 2 and all(isinstance(r, str) for r in rounds)
    assert rounds[0] == lm.generate_until(gen_requests(docs[:1], dict(gen_kwargs)))[0]
    assert calls == [(1, [rounds[0]], None), (2, rounds, {"round": 1})]


# ---------------------------------------------------------------------------- lmms-eval's CLI
@pytest.fixture(scope="module")
def single_process_run(llava_dir, tmp_path_factory):
    need("lmms_eval")
    return run_cli("saint_llava", llava_dir, PRUNE_ARGS, tmp_path_factory.mktemp("lmms_single"), 4)


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
    results, stats_files = run_cli("saint_llava", llava_dir, PRUNE_ARGS, tmp_path, 4, processes=2)
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
