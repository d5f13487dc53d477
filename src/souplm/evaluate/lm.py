"""What a task needs from a model, and its implementation for transformers models.

Task kinds talk to a `LanguageModel` through four batched requests (log-likelihood of a
continuation, rolling log-likelihood of a text, greedy generation, greedy generation with an image).
Keeping the model behind this small interface lets the tests use a stub whose answers are known,
and lets a sweep evaluate an in-memory soup without writing a checkpoint.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import SoupError
from ..io.checkdir import read_config as checked_config
from ..io.checkdir import require_tokenizer


@runtime_checkable
class LanguageModel(Protocol):
    """The requests a task kind makes. Every method takes a whole list and batches internally."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation | context) in nats, for each (context, continuation)."""
        ...

    def rolling_nll(self, texts: Sequence[str], context_length: int) -> list[tuple[float, int]]:
        """(total negative log-likelihood in nats, number of tokens scored) for each whole text."""
        ...

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], chat_template: bool = False
    ) -> list[str]:
        """Greedy continuation of each prompt, cut at the first stop string."""
        ...

    def generate_vqa(
        self, prompts: Sequence[str], images: Sequence[Any], max_new_tokens: int, stop: Sequence[str],
        chat_template: bool = False,
    ) -> list[str]:
        """Greedy answer for each (prompt with an image placeholder, PIL image)."""
        ...


