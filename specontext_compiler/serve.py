"""`specontext serve`: an OpenAI-compatible HTTP server over a bound plan (FastAPI + uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template), both with
`stream: true` as server-sent events; GET /v1/models, /health, /metrics. Requests go to one
ServingLoop (runtime/serving_loop.py), which batches them continuously. A request that cannot be
served (empty, too long for the plan, bad parameters, malformed JSON) gets HTTP 400 with a
one-line reason before it reaches the engine; a request that fails inside the engine ends alone.
"""

import contextlib
import json
import sys
import time
import uuid
from typing import Any

from specontext_compiler.errors import RequestError
from specontext_compiler.runtime.sampling_params import SamplingParams

_SAMPLING_FIELDS = {"max_tokens": int, "temperature": (int, float), "top_p": (int, float), "top_k": int,
                    "seed": int, "ignore_eos": bool}


def create_app(engine, model_name: str, loop=None):
    """The ASGI app serving `engine` under `model_name`; starts a ServingLoop unless given one."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from specontext_compiler.runtime.serving_loop import ServingLoop
    loop = loop or ServingLoop(engine).start()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        loop.stop()                   # server shutdown: end the requests left, then the thread

    app = FastAPI(title="specontext", version="1", lifespan=lifespan)
    app.state.loop = loop

    @app.exception_handler(RequestError)
    async def bad_request(_request, exc: RequestError):
        return JSONResponse(status_code=400, content={"error": {
            "message": " ".join(str(exc).split()), "type": "invalid_request_error"}})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "specontext",
                                            "max_model_len": engine.max_len}]}

    @app.get("/metrics")
    def metrics() -> dict:
        return loop.metrics()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        prompt_ids = _prompt_ids(engine, body.get("prompt"))
        return await _respond(loop, body, prompt_ids, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        prompt_ids = _chat_ids(engine, body.get("messages"))
        return await _respond(loop, body, prompt_ids, model_name, chat=True)

    return app


async def _json_body(request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def sampling_params(body: dict) -> SamplingParams:
    """SamplingParams from an OpenAI request body (OpenAI's defaults: 16 tokens, temperature 1)."""
    fields: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0}
    for name, kind in _SAMPLING_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise RequestError(f"{name} must be {'a boolean' if kind is bool else 'a number'}, got {value!r}")
        fields[name] = value
    if body.get("max_completion_tokens") is not None:
        fields["max_tokens"] = body["max_completion_tokens"]
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a non-empty string or a list of them")
    if body.get("n", 1) != 1:
        raise RequestError(f"n={body.get('n')!r} is not supported; send one request per completion")
    params = SamplingParams(stop=tuple(stop), **fields)
    params.check()
    return params


def _prompt_ids(engine, prompt) -> list[int]:
    """A completion prompt: a string, or a list of token ids (one prompt per request)."""
    if isinstance(prompt, str):
        if engine.tokenizer is None:
            raise RequestError("this server has no tokenizer; send the prompt as a list of token ids")
        return list(engine.tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise RequestError("prompt must be a string or a list of token ids (one prompt per request)")


def _chat_ids(engine, messages) -> list[int]:
    """The chat prompt: the tokenizer's chat template applied to the messages, generation prompt added."""
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise RequestError("messages must be a non-empty list of {role, content} objects with string content")
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("the model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


async def _respond(loop, body: dict, prompt_ids: list[int], model_name: str, chat: bool):
    from fastapi.responses import JSONResponse, StreamingResponse
    params = sampling_params(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be a boolean, got {stream!r}")
    loop.scheduler.check(prompt_ids, params)     # 400 now, not an error event later
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": model_name}
    outputs = loop.stream(prompt_ids, params)
    if stream:
        return StreamingResponse(_events(outputs, meta, chat), media_type="text/event-stream")
    text, token_ids, last = "", [], None
    async for out in outputs:
        text += out.text
        token_ids += [out.token_id] if out.token_id is not None else []
        last = out
    if last.error is not None:
        return JSONResponse(status_code=500, content={"error": {"message": last.error, "type": "server_error"}})
    return _final(meta, chat, text, token_ids, last, body.get("return_token_ids", False))


def _final(meta: dict, chat: bool, text: str, token_ids: list[int], last, with_ids: bool) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    if with_ids:
        choice["token_ids"] = token_ids
    usage = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
             "total_tokens": last.prompt_tokens + last.completion_tokens}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage}


async def _events(outputs, meta: dict, chat: bool):
    """Server-sent events: one chunk per output with text (the role first, for chat), then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        yield _event({**meta, "object": kind, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                           "finish_reason": None}]})
    async for out in outputs:
        if out.error is not None:
            yield _event({"error": {"message": out.error, "type": "server_error"}})
            break
        if not out.text and out.finish_reason is None:
            continue
        choice = {"index": 0, "finish_reason": out.finish_reason}
        choice.update({"delta": {"content": out.text}} if chat else {"text": out.text, "logprobs": None})
        yield _event({**meta, "object": kind, "choices": [choice]})
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def serve(plan_dir, model: str | None, host: str, port: int, dlm: str | None = None) -> None:
    """Bind the plan to its weights and serve until interrupted."""
    import uvicorn

    from specontext_compiler.runtime.plan import load_plan
    plan = load_plan(plan_dir)
    source = resolve_model(plan, model)
    from specontext_compiler.dlm import head_for_plan
    engine = plan.bind(source, dlm=head_for_plan(dlm, plan) if dlm else None)
    seconds = engine.warm_up()         # compile and capture now, not in the first request's latency
    print(f"note: warmed up in {seconds:.1f} s (kernels compiled, decode step captured)", file=sys.stderr)
    uvicorn.run(create_app(engine, model_name=str(model or plan.model.source or plan_dir)),
                host=host, port=port, log_level="info")


def resolve_model(plan, model: str | None) -> str:
    """The weights to bind: the given path, 'smollm2' (the packaged GGUF), or the plan's recorded source."""
    from pathlib import Path

    from specontext_compiler.errors import PlanError
    chosen = model or plan.model.source
    if not chosen:
        raise PlanError("the plan records no model source; pass --model DIR")
    if str(chosen).lower() == "smollm2":
        from specontext_compiler.smollm2 import find_gguf
        return str(find_gguf())
    if model is None and not Path(str(chosen)).exists():
        raise PlanError(f"the plan was compiled from {chosen}, which is not a local path here; pass --model DIR")
    return str(chosen)
