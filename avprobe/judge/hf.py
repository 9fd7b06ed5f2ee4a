"""Local LLM judge: a chat model run through `transformers`, with the same rubric prompts.

For users who have judge weights and a GPU but no server. Replies are parsed exactly as the
HTTP judge's are: an unparseable reply is unscored (NaN) with the raw text kept.

Weights are read from local files only (a directory, or the Hugging Face cache): a judge that
is missing is an error naming the fix, never a silent multi-GB download; pass
`allow_download=True` to let `transformers` fetch it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from avprobe.judge.base import ERROR_INTERNAL, ERROR_PARSE, Judge, JudgeCache, JudgeItem, Score
from avprobe.judge.prompts import PROMPT_VERSION, build_messages, parse_reply

log = logging.getLogger(__name__)


class TransformersJudge(Judge):
    """Rubric judge on a local `AutoModelForCausalLM` chat model (loaded on first use).

    Items are generated in left-padded batches of `batch_size`. Sampling defaults follow
    the paper's judge (temperature 0.7, top_p 0.8, top_k 20, thinking on); `temperature=0`
    decodes greedily. `seed` makes sampling repeatable for a given batch composition.
    """

    backend = "transformers"

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        max_new_tokens: int = 4096,
        temperature: float = 0.7,
        top_p: float = 0.8,
        top_k: int | None = 20,
        thinking: bool | None = True,
        seed: int | None = 0,
        allow_download: bool = False,
        cache: JudgeCache | None = None,
    ) -> None:
        # One model instance: parallelism comes from batching, not threads.
        super().__init__(cache=cache, max_workers=1)
        if not model:
            raise ValueError("the transformers judge needs a model: transformers:MODEL_ID_OR_PATH")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        self._model_name = model
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = top_k
        self.thinking = thinking
        self.seed = seed
        self.allow_download = bool(allow_download)  # not in settings(): it changes no judgment
        self._loaded: tuple[Any, Any] | None = None
        self._load_lock = threading.Lock()

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def prompt_version(self) -> str:
        return PROMPT_VERSION

    def settings(self) -> dict[str, Any]:
        return {
            "model": self._model_name,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "thinking": self.thinking,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "prompt_version": PROMPT_VERSION,
        }

    def _load(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._loaded is None:
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tok = self._from_pretrained(AutoTokenizer)
                if tok.chat_template is None:
                    raise ValueError(f"judge model {self._model_name!r} has no chat template: use an instruction-tuned chat model")
                tok.padding_side = "left"  # generation continues from the right end of each row
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                model = self._from_pretrained(AutoModelForCausalLM, dtype=self.dtype).to(device).eval()
                log.info("loaded judge model %s on %s", self._model_name, device)
                self._loaded = (tok, model)
            return self._loaded

    def _from_pretrained(self, loader: Any, **kwargs: Any) -> Any:
        name = self._model_name
        try:
            return loader.from_pretrained(name, local_files_only=not self.allow_download, **kwargs)
        except (OSError, ValueError) as exc:
            if os.path.isdir(name):  # there, but not a model: transformers' own words say why
                raise OSError(f"judge model directory {name!r} could not be loaded: {exc}") from exc
            if self.allow_download or not isinstance(exc, OSError):
                raise
            from huggingface_hub.constants import HF_HUB_CACHE

            # transformers' message talks of a connection it never tried: say what is missing.
            raise FileNotFoundError(
                f"judge model {name!r} is not on this machine: no such directory, and not in the Hugging Face "
                f"cache {HF_HUB_CACHE}. Download it first (`huggingface-cli download {name}`) or pass the "
                "directory that holds it; allow_download=True lets the judge fetch it itself"
            ) from exc

    def close(self) -> None:
        with self._load_lock:
            self._loaded = None

    def _prompt(self, tok: Any, item: JudgeItem) -> str:
        kwargs = {} if self.thinking is None else {"enable_thinking": self.thinking}
        messages = build_messages(item.candidate, item.reference, item.modality)
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def generate(self, items: Sequence[JudgeItem]) -> list[str]:
        """Raw replies for a batch of items."""
        import torch

        tok, model = self._load()
        enc = tok(
            [self._prompt(tok, it) for it in items], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        sample = self.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": sample, "pad_token_id": tok.pad_token_id}
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or 0)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :]  # [batch, new_tokens]
        return tok.batch_decode(new, skip_special_tokens=True)

    def _score(self, item: JudgeItem) -> Score:
        scores: list[Score] = []
        self._score_many([item], lambda _it, s: scores.append(s))
        return scores[0]

    def _score_many(self, items: Sequence[JudgeItem], done: Callable[[JudgeItem, Score], None]) -> None:
        self._load()  # a missing or broken model is a configuration error: raise it
        meta = self.settings()
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            try:
                replies = self.generate(batch)
            except (RuntimeError, ValueError) as exc:
                # e.g. out of memory on one long batch: record it, keep the other batches
                log.error("judge generation failed on a batch of %d: %r", len(batch), exc)
                for it in batch:
                    done(it, Score.unscored(f"generation failed: {exc}", "", self.judge_id, ERROR_INTERNAL, meta))
                continue
            for it, raw in zip(batch, replies, strict=True):
                parsed = parse_reply(raw)
                if parsed.value is None:
                    done(it, Score.unscored(parsed.problem, raw, self.judge_id, ERROR_PARSE, meta))
                else:
                    done(it, Score(parsed.value, parsed.reason, raw, self.judge_id, meta=meta))
