"""Serve one frozen base model with many adapters over HTTP (OpenAI-style ``/v1/completions``, ``/v1/chat/completions``).

`Engine` is the model side: it tokenizes, runs one ``generate`` over a mixed batch (row i uses
its own adapter, `lorakit.mixed_batch`) and loads or drops adapters, all under one lock.
`create_app` is the HTTP face (FastAPI): requests that arrive within `max_wait` seconds of each
other, for any adapters, are batched together, up to `max_batch` rows. Bad requests get a 4xx
with a message in OpenAI's error shape; nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .adapters import delete_adapter, disable_adapters, list_adapters
from .checkpoint import load_adapter
from .data import encode_prompt, special_prefix
from .multi import mixed_batch
from .state import get_state
from .training import FINISHED_JSON

log = logging.getLogger(__name__)

BASE = "base"
MAX_STOP_CHARS = 256  # per stop string
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL = 0.1  # seconds between checks that a waiting request's client is still there
MIN_TEMPERATURE = 1e-5  # below it sampling is greedy: logits / 1e-39 overflow fp32 and sampling fails
MAX_CHARS_PER_TOKEN = 100  # a prompt longer than context × this cannot fit: refused before tokenizing it
MAX_BODY_MB = 16.0  # default cap on a request body: far above any prompt that fits, far below what exhausts memory
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


class RequestError(Exception):
    """A client error: HTTP `status` with a message that says what to change."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class Job:
    """One completion request: its prompts' token ids, adapter and sampling settings."""

    adapter: str
    prompts: list[list[int]]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    future: asyncio.Future | None = None

    @property
    def sampling(self) -> tuple[float, float]:
        """Requests batch together only when they sample alike (``generate`` takes one setting)."""
        return (self.temperature, self.top_p) if self.temperature >= MIN_TEMPERATURE else (0.0, 1.0)


