"""What the lmms-eval tests of every model family share: optional packages, a tiny
LLaVA checkpoint on disk, easy-VQA documents as lmms-eval requests, a task folder and
lmms-eval's command line, and the batched == alone / score == loss checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


def need(name: str):
    """Skip when an optional package (the ``lmms`` extra, easy-vqa) cannot be imported,
    whether it is absent or installed but broken."""
    return pytest.importorskip(name, exc_type=ImportError)


def train_tokenizer(special: list[str], extra: list[str]):
    """A byte-level BPE tokenizer (400 ids) trained on easy-VQA questions and answers plus
    ``extra`` texts; ``special`` come first (``<pad>`` is id 0)."""
    easy_vqa = need("easy_vqa")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = easy_vqa.get_test_questions()[0][:1500] + easy_vqa.get_answers() + extra
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


GLM_SPECIAL = ["<pad>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|image|>", "<|end_of_image|>",
               "<|begin_of_video|>", "<|video|>", "<|end_of_video|>", "[gMASK]", "<sop>"]


def qwen_tiny_configs(tokenizer: Any) -> tuple[dict, dict]:
    """The vision and text settings of the tiny Qwen-VL-like checkpoints (4 px patches merged 2x2,
    a 6-layer M-RoPE language model over ``tokenizer``'s vocabulary), to adjust per family."""
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, in_channels=3)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    return vision, text


OMNI_SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",
           "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]


def build_omni(path: Path, family: str = "qwen2_5_omni") -> None:
    """A tiny random Qwen2.5-Omni or Qwen3-Omni thinker checkpoint with the Omni processor."""
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(OMNI_SPECIAL, ["user assistant system"])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
        extra_special_tokens={"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
                              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    )
    pixels = dict(min_pixels=32 * 32, max_pixels=32 * 32)
    size = {"shortest_edge": 32 * 32, "longest_edge": 32 * 32}
    image_processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, size=size,
                                                         **pixels)
    video_processor = transformers.Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                         cap_pixels_per_frame=False, size=size)
    name = "Qwen2_5Omni" if family == "qwen2_5_omni" else "Qwen3OmniMoe"
    processor = getattr(transformers, f"{name}Processor")(
        image_processor=image_processor, video_processor=video_processor,
        feature_extractor=transformers.WhisperFeatureExtractor(feature_size=8), tokenizer=tokenizer)
    processor.save_pretrained(path)
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|IMAGE|>"), ("video_token_id", "<|VIDEO|>"), ("audio_token_id", "<|AUDIO|>"),
        ("vision_start_token_id", "<|vision_bos|>"), ("audio_start_token_id", "<|audio_bos|>"))}
    vision, text = qwen_tiny_configs(tokenizer)
    audio = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=64, max_source_positions=1500)  # audio chunks of the default n_window fit
    torch.manual_seed(0)
    if family == "qwen2_5_omni":
        vision.update(window_size=16, fullatt_block_indexes=[1, 3])
        ids = {k.replace("_token_id", "_token_index") if k in ("image_token_id", "video_token_id", "audio_token_id")
               else k: v for k, v in ids.items()}
        config = transformers.Qwen2_5OmniThinkerConfig(vision_config=vision, text_config=text, audio_config=audio,
                                                       **ids)
    else:
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
        text.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        text["rope_parameters"]["mrope_interleaved"] = True
        config = transformers.Qwen3OmniMoeThinkerConfig(vision_config=vision, text_config=text,
                                                        audio_config=dict(audio, downsample_hidden_size=8), **ids)
    getattr(transformers, f"{name}ThinkerForConditionalGeneration")(config).save_pretrained(path)


def build_glm4v(path: Path, family: str = "glm4v") -> None:
    """A tiny GLM-4.1V (``family="glm_ocr"``: a GLM-OCR, with GLM-4.6V's processors as its
    checkpoints name them) with GLM's own image and video processors: 32 px images (8 x 8
    patches of 4 px, merged 2 x 2), videos of up to 4 frames of 32 px, a 6-layer LM with
    half-rotary M-RoPE."""
    transformers = pytest.importorskip("transformers")
    proc, name = ("Glm46V", "GlmOcr") if family == "glm_ocr" else ("Glm4v", "Glm4v")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(GLM_SPECIAL, ["user assistant system"]), pad_token="<pad>", eos_token="<|user|>")
    # GLM's resize counts both frames of a temporal patch: 2 x 32 x 32 pixels keeps an image at 32 px
    image_processor = getattr(transformers, f"{proc}ImageProcessor")(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 2 * 32 * 32})
    video_processor = getattr(transformers, f"{proc}VideoProcessor")(
        patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 32 * 32, "longest_edge": 4 * 32 * 32})
    getattr(transformers, f"{proc}Processor")(image_processor=image_processor, tokenizer=tokenizer,
                                              video_processor=video_processor).save_pretrained(path)
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token", "<|image|>"), ("video_token", "<|video|>"), ("image_start_token", "<|begin_of_image|>"),
        ("image_end_token", "<|end_of_image|>"), ("video_start_token", "<|begin_of_video|>"),
        ("video_end_token", "<|end_of_video|>"))}
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, in_channels=3, image_size=32)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                eos_token_id=tokenizer.eos_token_id,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2],
                                     partial_rotary_factor=0.5))
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(vision_config=vision, text_config=text, **ids)
    getattr(transformers, f"{name}ForConditionalGeneration")(config).save_pretrained(path)


