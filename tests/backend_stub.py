"""A small OpenAI-compatible engine for contract tests: replies as vLLM 0.32 does, records requests.

Chat completions, the completions API with token-id prompts (``return_token_ids``), ``/tokenize``,
``/classify`` and embeddings.

Started on 127.0.0.1 (a free port) in a daemon thread; stopped by the fixture. Behaviour is
scripted per test: queued failures per path, a delay, replies for ``/classify`` and embeddings.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

VANILLA = ["Sure", ",", " here", " is", " how", "."]


@dataclass
class Stub:
    """Scripting knobs and the recorded requests."""

    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: path -> queue of ("ok", None) | ("status", code) | ("raw", text) | ("sleep", seconds)
    #: | ("no_done", None), applied to that path's requests in order
    failures: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    delay: float = 0.0
    vanilla: list[str] = field(default_factory=lambda: list(VANILLA))
    #: sentences after which a candidate ends the answer with EOS
    eos_after: int = 2
    reward: float = -2.5
    #: text -> embedding for /v1/embeddings text inputs; images get ``image_embedding``
    text_embedding: list[float] = field(default_factory=lambda: [1.0, 0.0, 0.0])
    image_embedding: list[float] = field(default_factory=lambda: [0.6, 0.8, 0.0])
    choices_override: int | None = None
    #: room left in the "context": candidates never get more tokens (vLLM clamps max_tokens)
    context_left: int | None = None
    #: when set and the request offers tools, the vanilla answer is these calls (``{"name",
    #: "arguments": JSON str}``), streamed as vLLM streams parsed calls (``tool_calls`` deltas)
    tool_calls: list[dict[str, str]] | None = None
    #: the served model's tokenizer (a transformers tokenizer) for ``/tokenize`` and the
    #: completions API's token ids; None: one id per character (its code point), EOS = 0
    tokenizer: Any = None
    max_model_len: int = 4096
    #: the completions API's candidates as (prompt ids, [sampled ids of each choice]), in order
    sampled: list[tuple[list[int], list[list[int]]]] = field(default_factory=list)
    #: requests inside their ``delay`` now, and the most seen at once (overlap, without timing)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    def reset(self) -> Stub:
        """Forget recorded requests and queued failures; scripting knobs back to their defaults."""
        self.requests.clear()
        self.failures.clear()
        self.delay, self.choices_override, self.eos_after = 0.0, None, 2
        self.context_left, self.reward = None, -2.5
        self.tokenizer, self.max_model_len = None, 4096
        self.vanilla = list(VANILLA)
        self.sampled.clear()
        self.in_flight = self.max_in_flight = 0
        return self

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.requests if p == path]


def build_app(stub: Stub) -> FastAPI:
    app = FastAPI()

    async def scripted(path: str, body: dict[str, Any]) -> Any:
        stub.requests.append((path, body))
        if stub.delay:
            stub.in_flight += 1
            stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
            try:
                await asyncio.sleep(stub.delay)
            finally:
                stub.in_flight -= 1
        queue = stub.failures[path]
        if not queue:
            return None
        kind, value = queue.popleft()
        if kind == "ok":
            return None
        if kind == "status":
            return JSONResponse(
                {"error": {"message": f"injected {value}", "type": "Stub", "code": value}},
                status_code=value,
            )
        if kind == "raw":
            return PlainTextResponse(value)
        if kind == "sleep":
            await asyncio.sleep(value)
            return None
        return kind  # e.g. "no_done", handled by the route

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        special = await scripted("/v1/chat/completions", body)
        if special is not None and not isinstance(special, str):
            return special
        seed = body.get("seed")
        if seed is not None and not -(2**63) <= seed < 2**63:  # vLLM: torch.long's range
            return JSONResponse(
                {"error": {"message": "seed out of range", "type": "BadRequestError", "code": 400}},
                status_code=400,
            )
        prompt_tokens = sum(len(json.dumps(m)) // 8 for m in body["messages"])
        if body.get("stream"):
            return StreamingResponse(
                _stream(stub, body, prompt_tokens, no_done=special == "no_done"),
                media_type="text/event-stream",
            )
        n = body.get("n", 1)
        prefix = body["messages"][-1]["content"] if body.get("continue_final_message") else ""
        sentences = prefix.count(".")
        choices = []
        for i in range(stub.choices_override or n):
            ends = sentences + 1 >= stub.eos_after
            text = f" Candidate {i} of step {sentences + 1}."
            tokens = list(range(100, 100 + len(text.split()) + (1 if ends else 0)))
            finish, stop_reason = "stop", None if ends else 13
            budget = min(body["max_tokens"], stub.context_left or body["max_tokens"])
            if len(tokens) > budget:  # the budget cuts the sentence: one word a token
                tokens = tokens[:budget]
                text = "".join(" " + w for w in text.split()[: len(tokens)])
                finish, stop_reason = "length", None
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    # vLLM: EOS -> finish "stop", stop_reason None; a stop token -> its id
                    "finish_reason": finish,
                    "stop_reason": stop_reason,
                    "token_ids": tokens if body.get("return_token_ids") else None,
                }
            )
        completion = sum(len(c["token_ids"] or [1]) for c in choices)
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        body = await request.json()
        special = await scripted("/tokenize", body)
        if special is not None:
            return special
        tokens = _Tokens(stub.tokenizer)
        if "messages" in body:
            ids = tokens.chat(body["messages"], body.get("add_special_tokens", False))
        else:
            ids = tokens.encode(body["prompt"], body.get("add_special_tokens", True))
        return {"count": len(ids), "max_model_len": stub.max_model_len, "tokens": ids}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        """vLLM's completions API with ``prompt`` as token ids: candidates as ids, faithfully."""
        body = await request.json()
        special = await scripted("/v1/completions", body)
        if special is not None:
            return special
        prompt = body["prompt"]
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return JSONResponse(
                {"error": {"message": "stub: prompt ids only", "type": "BadRequest", "code": 400}},
                status_code=400,
            )
        if body.get("stream"):  # a greedy continuation: the vanilla pieces, as text chunks
            return StreamingResponse(
                _stream(stub, body, len(prompt), no_done=False, chat=False),
                media_type="text/event-stream",
            )
        tokens = _Tokens(stub.tokenizer)
        context = tokens.decode(prompt)
        sentences = context[context.lower().rfind("assistant") :].count(".")
        budget = min(body["max_tokens"], stub.context_left or body["max_tokens"])
        choices, sampled = [], []
        for i in range(stub.choices_override or body.get("n", 1)):
            ends = sentences + 1 >= stub.eos_after
            ids = tokens.sampled(f" Candidate {i} of step {sentences + 1}.")
            ids += [tokens.eos] if ends else []
            finish, stop_reason = "stop", None if ends else ids[-1]
            if len(ids) > budget:
                ids, finish, stop_reason = ids[:budget], "length", None
            sampled.append(ids)
            choices.append(
                {
                    "index": i,
                    # decoded in its context, as vLLM's incremental detokenizer does
                    "text": tokens.decode(prompt + ids)[len(context) :],
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": stop_reason,
                    "token_ids": ids if body.get("return_token_ids") else None,
                    "prompt_token_ids": prompt if body.get("return_token_ids") else None,
                }
            )
        stub.sampled.append((list(prompt), sampled))
        completion = sum(len(ids) for ids in sampled)
        return {
            "id": "cmpl-stub",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion,
                "total_tokens": len(prompt) + completion,
            },
        }

    @app.post("/classify")
    async def classify(request: Request) -> Any:
        body = await request.json()
        special = await scripted("/classify", body)
        if special is not None:
            return special
        return {
            "id": "classify-stub",
            "object": "list",
            "created": int(time.time()),
            "model": body["model"],
            "data": [
                {"index": 0, "label": "LABEL_0", "probs": [_reward(stub, body)], "num_classes": 1}
            ],
            "usage": {"prompt_tokens": 10, "total_tokens": 10, "completion_tokens": 0},
        }

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        body = await request.json()
        special = await scripted("/v1/embeddings", body)
        if special is not None:
            return special
        if "messages" in body:
            vectors = [stub.image_embedding]
        else:
            vectors = [stub.text_embedding for _ in body["input"]]
        return {
            "id": "embd-stub",
            "object": "list",
            "created": int(time.time()),
            "model": body["model"],
            "data": [
                {"index": i, "object": "embedding", "embedding": v} for i, v in enumerate(vectors)
            ],
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }

    return app