@dataclass
class Metrics:
    """Counters reported at ``/metrics`` (Prometheus text format)."""

    requests: Counter = field(default_factory=Counter)  # by adapter
    errors: Counter = field(default_factory=Counter)  # by HTTP status
    batches: int = 0
    batch_rows: int = 0
    batch_adapters: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    abandoned: int = 0  # queued jobs dropped because their client disconnected


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an adapter on the server (None if it can)."""
    if name == BASE or not NAME_RE.fullmatch(name):
        return f"adapter name {name!r} must match {NAME_RE.pattern} and not be {BASE!r} (the base model's name)"
    return None


class Engine:
    """A causal LM with named adapters that completes mixed-adapter batches.

    `max_new_tokens` caps ``max_tokens`` per request; `max_context` (default and upper bound: the model's
    ``max_position_embeddings``) caps prompt + completion length, so also how long one batch can hold the model.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any, max_new_tokens: int = 256, max_context: int | None = None
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # decoder-only batches: pad on the left
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_new_tokens = max_new_tokens
        context = getattr(getattr(model, "config", None), "max_position_embeddings", 2048)
        if max_context is not None and not 1 <= max_context <= context:
            raise ValueError(f"max_context={max_context} must be between 1 and the model's context of {context} tokens")
        self.max_context = max_context or context
        self.context_text = (f"the context of {self.max_context} tokens" if self.max_context == context
                             else f"this server's context of {self.max_context} tokens (--max-context)")
        self.lock = threading.Lock()  # the model: one batch, load or unload at a time
        self.text_lock = threading.Lock()  # the tokenizer (a fast tokenizer is not safe across threads)
        self.prefix = special_prefix(tokenizer)

    def adapters(self) -> list[str]:
        """Names a request's ``model`` field may take: ``base`` and every loaded adapter."""
        return [BASE, *list_adapters(self.model)]

    def check_adapter(self, name: str) -> None:
        """Raise a 404 `RequestError` naming the choices if `name` is not served."""
        if name not in self.adapters():
            raise RequestError(404, f"model {name!r} does not exist; choose one of {self.adapters()}", "model_not_found")

    def encode(self, prompts: list[str], max_tokens: int | None, names: list[str] | None = None) -> list[list[int]]:
        """Token ids of each prompt; 400 if prompt + completion (None: the request set no limit, so one token) would not
        fit. `names`: what the errors call each prompt (default "prompt <i>")."""
        names = names or [f"prompt {i}" for i in range(len(prompts))]
        if max_tokens is not None and max_tokens > self.max_new_tokens:
            raise RequestError(400, f"max_tokens={max_tokens} exceeds this server's limit of {self.max_new_tokens}")
        ids = []
        for i, prompt in enumerate(prompts):
            if len(prompt) > self.max_context * MAX_CHARS_PER_TOKEN:
                raise RequestError(400, f"{names[i]} has {len(prompt):,} characters, more than fit in {self.context_text}: "
                                        "shorten it")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # e.g. a lone UTF-16 surrogate ("\\ud800") in the JSON
                raise RequestError(400, f"{names[i]} is not valid text: {e.reason} at character {e.start}") from e
            try:
                with self.text_lock:
                    ids.append(encode_prompt(self.tokenizer, prompt, self.prefix))  # as the trainer encodes prompts
            except (TypeError, ValueError) as e:
                raise RequestError(400, f"{names[i]} cannot be tokenized: {e}") from e
        for i, row in enumerate(ids):
            if not row:
                raise RequestError(400, f"{names[i]} is empty after tokenization; send some text")
            if max_tokens is None and len(row) >= self.max_context:
                raise RequestError(400, f"{names[i]} has {len(row)} tokens, which leaves no room for a completion in "
                                        f"{self.context_text}: shorten it")
            if max_tokens is not None and len(row) + max_tokens > self.max_context:
                raise RequestError(
                    400,
                    f"{names[i]} has {len(row)} tokens; with max_tokens={max_tokens} that exceeds {self.context_text}: "
                    + ("shorten it or lower max_tokens" if max_tokens > 1 else "shorten it"),
                )
        return ids

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """`messages` in the tokenizer's chat template, ending in the assistant's header, as the trainer formats prompts."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RequestError(400, "the model's tokenizer has no chat template, so messages cannot be formatted: send the "
                                    "prompt text to /v1/completions (as adapters trained without a chat template saw it), "
                                    "or serve a model whose tokenizer has one")
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            with self.text_lock:
                return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateSyntaxError:
            raise  # the server's template is broken: a 500, not the client's error
        except TemplateError as e:  # the template's raise_exception, e.g. roles that do not alternate
            raise RequestError(400, f"the chat template refuses these messages: {e}") from e

    def generate(self, jobs: list[Job]) -> list[list[tuple[str, int, str]] | RequestError]:
        """Complete every prompt of `jobs` in one mixed batch: per job, per prompt (text, tokens, finish_reason).

        All jobs must share one sampling setting. A job whose adapter was unloaded since it was
        queued gets a 404 `RequestError` in place of its result; the other jobs still run.
        """
        outcome: dict[int, list[tuple[str, int, str]] | RequestError] = {}
        with self.lock, torch.inference_mode():
            live = []
            for job in jobs:
                try:
                    self.check_adapter(job.adapter)
                    live.append(job)
                except RequestError as e:
                    outcome[id(job)] = e
            if live:
                outcome.update(zip(map(id, live), self._complete(live)))
        return [outcome[id(job)] for job in jobs]

    def _complete(self, jobs: list[Job]) -> list[list[tuple[str, int, str]]]:
        """`generate` for jobs whose adapters are loaded (called under the lock)."""
        rows = [(ids, job.adapter) for job in jobs for ids in job.prompts]
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in rows])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
        temperature, top_p = jobs[0].sampling
        kwargs: dict[str, Any] = dict(
            attention_mask=mask, max_new_tokens=max(j.max_tokens for j in jobs), pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id, do_sample=temperature > 0,
        )
        if temperature > 0:  # `sampling` made it >= MIN_TEMPERATURE
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        names = [None if name == BASE else name for _, name in rows]
        if any(names):
            scope = mixed_batch(self.model, names)
        else:  # base rows only: switch the adapters off (or there are none)
            scope = disable_adapters(self.model) if list_adapters(self.model) else contextlib.nullcontext()
        with scope:
            out = self.model.generate(input_ids, **kwargs)
        new = out[:, width:].tolist()
        results, k = [], 0
        for job in jobs:
            texts = []
            for _ in job.prompts:
                tokens, finish = new[k][: job.max_tokens], "length"
                if self.tokenizer.eos_token_id in tokens:  # kept: OpenAI's usage counts the stop token as generated
                    tokens, finish = tokens[: tokens.index(self.tokenizer.eos_token_id) + 1], "stop"
                with self.text_lock:  # a special token, EOS decodes to no text
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    if any(s in text for s in job.stop):
                        (text, tokens), finish = self._cut_at_stop(tokens, job.stop), "stop"
                texts.append((text, len(tokens), finish))
                k += 1
            results.append(texts)
        return results

    def _cut_at_stop(self, tokens: list[int], stops: tuple[str, ...]) -> tuple[str, list[int]]:
        """OpenAI's stop, as if streamed: generation ends at the token where the first stop completes, and the
        text ends where that stop starts. (text, tokens) up to there; call with the text lock held."""
        for n in range(1, len(tokens) + 1):
            head = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            starts = [i for i in (head.find(s) for s in stops) if i >= 0]
            if starts:
                return head[:min(starts)], tokens[:n]
        raise AssertionError("called without a stop in the decoded text")

    def load(self, name: str, path: str) -> None:
        """Load the adapter folder at `path` as `name` (between batches)."""
        problem = name_problem(name)
        if problem:
            raise RequestError(400, problem)
        with self.lock:
            if name in list_adapters(self.model):
                raise RequestError(409, f"adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first")
            try:
                load_servable(self.model, name, path)
            except (ValueError, FileNotFoundError, OSError) as e:
                raise RequestError(400, f"cannot load adapter {name!r} from {path!r}: {e}") from e

    def unload(self, name: str) -> None:
        """Drop adapter `name` and free its tensors (between batches)."""
        with self.lock:
            if name == BASE or name not in list_adapters(self.model):
                raise RequestError(404, f"no adapter named {name!r}; loaded: {list_adapters(self.model)}", "model_not_found")
            delete_adapter(self.model, name)


def load_servable(model: nn.Module, name: str, path: str) -> None:
    """Load an adapter that can share mixed batches; one that trains the base model's biases cannot (its biases
    are the base's own, not per row), so it is refused and the model left as it was."""
    load_adapter(model, path, adapter=name)
    changed = list(get_state(model).adapters[name].base_values)
    if changed:
        delete_adapter(model, name)
        raise ValueError(
            f"adapter {name!r} changes the base model's own weights ({changed[0]!r}: trained biases, bias='all' or "
            "'lora_only', or base weights saved in its file such as a resized embedding), which rows of a mixed "
            "batch cannot hold per row, so a multi-adapter server cannot serve it; train it with bias='none' "
            "(lora_bias=True gives B its own bias), or serve it on a server of its own after merging it"
        )
    if trained_on_chat_template(path):
        log.warning("adapter %r was trained on prompts in the tokenizer's chat template: send its requests to "
                    "/v1/chat/completions (/v1/completions passes the prompt to the model as it is)", name)