# Greedy generation runs this many times the scoring batch at once (HFModel.fast).
GENERATE_BATCH_FACTOR = 4


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text up to the earliest stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class HFModel:
    """A transformers causal LM (or LLaVA) with its tokenizer/processor, behind `LanguageModel`.

    `calls` counts forward/generate calls, so tests (and users) can see that a cache hit did no work.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        processor: Any = None,
        *,
        batch_size: int = 8,
        progress: bool = True,
        fast: bool = True,
    ):
        self.model = model.eval()
        # `fast`: the output head runs only on the positions that are scored (logits_to_keep), and continuations
        # that share a context (multiple-choice options) read it once from the KV cache. False keeps the plain
        # path (whole-sequence logits, one sequence per request): the benchmark compares the two.
        self.fast = bool(fast)
        params = _forward_params(model)
        self._keep_ok = "logits_to_keep" in params
        # transformers 5 names the KV cache argument `cache` (4.x: `past_key_values`)
        self._cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None)
        self._use_cache = "use_cache" in params
        self._prefix_ok = self._cache_kw is not None and "position_ids" in params
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise SoupError("a model needs a tokenizer (or a processor with one) to be evaluated")
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.calls = 0
        cfg = getattr(model.config, "text_config", None) or model.config
        self.max_length = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def prefix_token_id(self) -> int | None:
        """Token that conditions a text's first token (BOS if the tokenizer has one, else EOS)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for t in (tok.pad_token_id, tok.eos_token_id, 0):
            if t is not None:
                return int(t)
        return 0

    def encode(self, text: str) -> list[int]:
        # No special tokens: prompts are scored as written; the prefix token is added explicitly.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _bar(self, total: int, desc: str) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, unit="ex")

    def _score(self, seqs: list[tuple[list[int], int]], desc: str) -> list[tuple[float, int]]:
        """Sum of log-probabilities of the last n tokens of each token sequence.

        `seqs` holds (tokens, n): the model reads tokens[:-1] and is scored on the last n targets.
        Sequences are sorted longest first so each batch pads little, then put back in order.
        """
        import torch

        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        bar = self._bar(len(seqs), desc)
        with torch.inference_mode():
            for idx in batches(order, self.batch_size):
                width = max(len(seqs[i][0]) - 1 for i in idx)
                ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    toks = seqs[i][0][:-1]
                    ids[r, : len(toks)] = torch.tensor(toks)
                    mask[r, : len(toks)] = 1
                self.calls += 1
                # Only the last `keep` positions are scored (right padding: every scored position of every row
                # lies in [width - keep, width)): the output head and its softmax run on those alone.
                keep = width - min(len(seqs[i][0]) - 1 - seqs[i][1] for i in idx)
                kwargs = {"logits_to_keep": keep} if self.fast and self._keep_ok else {}
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    **kwargs).logits
                shift = width - logits.shape[1]  # position p of the batch is row p - shift of the logits
                for r, i in enumerate(idx):
                    toks, n = seqs[i]
                    L = len(toks) - 1
                    # Log-softmax one row at a time: a full batch of vocab-sized rows is large.
                    lp = torch.log_softmax(logits[r, L - n - shift : L - shift].float(), dim=-1)
                    tgt = torch.tensor(toks[L - n + 1 : L + 1], device=lp.device)
                    out[i] = (float(lp.gather(1, tgt[:, None]).sum()), n)
                bar.update(len(idx))
        bar.close()
        return out

    # -- LanguageModel -------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        return [-nll for nll, _ in self.conditional_nll(requests)]

    def conditional_nll(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(negative log-likelihood in nats, tokens scored) of each continuation given its context."""
        seqs: list[tuple[list[int], int]] = []
        parts: list[tuple[list[int], list[int]]] = []
        for ctx, cont in requests:
            ctx_ids = self.encode(ctx)
            whole = self.encode(ctx + cont)
            # Tokenising the joined string keeps merges across the boundary as the model saw them in
            # training; fall back to separate encoding when the context's tokens change.
            if len(whole) > len(ctx_ids) and whole[: len(ctx_ids)] == ctx_ids:
                cont_ids = whole[len(ctx_ids) :]
            else:
                cont_ids = self.encode(cont)
            if not cont_ids:
                raise SoupError(f"empty continuation after context {ctx[-40:]!r}")
            if not ctx_ids and self.prefix_token_id is not None:
                ctx_ids = [self.prefix_token_id]
            toks = (ctx_ids + cont_ids)[-(self.max_length + 1) :]
            seqs.append((toks, min(len(cont_ids), len(toks) - 1)))
            parts.append((ctx_ids, cont_ids))
        out: list[tuple[float, int] | None] = [None] * len(seqs)
        if self.fast and self._prefix_ok:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, (c, k) in enumerate(parts):
                if len(c) + len(k) <= self.max_length + 1:  # not truncated: context and continuation as split
                    groups.setdefault(tuple(c), []).append(i)
            shared = {c: idx for c, idx in groups.items() if len(idx) > 1}
            if shared:
                for i, res in self._score_shared(shared, parts).items():
                    out[i] = res
        rest = [i for i in range(len(seqs)) if out[i] is None]
        for i, (lp, n) in zip(rest, self._score([seqs[i] for i in rest], "loglikelihood"), strict=True):
            out[i] = (lp, n)
        return [(-lp, n) for lp, n in out]  # type: ignore[misc]

    def _score_shared(self, groups: dict[tuple[int, ...], list[int]],
                      parts: list[tuple[list[int], list[int]]]) -> dict[int, tuple[float, int]]:
        """Log-probabilities of continuations that share a context: the context runs once (its KV cache is
        repeated for the continuations, which are scored together, right-padded). Returns {request: (sum log p,
        tokens)}; a group whose cache cannot be repeated is left out (the caller scores it the plain way)."""
        import torch

        out: dict[int, tuple[float, int]] = {}
        bar = self._bar(sum(len(v) for v in groups.values()), "loglikelihood")
        with torch.inference_mode():
            for ctx_ids, idx in groups.items():
                kw: dict[str, Any] = {"logits_to_keep": 1} if self._keep_ok else {}
                if self._use_cache:
                    kw["use_cache"] = True
                self.calls += 1
                first = self.model(input_ids=torch.tensor([list(ctx_ids)], device=self.device), **kw)
                cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
                if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                    continue
                first_lp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
                conts = [parts[i][1] for i in idx]
                c, k, width = len(ctx_ids), len(conts), max(len(x) for x in conts)
                cache.batch_repeat_interleave(k)
                ids = torch.full((k, width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((k, c + width), dtype=torch.long)
                mask[:, :c] = 1
                for r, x in enumerate(conts):
                    ids[r, : len(x)] = torch.tensor(x)
                    mask[r, c : c + len(x)] = 1
                pos = (c + torch.arange(width)).unsqueeze(0).expand(k, -1)
                self.calls += 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device), **{self._cache_kw: cache}).logits
                for r, (i, x) in enumerate(zip(idx, conts, strict=True)):
                    total = float(first_lp[x[0]])
                    if len(x) > 1:
                        lp = torch.log_softmax(logits[r, : len(x) - 1].float(), dim=-1)
                        total += float(lp.gather(1, torch.tensor(x[1:], device=lp.device)[:, None]).sum())
                    out[i] = (total, len(x))
                bar.update(len(idx))
        bar.close()
        return out

    def rolling_nll(self, texts: Sequence[str], context_length: int) -> list[tuple[float, int]]:
        # Disjoint windows: every token is scored exactly once, with up to `context_length` tokens of
        # its own window as context. The prefix token lets the first token of a text be scored too.
        L = max(2, min(int(context_length), self.max_length))
        seqs: list[tuple[list[int], int]] = []
        owner: list[int] = []
        for t, text in enumerate(texts):
            toks = self.encode(text)
            if self.prefix_token_id is not None:
                toks = [self.prefix_token_id] + toks
            for start in range(0, max(len(toks) - 1, 0), L):
                window = toks[start : start + L + 1]
                seqs.append((window, len(window) - 1))
                owner.append(t)
        totals = [(0.0, 0)] * len(texts)
        for t, (lp, n) in zip(owner, self._score(seqs, "perplexity"), strict=True):
            nll, count = totals[t]
            totals[t] = (nll - lp, count + n)
        return totals

    def chat_prompt(self, prompt: str) -> str:
        """`prompt` as a user turn in the model's chat template, ready for the assistant's answer."""
        return self._chat(prompt)

    def _chat(self, prompt: str) -> str:
        tmpl_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(tmpl_owner, "chat_template", None):
            raise SoupError("the task asks for a chat template but the model's tokenizer has none")
        return tmpl_owner.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def _generate(
        self, items: Sequence[Any], encode: Callable[[list[Any]], dict], max_new_tokens: int,
        stop: Sequence[str], desc: str,
    ) -> list[str]:
        import torch

        outs: list[str] = []
        bar = self._bar(len(items), desc)
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"  # decoder-only generation needs the prompts right-aligned
        items = list(items)
        size = self.batch_size
        order = list(range(len(items)))
        if self.fast:
            # A decoding step reads every weight once for the whole batch, so on a CPU a wider batch costs little
            # more per step than a narrow one; prompts of similar length go together, so little is padded.
            size = GENERATE_BATCH_FACTOR * self.batch_size
            order.sort(key=lambda i: len(items[i][0] if isinstance(items[i], tuple) else items[i]))
        try:
            with torch.inference_mode():
                for chunk in batches([items[i] for i in order], size):
                    enc = {k: v.to(self.device) for k, v in encode(list(chunk)).items()}
                    kwargs: dict[str, Any] = {
                        "max_new_tokens": int(max_new_tokens), "do_sample": False, "pad_token_id": self.pad_id,
                        "temperature": None, "top_p": None, "top_k": None,
                    }
                    if stop:
                        kwargs.update(stop_strings=list(stop), tokenizer=tok)
                    self.calls += 1
                    gen = self.model.generate(**enc, **kwargs)
                    new = gen[:, enc["input_ids"].shape[1] :]
                    for row in tok.batch_decode(new, skip_special_tokens=True):
                        outs.append(cut_at_stop(row, stop))
                    bar.update(len(chunk))
        finally:
            tok.padding_side = old_side
            bar.close()
        back = [""] * len(items)
        for i, o in zip(order, outs, strict=True):
            back[i] = o
        return back

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], chat_template: bool = False
    ) -> list[str]:
        texts = [self._chat(p) if chat_template else p for p in prompts]

        def encode(chunk: list[str]) -> dict:
            # A chat template already holds its special tokens; plain prompts get none (as scored).
            return self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)

        return self._generate(texts, encode, max_new_tokens, stop, "generate")

    def generate_vqa(
        self, prompts: Sequence[str], images: Sequence[Any], max_new_tokens: int, stop: Sequence[str],
        chat_template: bool = False,
    ) -> list[str]:
        if self.processor is None:
            raise SoupError("a vqa task needs a multimodal model with an image processor (LLaVA-style)")
        texts = [self._chat(p) if chat_template else p for p in prompts]
        items = list(zip(texts, images, strict=True))

        def encode(chunk: list[tuple[str, Any]]) -> dict:
            text, imgs = [t for t, _ in chunk], [im for _, im in chunk]
            return dict(self.processor(text=text, images=imgs, return_tensors="pt", padding=True))

        return self._generate(items, encode, max_new_tokens, stop, "vqa")


def _forward_params(model: Any) -> set[str]:
    """Names the model's forward accepts (which scoring shortcuts it supports)."""
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise SoupError(f"{model_dir}: not a model directory (no config.json)")
    return checked_config(path)  # a JSON object, bounded in size and depth


def is_multimodal(config: dict[str, Any]) -> bool:
    return "vision_config" in config or config.get("model_type") == "llava"


def load_model(model_dir: str | Path, *, device: str | None = None, dtype: str = "float32") -> tuple[Any, Any, Any]:
    """(model, tokenizer, processor) from a local dir; LLaVA-style configs get their processor."""
    import torch
    import transformers

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    require_tokenizer(model_dir)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise SoupError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    processor = None
    try:
        if config.get("model_type") == "souplm_cogvlm":  # souplm's own CogVLM-style class
            from ..models.cogvlm import load_pretrained

            model, processor = load_pretrained(model_dir, torch_dtype)
            tokenizer = processor.tokenizer
        elif is_multimodal(config):
            model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype)
            processor = transformers.AutoProcessor.from_pretrained(model_dir)
            tokenizer = processor.tokenizer
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except OSError as e:
        raise SoupError(f"{model_dir}: cannot load model or tokenizer ({str(e).splitlines()[0]})") from None
    except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError) as e:  # e.g. a pickle weights_only refused
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SoupError(f"{model_dir}: transformers refused to load the weights ({type(e).__name__}: {first})") from None
    return model.to(device), tokenizer, processor
