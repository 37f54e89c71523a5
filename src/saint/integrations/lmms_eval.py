"""lmms-eval model ``saint_llava``: a Hugging Face LLaVA (``LlavaForConditionalGeneration``)
pruned by :func:`saint.patch`, for any lmms-eval image task::

    python -m lmms_eval --model saint_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,mode=hybrid,vit_keep=375,llm_layers=7-16,llm_tau=0.83 \\
        --tasks mme --batch_size 8

Registered through the ``lmms_eval.models`` entry-point group (see
:func:`saint.integrations.lmms_eval_models`), so lmms-eval is used as installed.
Every setting of the LLaVA adapter is a model argument (``method``, ``mode``,
``vit_keep``, ``vit_layer``, ``vit_step_div``, ``llm_layers``, ``llm_tau``, ``llm_k``,
``llm_gamma``, ``llm_rate``, ``llm_rope_keys``, ``fastv_layer``, ``fastv_ratio``,
``visual_keep``, ``seed``); what is not given keeps the adapter's reference default,
and ``method=none`` evaluates the same checkpoint unpruned through the same code.
The model is patched once, at load; generation and log-likelihood requests both run
through the patched model, in batches of ``batch_size`` (left padding).

Prompts follow lmms-eval's ``llava_hf`` model: ``<image>`` tokens are put in front of
the question when the task's text has none, then the chat template is applied
(``chat_template=`` argument, else the tokenizer's, else LLaVA-1.5's Vicuna format).
Log-likelihood requests score exactly the continuation's tokens after the prompt and
return, as lmms-eval's LLaVA models do (its multiple-choice scoring takes the
smallest), the mean negative log-likelihood per continuation token and whether greedy
decoding would produce the continuation. Unlike ``llava_hf`` this class batches,
honours ``until`` stop strings, needs no video reader, and implements multi-round
generation.

``stats_path=FILE`` appends one JSON line per forward that carried images (image
tokens per prompt from the processor, visual tokens handed to the language model and
left after each decoder layer, per sample) and a summary line when lmms-eval
finishes; :meth:`SaintLlava.pruning_summary` gives the same summary.

Data parallel (``accelerate launch --num_processes N -m lmms_eval ...``): each process
holds one model and takes its rank and the process count from accelerate, so
lmms-eval gives it a disjoint share of the documents and gathers the results; with
N > 1 each rank writes its own stats file, ``FILE`` with ``.rank<i>`` before the
suffix (``stats.rank0.jsonl``, ``stats.rank1.jsonl``). On CPU, launch with
``accelerate launch --multi_gpu --num_processes N`` (gloo): accelerate's ``--cpu`` flag
starts a single process whatever ``--num_processes`` says.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
    from loguru import logger
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "saint.integrations.lmms_eval needs lmms-eval: pip install 'saint[lmms]' (or pip install lmms-eval)"
    ) from e

from PIL import Image
from tqdm import tqdm

from .. import api
from ..adapters import llava as llava_adapter
from ..adapters import qwen_vl as qwen_adapter
from ..adapters.common import TokenStats, get_handle
from ..measure.report import jsonable
from . import UNPRUNED, parse_prune_settings
from .lmms_video import VIDEO_EXTENSIONS, Video, to_video

__all__ = ["CHATML_TEMPLATE", "LoglikelihoodResult", "SaintLlava", "SaintQwenVL", "VICUNA_CHAT_TEMPLATE"]

# LLaVA-1.5's conversation format (the fallback of lmms-eval's llava_hf model too).
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %} ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen's conversation format (ChatML), for tokenizers that carry no template of their own.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# generation settings of lmms-eval tasks forwarded to ``generate`` (``until``,
# ``temperature`` and ``do_sample`` are handled separately; others are ignored with a warning)
_GEN_KEYS = ("max_new_tokens", "min_new_tokens", "num_beams", "repetition_penalty", "length_penalty",
             "no_repeat_ngram_size")
_SAMPLE_KEYS = ("top_p", "top_k")
_HANDLED = ("until", "temperature", "do_sample", *_GEN_KEYS, *_SAMPLE_KEYS)
DEFAULT_MAX_NEW_TOKENS = 1024  # as lmms-eval's llava_hf when a task gives none


class LoglikelihoodResult(tuple, GenerationResult):
    """``(mean NLL, greedy)``: a plain 2-tuple that lmms-eval's evaluator passes through.

    lmms-eval 0.7's evaluator sends every model output through
    ``unwrap_generation_output``, which turns a ``(float, bool)`` tuple into its string
    (so multiple-choice scoring then fails to unpack it) but hands back ``.text`` of a
    ``GenerationResult`` unchanged; this tuple is also a ``GenerationResult`` whose
    ``text`` is the plain tuple, so the task receives ``(nll, greedy)`` either way.
    """

    token_counts = None

    def __new__(cls, nll: float, greedy: bool) -> LoglikelihoodResult:
        return super().__new__(cls, (float(nll), bool(greedy)))

    def __init__(self, nll: float, greedy: bool) -> None:  # the tuple holds the values
        pass

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), tuple(self)

    @property
    def text(self) -> tuple[float, bool]:  # type: ignore[override]
        return tuple(self)  # type: ignore[return-value]


def _dtype(value: Any) -> Any:
    if value in (None, "auto") or isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype={value!r}: use auto, float32, float16 or bfloat16")
    return dt


def _default_device() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch / torchrun: one model per process
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cuda"


class SaintLlava(lmms):
    """A LLaVA checkpoint patched once by :func:`saint.patch`, evaluated by lmms-eval.

    ``pretrained``: a local directory or hub id of a ``model_type: llava`` checkpoint
    (loaded with ``LlavaForConditionalGeneration`` and ``AutoProcessor``). ``method``:
    ``saint`` (default), ``fastv``, ``random``, ``pool`` or ``none``; the remaining
    keyword arguments are that method's settings (see
    :class:`saint.adapters.llava.LlavaPruneConfig`), given as strings or values.
    """

    is_simple = True
    NAME = "saint_llava"
    MODEL_TYPES: tuple[str, ...] = ("llava",)
    ADAPTER: Any = llava_adapter
    FLOAT_INPUTS: tuple[str, ...] = ("pixel_values", "pixel_values_videos")  # cast to the model's dtype

    def __init__(
        self,
        pretrained: str,
        method: str = "saint",
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        chat_template: str | None = None,
        use_cache: bool = True,
        revision: str | None = None,
        trust_remote_code: bool = False,
        stats_path: str | None = None,
        **prune_settings: Any,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        self.accelerator = Accelerator()  # data parallel: this process's share of the documents
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self.method, settings = self._pruning(method, prune_settings)
        self.prune_settings = settings
        self.batch_size_per_gpu = self._batch_size(batch_size)
        del max_batch_size  # only meaningful with batch_size=auto, which is refused above
        model = self._load_model(pretrained, dtype, device, device_map, attn_implementation, revision,
                                 trust_remote_code)
        self._load_processor(pretrained, chat_template, revision, trust_remote_code)
        self.use_cache = bool(use_cache)
        self.pretrained = pretrained
        if self.method is not None:
            api.patch(model, method=self.method, **settings)
        self._model = model
        self.stats_path = Path(stats_path) if stats_path else None
        self.pruning_log: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        logger.info(
            f"{self.NAME}: {pretrained} "
            + (f"pruned by saint.patch(method={self.method!r}, {settings})" if self.method else "unpruned (method=none)")
        )

    def _pruning(self, method: str, prune_settings: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The method (None: unpruned) and its parsed settings, refused before any weights load."""
        method = str(method).lower()
        settings = parse_prune_settings(prune_settings)
        if method in UNPRUNED:
            if settings:
                raise TypeError(f"method={method} evaluates the unpruned model and takes no settings, got {sorted(settings)}")
            return None, settings
        self.ADAPTER.make_config(method, **settings)  # refuse bad settings before loading weights
        return method, settings

    def _batch_size(self, batch_size: int | str) -> int:
        """A positive integer batch size (lmms-eval's ``auto`` is refused)."""
        try:
            bs = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size={batch_size!r}: {self.NAME} needs a positive integer batch size") from None
        if bs < 1 or bs != float(batch_size):
            raise ValueError(f"batch_size={batch_size!r}: {self.NAME} needs a positive integer batch size")
        return bs

    def _load_model(self, pretrained: str, dtype: str | torch.dtype | None, device: str | None,
                    device_map: str | None, attn_implementation: str | None, revision: str | None,
                    trust_remote_code: bool) -> torch.nn.Module:
        """The checkpoint's model in eval mode on its device, after checking its model type."""
        from transformers import AutoConfig

        load_kw = _load_kwargs(revision, trust_remote_code)
        config = AutoConfig.from_pretrained(pretrained, **load_kw)
        model_type = getattr(config, "model_type", None)
        if model_type not in self.MODEL_TYPES:
            raise ValueError(
                f"{pretrained}: {self.NAME} evaluates {self._family_hint()}; this one is {model_type!r}"
            )
        model_kw = dict(load_kw, dtype=_dtype(dtype))
        if attn_implementation is not None:
            model_kw["attn_implementation"] = attn_implementation
        if device_map:
            model_kw["device_map"] = device_map
        model = self._model_class(model_type).from_pretrained(pretrained, **model_kw).eval()
        if not device_map:
            model.to(device or _default_device())
        self._device = model.device
        return model

    def _load_processor(self, pretrained: str, chat_template: str | None, revision: str | None,
                        trust_remote_code: bool) -> None:
        """The checkpoint's processor, its tokenizer padding on the left, and the chat template."""
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(pretrained, **_load_kwargs(revision, trust_remote_code))
        self._tokenizer = self.processor.tokenizer
        self._tokenizer.padding_side = "left"  # generation continues every row at its end
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self.image_token = getattr(self.processor, "image_token", "<image>")
        template = chat_template
        if template is not None and os.path.isfile(template):
            template = Path(template).read_text()
        elif template is not None and "{{" not in template and "{%" not in template:
            raise ValueError(f"chat_template={template!r} is neither a file nor a Jinja template")
        self.chat_template = template or self._tokenizer.chat_template or self.DEFAULT_CHAT_TEMPLATE

    DEFAULT_CHAT_TEMPLATE = VICUNA_CHAT_TEMPLATE

    @staticmethod
    def _family_hint() -> str:
        return "LLaVA checkpoints (model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf)"

    @staticmethod
    def _model_class(model_type: str) -> Any:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def _image_placeholder(self) -> str:
        """What one image is in a prompt before the processor expands it."""
        return self.image_token

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The inputs of the first ``len(visuals)`` images of a processor output."""
        return {"pixel_values": enc["pixel_values"][: len(visuals)]} if visuals else {}

    def _processor_media(self, visuals: Sequence[Any]) -> dict[str, Any]:
        """The processor's keyword arguments for these visuals (LLaVA: images)."""
        return {"images": list(visuals) or None}

    def _processor_inputs(self, texts: Sequence[str], visuals: Sequence[Any]) -> Any:
        """The processor's output for prompts ``texts`` holding ``visuals`` in order (left padded)."""
        return self.processor(text=list(texts), **self._processor_media(visuals), return_tensors="pt", padding=True)

    def _visual_token_ids(self) -> dict[str, int]:
        """Placeholder token ids the processor expands, by the stats key that counts them."""
        return {"image_tokens": self.model.config.image_token_id}

    def _visual_counts(self, input_ids: torch.Tensor) -> dict[str, list[int]]:
        """Visual tokens of each prompt row, by the stats key that counts them."""
        return {key: (input_ids == tid).sum(dim=1).tolist() for key, tid in self._visual_token_ids().items()}

    def _row_inputs(self, input_ids: torch.Tensor, scored: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Inputs aligned with the prompt rows besides ids and mask (none for LLaVA);
        ``scored``: for log-likelihood rows, how many trailing ids of each row are scored."""
        return {}

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    def tok_encode(self, string: str) -> list[int]:
        return self._tokenizer.encode(string, add_special_tokens=False)

    # ------------------------------------------------------------------ prompts
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, doc: Any, where: str) -> list[Any]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        return self._images(visuals, where)

    def _images(self, visuals: Any, where: str) -> list[Any]:
        """A task's visuals, nested lists flattened, each converted by :meth:`_visual` (which
        may give a list: one visual that enters the prompt as several, e.g. a long audio clip)."""
        out: list[Any] = []
        for v in visuals or []:
            if isinstance(v, (list, tuple)):
                out.extend(self._images(v, where))
            elif v is not None:
                item = self._visual(v, where)
                out += item if isinstance(item, list) else [item]
        return out

    def _visual(self, v: Any, where: str) -> Any:
        """One visual of a task as the processor takes it (LLaVA: RGB images only)."""
        if isinstance(v, Image.Image):
            return v.convert("RGB")
        raise ValueError(
            f"{where}: {self.NAME} takes images (PIL), this task gives {type(v).__name__} "
            f"({str(v)[:80]!r}); {self._other_visuals()}"
        )

    @staticmethod
    def _other_visuals() -> str:
        return "video and audio are not supported (saint_qwen_vl and saint_llava_onevision serve video)"

    def _placeholders(self, context: str, visuals: Sequence[Any]) -> str:
        """The visuals' tokens in front of ``context``, unless the task placed them."""
        if not visuals or self.image_token in context:
            return context
        return " ".join(self._image_placeholder() for _ in visuals) + "\n" + context

    def _prompt(self, context: str, visuals: Sequence[Any]) -> str:
        """Image tokens in front (unless the task placed them), then the chat template."""
        context = self._placeholders(context, visuals)
        messages = [{"role": "user", "content": context}]
        return self._tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def _encode(self, texts: Sequence[str], visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        enc = self._processor_inputs(texts, visuals)
        out = {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
        for key in self.FLOAT_INPUTS:
            if key in out:
                out[key] = out[key].to(self.model.dtype)
        return out

    # ------------------------------------------------------------------ pruning statistics
    def _last_stats(self) -> TokenStats | None:
        handle = get_handle(self.model)
        return None if handle is None else handle.last_stats

    def _record(self, kind: str, input_ids: torch.Tensor, before: TokenStats | None) -> None:
        """Log the pruning of the forward that just ran (nothing when it had no image or video)."""
        counts = self._visual_counts(input_ids)
        if not any(any(c) for c in counts.values()):
            return
        entry: dict[str, Any] = {"request": kind, **counts}
        stats = self._last_stats()
        tokens = None
        if stats is not None and stats is not before:
            # generate repeats each request's row per beam (num_beams > 1): one value per request
            rows = input_ids.shape[0]
            step = len(stats.tokens[0]) // rows if rows and len(stats.tokens[0]) % rows == 0 else 1
            tokens = [t[::step] for t in stats.tokens]
            entry["llm_input"] = tokens[0]
            entry["llm_output"] = tokens[-1]
        self.pruning_log.append(entry)
        if self.stats_path is not None:
            line = dict(entry, rank=self.rank)
            if tokens is not None:
                line.update(blocks=stats.blocks, tokens=tokens)
            path = self.rank_stats_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")

    def rank_stats_path(self) -> Path | None:
        """This process's stats file: ``stats_path`` itself, or with several processes
        ``<stem>.rank<i><suffix>`` (one file per rank, never interleaved)."""
        if self.stats_path is None or self.world_size <= 1:
            return self.stats_path
        return self.stats_path.with_name(f"{self.stats_path.stem}.rank{self.rank}{self.stats_path.suffix}")

    def pruning_summary(self) -> dict[str, Any]:
        """Mean image tokens per prompt (processor), visual tokens handed to the language
        model and left after its last layer, over every forward so far, per request kind."""
        out: dict[str, Any] = {"method": self.method or "none", "settings": jsonable(self.prune_settings)}
        for kind in sorted({e["request"] for e in self.pruning_log}):
            entries = [e for e in self.pruning_log if e["request"] == kind]
            row: dict[str, Any] = {"forwards": len(entries)}
            for key in ("image_tokens", "video_tokens", "llm_input", "llm_output"):
                vals = [v for e in entries for v in e.get(key, [])]
                if vals:
                    row[key] = sum(vals) / len(vals)
            row["samples"] = sum(len(e["image_tokens"]) for e in entries)
            out[kind] = row
        return out

    def clean(self) -> None:
        summary = self.pruning_summary()
        logger.info(f"{self.NAME} pruning: {summary}")
        if self.stats_path is not None and self.pruning_log:
            with self.rank_stats_path().open("a") as f:
                f.write(json.dumps({"summary": summary, "rank": self.rank}) + "\n")
        super().clean()

    # ------------------------------------------------------------------ generation
    def _gen_kwargs(self, gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until")
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation_kwargs until={until!r} must be a string or a list of strings")
        eos = self._tokenizer.eos_token
        until = [u for u in until if u and u != eos]
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        kw: dict[str, Any] = {k: gen_kwargs[k] for k in _GEN_KEYS if gen_kwargs.get(k) is not None}
        kw.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        kw["do_sample"] = temperature > 0
        if temperature > 0:
            kw["temperature"] = temperature
            kw.update({k: gen_kwargs[k] for k in _SAMPLE_KEYS if gen_kwargs.get(k) is not None})
        ignored = sorted(set(gen_kwargs) - set(_HANDLED))
        if ignored and str(ignored) not in self._warned:
            self._warned.add(str(ignored))
            logger.warning(f"{self.NAME} ignores generation_kwargs {ignored}")
        if until:
            kw["stop_strings"] = until
            kw["tokenizer"] = self._tokenizer
        kw.update(pad_token_id=self._tokenizer.pad_token_id, eos_token_id=self.eot_token_id, use_cache=self.use_cache)
        return kw, until

    def _generate(self, prompts: Sequence[str], images: Sequence[Sequence[Any]],
                  gen_kwargs: dict[str, Any], kind: str) -> list[str]:
        """Generate for a batch of prompts (each with its images / videos), cut at ``until``."""
        kw, until = self._gen_kwargs(gen_kwargs)
        inputs = self._encode(prompts, [im for ims in images for im in ims])
        before = self._last_stats()
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kw)
        self._record(kind, inputs["input_ids"], before)
        texts = self._tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for s in until:
            texts = [t.split(s)[0] for t in texts]
        return texts

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched generation: requests with the same generation settings share batches,
        longest prompts first; results come back in request order."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(_key(req.args[1]), []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.NAME} generate")
        for idxs in groups.values():
            idxs.sort(key=lambda i: -len(self.tok_encode(requests[i].args[0])))
            for start in range(0, len(idxs), self.batch_size):
                batch = idxs[start:start + self.batch_size]
                prompts, images = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    ims = self._visuals(doc_to_visual, self._doc(task, split, doc_id), f"{task}/{doc_id}")
                    prompts.append(self._prompt(context, ims))
                    images.append(ims)
                texts = self._generate(prompts, images, requests[batch[0]].args[1], "generate_until")
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """lmms-eval's multi-round protocol, one document at a time: round 0 answers the
        task's context; each later round asks ``doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...)`` for ``(visuals, context, stop, outputs,
        info)`` until it signals stop. Returns each document's list of round outputs."""
        results = []
        for req in tqdm(requests, disable=self.rank != 0, desc=f"{self.NAME} multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            where = f"{task}/{doc_id}"
            visuals = self._visuals(doc_to_visual, doc, where)
            outputs: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, stop, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs)
                    if stop:
                        break
                    visuals = self._images(visuals, where)
                prompt = self._prompt(context, visuals)
                outputs.append(self._generate([prompt], [visuals], gen_kwargs, "generate_until_multi_round")[0])
                round_idx += 1
            results.append(outputs)
        return results

    # ------------------------------------------------------------------ log-likelihood
    def _continuation(self, req: Instance) -> tuple[str, str]:
        context, target, _, doc_id, task, split = req.args
        continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
        return context, str(continuation)

    def _loglikelihood_row(self, req: Instance) -> tuple[list[int], int, dict[str, torch.Tensor]]:
        """Token ids of prompt + continuation, how many trailing ids are the
        continuation, and the image inputs of the request's images."""
        context, continuation = self._continuation(req)
        _, _, doc_to_visual, doc_id, task, split = req.args
        where = f"{task}/{doc_id}"
        images = self._visuals(doc_to_visual, self._doc(task, split, doc_id), where)
        prompt = self._prompt(context, images)
        n_space = len(prompt) - len(prompt.rstrip(" "))  # a word boundary belongs to the continuation
        if n_space:
            prompt, continuation = prompt[:-n_space], prompt[-n_space:] + continuation
        enc = self._processor_inputs([prompt + continuation, prompt], images * 2)
        rows = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        whole, ctx = rows
        n = 0
        while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
            n += 1
        if n == len(whole):
            raise ValueError(f"{where}: the continuation {continuation!r} adds no token to the prompt")
        return whole, len(whole) - n, self._media(enc, images)

    def loglikelihood(self, requests: list[Instance]) -> list[LoglikelihoodResult]:
        """Batched scoring of ``(context, continuation)`` pairs through the patched model.
        Returns ``(mean NLL per continuation token, greedy)`` per request (lmms-eval's
        LLaVA convention: its multiple-choice scoring picks the smallest value), as
        :class:`LoglikelihoodResult` tuples."""
        order = sorted(range(len(requests)), key=lambda i: -len(self.tok_encode("".join(self._continuation(requests[i])))))
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        pad = self._tokenizer.pad_token_id
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.NAME} loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = [self._loglikelihood_row(requests[i]) for i in batch]
            length = max(len(seq) for seq, _, _ in rows)
            ids = torch.full((len(batch), length), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (seq, _, _) in enumerate(rows):
                ids[r, length - len(seq):] = torch.tensor(seq)
                mask[r, length - len(seq):] = 1
            inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
            row_inputs = self._row_inputs(ids, [n for _, n, _ in rows])
            inputs.update({k: v.to(self.device) for k, v in row_inputs.items()})
            for key in {k for _, _, media in rows for k in media}:
                value = _cat_padded([media[key] for _, _, media in rows if key in media]).to(self.device)
                inputs[key] = value.to(self.model.dtype) if value.is_floating_point() else value
            keep = max(n for _, n, _ in rows) + 1  # rows end together: only the tail is scored
            before = self._last_stats()
            with torch.inference_mode():
                logits = self.model(**inputs, logits_to_keep=keep, use_cache=False).logits
            logits = logits[:, -keep:]  # a forward without logits_to_keep (the Omni thinkers') returns every position
            self._record("loglikelihood", ids, before)
            for r, (i, (_, n, _)) in enumerate(zip(batch, rows, strict=True)):
                pred = logits[r, keep - n - 1:keep - 1].float()
                if bool(torch.isnan(pred).any()):
                    raise ValueError(
                        f"request {i}: a position that predicts the continuation was pruned (the continuation "
                        "directly follows image tokens); put text between the image and the continuation"
                    )
                target = ids[r, length - n:].to(pred.device)
                logp = torch.log_softmax(pred, dim=-1).gather(1, target[:, None]).squeeze(1)
                results[i] = LoglikelihoodResult(-logp.mean(), (pred.argmax(dim=-1) == target).all())
                self.cache_hook.add_partial("loglikelihood", self._continuation(requests[i]), results[i])
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]