def trained_on_chat_template(path: str) -> bool:
    """Whether the finetune run that wrote adapter folder `path` templated its prompts (its run_finished.json says so)."""
    try:
        record = json.loads((Path(path).expanduser() / FINISHED_JSON).read_text())
    except (OSError, ValueError):  # no such file (another tool's adapter, a checkpoint's), or not JSON
        return False
    return isinstance(record, dict) and record.get("used_chat_template") is True


class Batcher:
    """Collects concurrent jobs for up to `max_wait` seconds / `max_batch` rows and runs them as one batch."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_wait: float = 0.01) -> None:
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.metrics = Metrics()
        self._pending: deque[Job] = deque()  # set aside by earlier batches, oldest first

    @property
    def depth(self) -> int:
        """Jobs waiting for a batch (queued, or set aside by an earlier batch)."""
        return self.queue.qsize() + len(self._pending)

    async def submit(self, job: Job) -> list[tuple[str, int, str]]:
        """Queue `job` and wait for its completions."""
        job.future = asyncio.get_running_loop().create_future()
        await self.queue.put(job)
        return await job.future

    async def _collect(self) -> list[Job]:
        """The next batch: the oldest waiting job, then every job waiting or arriving within `max_wait` that fits with
        it (samples alike, within `max_batch` rows and the context). The others wait, in arrival order, and the
        oldest of them starts the next batch: a request that samples otherwise never cuts a batch short."""
        first = self._pending.popleft() if self._pending else await self.queue.get()
        batch, rows = [first], len(first.prompts)
        width, new_tokens = max(map(len, first.prompts)), first.max_tokens

        def take(job: Job) -> bool:
            nonlocal rows, width, new_tokens
            w, n = max(width, *map(len, job.prompts)), max(new_tokens, job.max_tokens)
            # one generate runs every row to the longest prompt + the largest max_tokens: it must fit the context
            if job.sampling != first.sampling or rows + len(job.prompts) > self.max_batch or w + n > self.engine.max_context:
                return False
            batch.append(job)
            rows, width, new_tokens = rows + len(job.prompts), w, n
            return True

        waiting, self._pending = self._pending, deque()
        self._pending.extend(job for job in waiting if not take(job))
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while rows < self.max_batch:
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                job = await asyncio.wait_for(self.queue.get(), timeout) if timeout > 0 else self.queue.get_nowait()
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if not take(job):
                self._pending.append(job)
        return batch

    async def run(self) -> None:
        """The batching loop (one task for the app's lifetime)."""
        while True:
            batch = await self._collect()
            ready = []
            for job in batch:
                if job.future.done():  # cancelled: its client went away while it was queued
                    self.metrics.abandoned += 1
                    continue
                try:
                    self.engine.check_adapter(job.adapter)  # it may have been unloaded while queued
                    ready.append(job)
                except RequestError as e:
                    if not job.future.done():
                        job.future.set_exception(e)
            if not ready:
                continue
            try:
                results = await asyncio.to_thread(self.engine.generate, ready)
            except Exception as e:  # noqa: BLE001 - one failed batch must not stop the server
                log.exception("batch of %d jobs failed", len(ready))
                for job in ready:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            done = [(job, result) for job, result in zip(ready, results) if not isinstance(result, RequestError)]
            self.metrics.batches += bool(done)
            self.metrics.batch_rows += sum(len(job.prompts) for job, _ in done)
            self.metrics.batch_adapters += len({job.adapter for job, _ in done})
            for job, result in zip(ready, results):
                if job.future.done():
                    continue
                if isinstance(result, RequestError):  # its adapter was unloaded after the check above
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)