class _Tokens:
    """The stub engine's tokenizer: a transformers one, or one id per character (EOS = 0)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id if tokenizer is not None else 0

    def chat(self, messages: list[dict[str, Any]], add_special_tokens: bool) -> list[int]:
        """The generation prompt's ids, rendered as vLLM renders it: template, then tokenizer."""
        if self.tokenizer is None:
            text = "".join(f"{m['role']}: {_text_of(m['content'])}\n" for m in messages)
            return [ord(c) for c in text + "assistant:"]
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return self.encode(text, add_special_tokens)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self.tokenizer is None:
            return [ord(c) for c in text]
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(chr(i) for i in ids if i != self.eos)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sampled(self, text: str) -> list[int]:
        """Ids a sampler could draw for ``text``, but not the ones encoding it gives: its
        longest piece split into single characters (as a model samples ``▁ille`` ``gal``)."""
        ids = self.encode(text, False)
        if self.tokenizer is None:
            return ids
        pieces = self.tokenizer.convert_ids_to_tokens(ids)
        k = max(range(len(ids)), key=lambda j: len(pieces[j]))
        chars = self.tokenizer.convert_tokens_to_ids(list(pieces[k]))
        if self.tokenizer.unk_token_id in chars:
            return ids
        return ids[:k] + chars + ids[k + 1 :]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _reward(stub: Stub, body: dict[str, Any]) -> float:
    """``stub.reward`` plus a thousandth per character of the answer, so replies are told apart."""
    return stub.reward + len(body["messages"][-1]["content"]) / 1000