class SaintQwenVL(SaintLlava):
    """A Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5 checkpoint patched once by :func:`saint.patch`,
    evaluated by lmms-eval (``--model saint_qwen_vl``), images and videos (Qwen3.5: the
    vision-side methods only). ``method``: ``saint``
    (default), ``fastv``, ``random``, ``pool`` or ``none``; the remaining keyword arguments
    are that method's settings (see :class:`saint.adapters.qwen_vl.QwenPruneConfig`).

    Each image enters the prompt as ``<|vision_start|><|image_pad|><|vision_end|>`` and
    each video as ``<|vision_start|><|video_pad|><|vision_end|>`` (what Qwen's chat
    templates emit), in the order the task lists them, expanded by the processor to
    their grids (Qwen3-VL's processor gives every frame group its own timestamp and
    start/end tokens); the chat template is the tokenizer's (else ChatML).

    Videos follow lmms-eval's convention, a video file's path in ``doc_to_visual`` (a
    4-D uint8 frame array is accepted too); ``max_num_frames`` (default 32) and ``fps``
    (default: none, frames spread evenly over the video) are the frame-sampling model
    arguments of lmms-eval's own Qwen models; see :mod:`saint.integrations.lmms_video`.
    A video is pruned per frame group (two frames, one temporal patch): on the vision
    side each of its ``t`` groups is one sample with its own budget, as an image is; in
    the language model a prompt's image and video tokens are pruned as one set, as
    several images are. ``stats_path`` lines count ``video_tokens`` beside
    ``image_tokens``.
    """

    NAME = "saint_qwen_vl"
    MODEL_CLASSES = {  # model_type -> the transformers class that loads it
        "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
        "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
    MODEL_TYPES = tuple(MODEL_CLASSES)
    TITLE = "Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (dense or MoE)"
    ADAPTER = qwen_adapter
    DEFAULT_CHAT_TEMPLATE = CHATML_TEMPLATE

    def __init__(self, pretrained: str, max_num_frames: int | str = 32, fps: float | str | None = None,
                 **kwargs: Any) -> None:
        try:
            frames = float(max_num_frames)
        except (TypeError, ValueError):
            frames = float("nan")
        if not (frames >= 2 and frames == int(frames)):
            raise ValueError(f"max_num_frames={max_num_frames!r} must be an integer >= 2 (one frame group)")
        frames = int(frames)
        try:
            rate = None if fps in (None, "", "None", "none") else float(fps)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            rate = float("nan")
        if rate is not None and not 0 < rate < math.inf:
            raise ValueError(f"fps={fps!r} must be a number > 0 (frames per second)")
        self.max_num_frames, self.fps = frames, rate
        super().__init__(pretrained, **kwargs)

    def _visual(self, v: Any, where: str) -> Any:
        video = to_video(v, self.max_num_frames, self.fps)
        return video if video is not None else super()._visual(v, where)

    @staticmethod
    def _other_visuals() -> str:
        return f"videos are file paths ending in {', '.join(VIDEO_EXTENSIONS)} or 4-D uint8 frame arrays; audio is not supported"

    def _video_placeholder(self) -> str:
        start = getattr(self.processor, "vision_start_token", "<|vision_start|>")
        end = getattr(self.processor, "vision_end_token", "<|vision_end|>")
        return f"{start}{self.processor.video_token}{end}"

    def _placeholders(self, context: str, visuals: Sequence[Any]) -> str:
        """Each visual's tokens in order in front of ``context`` (unless the task placed them);
        a task's LLaVA-style ``<image>`` marker is dropped, as lmms-eval's qwen2_5_vl does."""
        context = context.replace("<image>", "")
        if not visuals or any(t in context for t in self._media_tokens()):
            return context
        return " ".join(self._placeholder(v) for v in visuals) + "\n" + context

    def _media_tokens(self) -> tuple[str, ...]:
        return self.image_token, self.processor.video_token

    def _placeholder(self, visual: Any) -> str:
        return self._video_placeholder() if isinstance(visual, Video) else self._image_placeholder()

    def _processor_media(self, visuals: Sequence[Any]) -> dict[str, Any]:
        images = [v for v in visuals if not isinstance(v, Video)]
        videos = [v for v in visuals if isinstance(v, Video)]
        out: dict[str, Any] = {"images": images or None}
        if videos:  # frames already sampled here: the processor must not sample again
            out.update(videos=[v.frames for v in videos], video_metadata=[v.metadata() for v in videos],
                       do_sample_frames=False)
        return out

    @classmethod
    def _family_hint(cls) -> str:  # type: ignore[override]
        *most, last = (repr(t) for t in cls.MODEL_CLASSES)
        return f"{cls.TITLE} checkpoints (model_type {', '.join(most)} or {last})"

    @classmethod
    def _model_class(cls, model_type: str) -> Any:  # type: ignore[override]
        import transformers

        return getattr(transformers, cls.MODEL_CLASSES[model_type])

    def _image_placeholder(self) -> str:
        start = getattr(self.processor, "vision_start_token", "<|vision_start|>")
        end = getattr(self.processor, "vision_end_token", "<|vision_end|>")
        return f"{start}{self.image_token}{end}"

    def _media(self, enc: Any, visuals: Sequence[Any]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        n_videos = sum(isinstance(v, Video) for v in visuals)
        for n, pixels, grid_key in ((len(visuals) - n_videos, "pixel_values", "image_grid_thw"),
                                    (n_videos, "pixel_values_videos", "video_grid_thw")):
            if n:
                grid = enc[grid_key][:n]
                out.update({pixels: enc[pixels][: int(grid.prod(dim=-1).sum())], grid_key: grid})
        if n_videos and "second_per_grid_ts" in enc:  # Qwen2.5-VL: seconds per temporal patch
            out["second_per_grid_ts"] = torch.as_tensor(enc["second_per_grid_ts"])[:n_videos]
        return out

    def _visual_token_ids(self) -> dict[str, int]:
        cfg = self.model.config
        return {"image_tokens": cfg.image_token_id, "video_tokens": cfg.video_token_id}

    def _row_inputs(self, input_ids: torch.Tensor, scored: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
        return {"mm_token_type_ids": types}


def _load_kwargs(revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """``from_pretrained`` keywords shared by the config, model and processor."""
    load_kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if revision is not None:
        load_kw["revision"] = revision
    return load_kw


def _cat_padded(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (anyres
    pixels: images with fewer crops, as the processor pads a batch; the model reads the
    real count from ``image_sizes``)."""
    shape = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    padded = []
    for v in values:
        if list(v.shape[1:]) != shape:
            pad = v.new_zeros(v.shape[0], *shape)
            pad[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
            v = pad
        padded.append(v)
    return torch.cat(padded)


def _key(gen_kwargs: Any) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)