def prometheus_text(metrics: Metrics, engine: Engine, queue_depth: int) -> str:
    """The metrics in Prometheus' text exposition format."""
    lines = [
        "# TYPE lorakit_requests_total counter",
        *(f'lorakit_requests_total{{model="{k}"}} {v}' for k, v in sorted(metrics.requests.items())),
        "# TYPE lorakit_request_errors_total counter",
        *(f'lorakit_request_errors_total{{status="{k}"}} {v}' for k, v in sorted(metrics.errors.items())),
        "# TYPE lorakit_batches_total counter", f"lorakit_batches_total {metrics.batches}",
        "# TYPE lorakit_batch_rows_total counter", f"lorakit_batch_rows_total {metrics.batch_rows}",
        "# TYPE lorakit_batch_adapters_total counter", f"lorakit_batch_adapters_total {metrics.batch_adapters}",
        "# TYPE lorakit_prompt_tokens_total counter", f"lorakit_prompt_tokens_total {metrics.prompt_tokens}",
        "# TYPE lorakit_completion_tokens_total counter",
        f"lorakit_completion_tokens_total {metrics.completion_tokens}",
        "# TYPE lorakit_request_latency_seconds summary",
        f"lorakit_request_latency_seconds_sum {metrics.latency_sum:.6f}",
        f"lorakit_request_latency_seconds_count {metrics.latency_count}",
        "# TYPE lorakit_abandoned_requests_total counter", f"lorakit_abandoned_requests_total {metrics.abandoned}",
        "# TYPE lorakit_queue_depth gauge", f"lorakit_queue_depth {queue_depth}",
        "# TYPE lorakit_adapters_loaded gauge", f"lorakit_adapters_loaded {len(engine.adapters()) - 1}",
    ]
    return "\n".join(lines) + "\n"