async def _stream(
    stub: Stub, body: dict[str, Any], prompt_tokens: int, *, no_done: bool, chat: bool = True
):
    """The vanilla pieces streamed as chat chunks (``delta.content``) or completions (``text``)."""
    base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "model": body["model"]}
    if chat:
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield f"data: {json.dumps({**base, 'choices': [first]})}\n\n"
    else:
        base["object"] = "text_completion"
    if chat and stub.tool_calls and body.get("tools") and body.get("tool_choice") != "none":
        async for event in _stream_tool_calls(stub, base, prompt_tokens):
            yield event
        return
    pieces = list(stub.vanilla)
    stop = body.get("stop") or []
    text, finish, stop_reason = "", "stop", None
    for piece in pieces[: body.get("max_tokens", 10**6)]:
        if any(s in text + piece for s in stop):
            stop_reason = next(s for s in stop if s in text + piece)
            break
        text += piece
        chunk = {"index": 0, "finish_reason": None}
        chunk.update({"delta": {"content": piece}} if chat else {"text": piece})
        yield f"data: {json.dumps({**base, 'choices': [chunk]})}\n\n"
        await asyncio.sleep(0)
    if body.get("max_tokens", 10**6) < len(pieces) and stop_reason is None:
        finish = "length"
    last = {"index": 0, "finish_reason": finish, "stop_reason": stop_reason}
    last.update({"delta": {}} if chat else {"text": ""})
    yield f"data: {json.dumps({**base, 'choices': [last]})}\n\n"
    n_out = min(len(pieces), body.get("max_tokens", 10**6))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out}
    usage["total_tokens"] = prompt_tokens + n_out
    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    if not no_done:
        yield "data: [DONE]\n\n"


async def _stream_tool_calls(stub: Stub, base: dict[str, Any], prompt_tokens: int):
    """Parsed calls as vLLM streams them: id and name first, then the arguments in pieces."""
    for index, call in enumerate(stub.tool_calls or []):
        head = {
            "index": index,
            "id": f"chatcmpl-tool-{index}",
            "type": "function",
            "function": {"name": call["name"], "arguments": ""},
        }
        args = call["arguments"]
        for delta in (
            head,
            {"index": index, "function": {"arguments": args[: len(args) // 2]}},
            {"index": index, "function": {"arguments": args[len(args) // 2 :]}},
        ):
            chunk = {"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}
            yield f"data: {json.dumps({**base, 'choices': [chunk]})}\n\n"
    last = {"index": 0, "delta": {}, "finish_reason": "tool_calls", "stop_reason": None}
    yield f"data: {json.dumps({**base, 'choices': [last]})}\n\n"
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }
    yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


class StubServer:
    """Runs :func:`build_app` with uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self) -> None:
        self.stub = Stub()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.stub.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(build_app(self.stub), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Stub:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the stub engine did not start within 10 s")
            time.sleep(0.01)
        return self.stub

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