def build_llava(path: Path) -> None:
    """A tiny random LLaVA (CLIP tower + Llama decoder) and an offline processor: a
    byte-level BPE tokenizer trained on easy-VQA questions, a CLIP image processor,
    and a LlavaProcessor, saved like a hub checkpoint."""
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(["<pad>", "<s>", "</s>", "<image>"], [
        "USER: ASSISTANT: A chat between a curious user and an artificial intelligence assistant. "
        "Answer with one word."])
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


def easy_vqa_docs(n: int) -> list[dict]:
    """The first ``n`` easy-VQA test questions with their answers and image paths."""
    easy_vqa = need("easy_vqa")
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [{"question": t, "answer": a, "image": paths[i]}
            for t, a, i in zip(texts[:n], answers[:n], image_ids[:n], strict=True)]


def sized_docs(sizes: list[tuple[int, int]]) -> list[dict]:
    """easy-VQA questions whose images are to be shown at ``sizes`` (PIL width, height)."""
    return [dict(d, size=s) for d, s in zip(easy_vqa_docs(len(sizes)), sizes, strict=True)]


def sized_image(doc: dict):
    """The document's image (RGB) at its ``size``, 64 x 64 without one."""
    from PIL import Image

    return Image.open(doc["image"]).convert("RGB").resize(tuple(doc.get("size", (64, 64))))


def visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(doc["image"])]


def requests(kind: str, items: list[tuple], task: str = "t"):
    from lmms_eval.api.instance import Instance

    return [Instance(kind, args, idx=0, metadata={"task": task, "doc_id": args[3 if kind != "generate_until_multi_round" else 4],
                                                   "repeats": 1}) for args in items]


def gen_requests(docs: list[dict], gen_kwargs: dict | None = None, visuals: Callable = visual):
    kw = gen_kwargs or {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}
    return requests("generate_until", [(d["question"], dict(kw), visuals, j, "t", "test") for j, d in enumerate(docs)])


def ll_requests(docs: list[dict], visuals: Callable = visual):
    items = [(d["question"], f" {c}", visuals, j, "t", "test") for j, d in enumerate(docs) for c in ("yes", "red")]
    return requests("loglikelihood", items)


def write_task(root: Path, docs_gen: list[dict], docs_mc: list[dict]) -> None:
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


def run_cli(model: str, model_dir: Path, prune_args: str, root: Path, n_docs: int, processes: int = 1,
            timeout: int = 600) -> tuple[dict, list[Path]]:
    """Run lmms-eval's CLI with ``--model model`` on the two easy-VQA tasks (``n_docs``
    documents each) in ``processes`` CPU processes (``accelerate launch``); returns the
    results and the stats files."""
    rows = easy_vqa_docs(60)
    task_dir = root / "tasks"
    task_dir.mkdir()
    write_task(task_dir, [r for r in rows if r["answer"] not in ("yes", "no")][:n_docs],
               [r for r in rows if r["answer"] in ("yes", "no")][:n_docs])
    return run_tasks(model, model_dir, prune_args, root, task_dir, "saint_easyvqa_gen,saint_easyvqa_mc", n_docs,
                     processes, timeout)