class SamplingRequest(BaseModel):
    """Fields ``/v1/completions`` and ``/v1/chat/completions`` share (OpenAI's; `model` names the adapter, ``base`` for none)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field ("temprature") is a 400, never silently the default
    #: Fields whose null is an error, not their default.
    REQUIRED: ClassVar[tuple[str, ...]] = ("model",)
    #: OpenAI fields lorakit does not implement and their defaults (a tuple: any of these values), the only values
    #: accepted, so a client never gets silently other behaviour than it asked for.
    UNSUPPORTED: ClassVar[dict[str, Any]] = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": (None, {}),
                                             "seed": None, "stream_options": None}

    model: str = Field(description=f"the adapter's name, {BASE!r} for the base model; required, as in OpenAI's API")
    max_tokens: int | None = Field(None, ge=1, strict=True, description="null or left out: the endpoint's default")
    # strict: a number, never a string or bool ("0.5" is a client bug, as OpenAI's API says); ints are numbers
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False, strict=True,
                               description=f"below {MIN_TEMPERATURE:g}: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, strict=True)
    stop: str | list[str] | None = Field(None, description="up to 4 sequences; the text ends before the first one")
    stream: bool = Field(False, strict=True)
    n: int = Field(1, ge=1, le=1, strict=True, description="choices per prompt: only 1")
    presence_penalty: float = Field(0.0, strict=True)
    frequency_penalty: float = Field(0.0, strict=True)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, strict=True)  # rows sample together in a mixed batch: no per-request seed
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # OpenAI's end-user id: metadata, changes nothing

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        """OpenAI's API takes null for every optional field, meaning its default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.REQUIRED}
        return data

    def unsupported(self) -> list[str]:
        """The unimplemented fields this request sets to something other than their default."""
        return [k for k, d in self.UNSUPPORTED.items() if getattr(self, k) not in (d if isinstance(d, tuple) else (d,))]

    def stops(self) -> tuple[str, ...]:
        """`stop` as a tuple of non-empty strings (OpenAI allows up to 4)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise RequestError(400, f"stop takes up to 4 non-empty strings, got {stops!r}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):  # every decode step searches the text for each stop
            raise RequestError(400, f"each stop string may have up to {MAX_STOP_CHARS} characters")
        return tuple(stops)

    def checked_stops(self) -> tuple[str, ...]:
        """`stops`, after refusing what lorakit does not implement (streaming, unsupported fields) with a 400."""
        if self.stream:
            raise RequestError(400, "stream=true is not supported; send stream=false")
        unsupported = self.unsupported()
        if unsupported:
            raise RequestError(400, f"{', '.join(unsupported)} not supported by lorakit serve; leave them at "
                                    "their defaults (or out)")
        return self.stops()


class CompletionRequest(SamplingRequest):
    """Body of ``POST /v1/completions``: the prompt goes to the model as it is (OpenAI's semantics)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "prompt")
    UNSUPPORTED: ClassVar[dict[str, Any]] = {"echo": False, "logprobs": None, "best_of": (None, 1), "suffix": None,
                                             **SamplingRequest.UNSUPPORTED}

    prompt: str | list[str]
    n: int = Field(1, ge=1, le=1, strict=True, description="choices per prompt: only 1 (send a list of prompts for more)")
    echo: bool = Field(False, strict=True)
    logprobs: int | None = Field(None, strict=True)
    best_of: int | None = Field(None, strict=True)
    suffix: str | None = None


class ChatMessage(BaseModel):
    """One message of a chat: its role and its text."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingRequest):
    """Body of ``POST /v1/chat/completions``: the messages go to the model in the tokenizer's chat template."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "messages")
    UNSUPPORTED: ClassVar[dict[str, Any]] = {"logprobs": False, "top_logprobs": None, "tools": (None, []),
                                             "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
                                             **SamplingRequest.UNSUPPORTED}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True, description="max_tokens' newer name")
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, strict=True)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def limit(self) -> int | None:
        """The completion's token limit the request sets (`max_completion_tokens` or `max_tokens`), or None."""
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise RequestError(400, "send max_completion_tokens or max_tokens (its older name), not both")
        return self.max_completion_tokens or self.max_tokens


class AdapterRequest(BaseModel):
    """Body of ``POST /v1/adapters``: load the adapter folder at `path` (on the server) as `name`."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 400, as on the completion endpoints

    name: str
    path: str


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 as soon as it is known to be (its
    Content-Length, or the bytes received so far), never read whole: a huge body must not exhaust memory."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        received = int(declared) if declared.isdigit() else 0  # chunked: counted as it arrives

        async def limited() -> dict:
            nonlocal received
            if received <= self.limit:
                message = await receive()
                received += 0 if declared.isdigit() else len(message.get("body", b""))
                if received <= self.limit:
                    return message
            from fastapi import HTTPException  # raised where the route reads the body: the app's handler answers

            raise HTTPException(413, f"the request body is over this server's limit of {self.limit} bytes "
                                     "(lorakit serve --max-body-mb raises it)")

        await self.app(scope, limited, send)


def create_app(engine: Engine, max_batch: int = 8, max_wait: float = 0.01, max_body: int = int(MAX_BODY_MB * 2**20)) -> Any:
    """The FastAPI app: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/v1/adapters``, ``/health``, ``/metrics``.

    A request body over `max_body` bytes is refused (413) before it is read.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = Batcher(engine, max_batch=max_batch, max_wait=max_wait)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body)
    app.state.batcher = batcher

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        batcher.metrics.errors[status] += 1
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return error(e.status, e.message, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            if err.get("type") == "json_invalid":  # loc is ("body", <character offset>)
                detail = (err.get("ctx") or {}).get("error", "")
                parts.append(f"the body is not valid JSON (at character {err['loc'][-1]}{': ' + detail if detail else ''})")
                continue
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {err.get('msg')}")
            if where == "body" and "json" not in request.headers.get("content-type", ""):
                parts.append("send the body as JSON with the header 'content-type: application/json'")
        return error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        # a bug or a failed batch: still OpenAI's error shape, and counted at /metrics (uvicorn logs the traceback)
        return error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own errors (an unparsable body, an unknown route or method) in the same shape as ours
        detail = e.detail
        if e.status_code == 400 and detail == "There was an error parsing the body":  # its catch-all: say what to send
            detail = "the body could not be parsed as JSON (not UTF-8 text, or nested too deeply): send one flat JSON object"
        return error(e.status_code, f"{detail} ({request.method} {request.url.path})")

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' liveness probes
    async def health() -> dict:
        return {"status": "ok", "models": engine.adapters(), "queue_depth": batcher.depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return prometheus_text(batcher.metrics, engine, batcher.depth)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "lorakit"} for n in engine.adapters()]}

    async def answer(job: Job, request: Request, t0: float) -> tuple[list[tuple[str, int, str]], dict] | JSONResponse:
        """`job` through the batcher: its (text, tokens, finish_reason) per prompt and its usage; 499 if the client left."""
        batcher.metrics.requests[job.adapter] += 1
        waiter = asyncio.ensure_future(batcher.submit(job))
        while not (await asyncio.wait({waiter}, timeout=DISCONNECT_POLL))[0]:
            if await request.is_disconnected():  # a queued job is then skipped; a running batch finishes
                waiter.cancel()
                return error(499, "the client closed the request")
        result = waiter.result()
        m = batcher.metrics
        n_prompt, n_done = sum(len(p) for p in job.prompts), sum(n for _, n, _ in result)
        m.prompt_tokens, m.completion_tokens = m.prompt_tokens + n_prompt, m.completion_tokens + n_done
        m.latency_sum, m.latency_count = m.latency_sum + time.perf_counter() - t0, m.latency_count + 1
        return result, {"prompt_tokens": n_prompt, "completion_tokens": n_done, "total_tokens": n_prompt + n_done}

    async def completions(req: CompletionRequest, request: Request) -> dict:
        t0 = time.perf_counter()
        stops = req.checked_stops()
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts or len(prompts) > max_batch:
            raise RequestError(400, f"prompt must be a string or a list of 1..{max_batch} strings, got {len(prompts)}")
        engine.check_adapter(req.model)
        # a huge prompt must not stall the server; without max_tokens, the default shrinks to what fits the context
        ids = await asyncio.to_thread(engine.encode, prompts, req.max_tokens)
        max_tokens = req.max_tokens or min(DEFAULT_MAX_TOKENS, engine.max_new_tokens, engine.max_context - max(map(len, ids)))
        done = await answer(Job(req.model, ids, max_tokens, req.temperature, req.top_p, stops), request, t0)
        if isinstance(done, JSONResponse):
            return done
        result, usage = done
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                for i, (text, _, finish) in enumerate(result)
            ],
            "usage": usage,
        }

    async def chat_completions(req: ChatCompletionRequest, request: Request) -> dict:
        t0 = time.perf_counter()
        stops = req.checked_stops()
        limit = req.limit()
        engine.check_adapter(req.model)
        text = await asyncio.to_thread(engine.chat_prompt, [m.model_dump() for m in req.messages])
        ids = await asyncio.to_thread(engine.encode, [text], limit, ["the templated conversation"])
        # OpenAI's chat default: no limit but the context's (here also the server's --max-tokens)
        max_tokens = limit or min(engine.max_new_tokens, engine.max_context - len(ids[0]))
        done = await answer(Job(req.model, ids, max_tokens, req.temperature, req.top_p, stops), request, t0)
        if isinstance(done, JSONResponse):
            return done
        [(reply, _, finish)], usage = done
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": usage,
        }

    # FastAPI reads the annotations as strings (`from __future__ import annotations`): the locally imported
    # Request must be given as the class, or it would be taken for a query parameter
    for path, endpoint in (("/v1/completions", completions), ("/v1/chat/completions", chat_completions)):
        endpoint.__annotations__["request"] = Request
        app.post(path)(endpoint)

    @app.get("/v1/adapters")
    async def adapters() -> dict:
        return {"adapters": engine.adapters()[1:]}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(req: AdapterRequest) -> dict:
        await asyncio.to_thread(engine.load, req.name, req.path)
        return {"loaded": req.name, "adapters": engine.adapters()[1:]}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict:
        await asyncio.to_thread(engine.unload, name)
        return {"deleted": name, "adapters": engine.adapters()[1:]}

    return app


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