def run_tasks(model: str, model_dir: Path, prune_args: str, root: Path, task_dir: Path, tasks: str, n_docs: int,
              processes: int = 1, timeout: int = 600) -> tuple[dict, list[Path]]:
    """lmms-eval's CLI on ``tasks`` from ``task_dir`` (offline, CPU); the results and stats files."""
    stats, out = root / "stats.jsonl", root / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "hf"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="")
    launch = [sys.executable, "-m", "lmms_eval"]
    if processes > 1:  # accelerate's multi-process launcher; without GPUs each process runs on CPU (gloo)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "lmms_eval"]
    cmd = [*launch, "--model", model,
           "--model_args", f"pretrained={model_dir},{prune_args},stats_path={stats}",
           "--tasks", tasks, "--include_path", str(task_dir),
           "--limit", str(n_docs), "--batch_size", "2", "--device", "cpu", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = out.rglob("*_results.json")
    return json.loads(result_file.read_text())["results"], sorted(root.glob("stats*.jsonl"))


def make_lm(cls_name: str, model_dir: Path, prune_args: str, docs: list[dict]):
    """saint's lmms-eval model ``cls_name`` (a class of :mod:`saint.integrations.lmms_eval`
    or :mod:`saint.integrations.lmms_anyres`) built from a model-argument string, as
    lmms-eval builds it (batch size 3, CPU), serving ``docs`` as task ``t``."""
    need("lmms_eval")
    from saint.integrations import lmms_anyres, lmms_eval, lmms_glm, lmms_llm_side, lmms_omni

    modules = (lmms_eval, lmms_anyres, lmms_llm_side, lmms_glm, lmms_omni)
    cls = next(getattr(m, cls_name) for m in modules if hasattr(m, cls_name))
    model = cls.create_from_arg_string(
        f"pretrained={model_dir},{prune_args}", {"batch_size": 3, "device": "cpu", "max_batch_size": None})
    model.task_dict = {"t": {"test": docs}}
    return model


def assert_alone_equals_batched(lm, gen: list, ll: list, batched: tuple) -> None:
    """Every request run alone (batch size 1) gets what it got in its batch: the same
    generated text, the same log-likelihood (to 1e-4) and greedy flag."""
    size = lm.batch_size_per_gpu
    lm.batch_size_per_gpu = 1
    try:
        alone = (lm.generate_until(gen), lm.loglikelihood(ll))
    finally:
        lm.batch_size_per_gpu = size
    assert batched[0] == alone[0]
    for (nll_b, greedy_b), (nll_a, greedy_a) in zip(batched[1], alone[1], strict=True):
        assert nll_b == pytest.approx(nll_a, abs=1e-4) and greedy_b == greedy_a


def continuation_loss(lm, ids: list[int], n: int, media: dict, mask: bool = False) -> float:
    """The patched model's own loss over the last ``n`` tokens of prompt ``ids`` (``mask``: with an
    all-ones attention mask, which the Omni thinkers need for their M-RoPE positions)."""
    labels = torch.full((1, len(ids)), -100)
    labels[0, -n:] = torch.tensor(ids[-n:])
    input_ids = torch.tensor([ids])
    extra = {"attention_mask": torch.ones_like(input_ids)} if mask else {}
    with torch.no_grad():
        return float(lm.model(input_ids=input_ids, labels=labels, **media, **extra,
                              **lm._row_inputs(input_ids, [n])).loss)


def built_once(tmp_path_factory: Any, build: Callable[[Path, str], None]) -> Callable[[str], Path]:
    """``get(family)``: the folder of a tiny checkpoint of that family, made by ``build``
    on first use and reused after (for module-scoped fixtures)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tmp_path_factory.mktemp(f"tiny_{family}")
            build(built[family], family)
        return built[family]

    return get



def family_fixtures(build: Callable[[Path, str], None], families: Any, sizes: list) -> tuple[Any, Any, Any]:
    """The module-scoped fixtures of an lmms-eval test module over several families:
    ``checkpoint`` (``checkpoint(family)``: a tiny checkpoint made by ``build``, once per
    family), ``family`` (each of ``families`` in turn) and ``docs`` (easy-VQA questions
    with their images resized to ``sizes``). Assign them to module names of the same names."""

    @pytest.fixture(scope="module")
    def checkpoint(tmp_path_factory, one_thread):
        return built_once(tmp_path_factory, build)

    @pytest.fixture(scope="module", params=list(families))
    def family(request) -> str:
        return request.param

    @pytest.fixture(scope="module")
    def docs() -> list[dict]:
        return sized_docs(sizes)

    return checkpoint, family, docs


def direct_generation(lm, question: str, images: list) -> str:
    """What ``lm``'s model generates (4 greedy tokens) for ``question`` behind its image
    token, in its chat template (PaliGemma: as its processor lays the prompt out), from the
    processor's own output: the reference a
    ``generate_until`` request must reproduce."""
    if lm.NAME == "saint_paligemma":  # no chat template: the processor lays out image, <bos>, text itself
        prompt = question
    else:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": lm.image_token + "\n" + question}],
                                                  chat_template=lm.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
    enc = lm.processor(text=[prompt], images=images, return_tensors="pt")
    enc.pop("labels", None)  # PaliGemma's processor adds its training labels
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                                eos_token_id=lm.eot_token_id)
    return lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def assert_same_results(lms: dict, gen: list, ll: list, texts: list, scores: list) -> None:
    """Every model of ``{args: lm}`` generates ``texts``, scores ``scores`` and logged its pruning."""
    for args, lm in lms.items():
        assert lm.generate_until(gen) == texts, args
        assert [tuple(s) for s in lm.loglikelihood(ll)] == [tuple(s) for s in scores], args
        assert lm.pruning_log and all("llm_input" in e for e in lm.pruning_log)
