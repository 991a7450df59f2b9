"""The OpenAI-compatible server on a tiny random Llama plan, driven over HTTP with httpx.

uvicorn runs in a thread on a free port; the engine runs on the CPU. The tokenizer is a real
Hugging Face fast tokenizer built in memory (one token per character, a chat template), since
nothing can be downloaded here.
"""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from specontext_compiler import compile_model, load_plan  # noqa: E402
from specontext_compiler.models import load_preset_config  # noqa: E402
from specontext_compiler.serve import create_app  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One token per character: specials 0-2, printable ASCII and newline, filler up to vocab_size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    chars += [chr(0x100 + i) for i in range(vocab_size - 3 - len(chars))]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, engine-alone greedy reference, server, app) for a tiny plan served with 4 slots."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_preset_config("tiny-llama"), dtype=torch.float32).eval()
    out = tmp_path_factory.mktemp("plans") / "serve"
    compile_model("tiny-llama", target="h100", max_len=256, budget=256, recent_tokens=0, out=out)
    plan = load_plan(out)
    tokenizer = char_tokenizer(model.config.vocab_size)
    engine = plan.bind(model, device="cpu", batch=4, tokenizer=tokenizer)
    engine.prefill_chunk = 16                 # prompts of 20-60 tokens span several steps
    solo = plan.bind(model, device="cpu", batch=1, tokenizer=tokenizer)
    app = create_app(engine, model_name="tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)

    def alone(prompt_ids, n):
        return solo.generate([prompt_ids], max_new_tokens=n, stop_at_eos=False)[0].token_ids

    yield url, alone, server, app
    server.should_exit = True
    thread.join(10)


def complete(url, **body):
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def test_models_health_and_a_completion(served):
    url, alone, _, _ = served
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    reply = complete(url, prompt="Hello there", max_tokens=5, temperature=0, ignore_eos=True,
                     return_token_ids=True).json()
    assert "choices" in reply, reply
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and reply["usage"] == {
        "prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}
    prompt_ids = [ord(c) - 29 for c in "Hello there"]        # the char tokenizer's ids
    assert choice["token_ids"] == alone(prompt_ids, 5)


def test_chat_uses_the_template_and_streams_the_same_text(served):
    url, _, _, _ = served
    body = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    whole = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    assert whole["object"] == "chat.completion" and whole["usage"]["prompt_tokens"] == len("<user>Hi!\n<assistant>")
    text = whole["choices"][0]["message"]["content"]
    chunks = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    events = [json.loads(c) for c in chunks[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == text
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_completion_joins_to_the_whole_one(served):
    url, _, _, _ = served
    body = {"prompt": "abc", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = complete(url, **body).json()["choices"][0]["text"]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == whole


def test_eight_concurrent_requests_each_equal_generate_alone(served):
    url, alone, _, app = served
    torch.manual_seed(5)
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (20, 7, 45, 12, 60, 3, 33, 18)]
    lengths = [12, 3, 7, 20, 5, 16, 2, 9]

    def one(i):
        return complete(url, prompt=prompts[i], max_tokens=lengths[i], temperature=0, ignore_eos=True,
                        return_token_ids=True).json()["choices"][0]["token_ids"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    for prompt, n, tokens in zip(prompts, lengths, got):
        assert tokens == alone(prompt, n)
    metrics = httpx.get(url + "/metrics").json()
    assert metrics["generated_tokens"] >= sum(lengths) and metrics["slots"] == 4
    assert metrics["queue_length"] == 0 and metrics["running_requests"] == 0 and metrics["device_kv_bytes"] > 0


@pytest.mark.parametrize("body, reason", [
    ({"prompt": "", "max_tokens": 4}, "prompt is empty"),
    ({"prompt": "x" * 250, "max_tokens": 10}, "max-len is 256"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens must be a number"),
    ({"prompt": "hi", "n": 3}, "n=3"),
    ({"prompt": ["a", "b"]}, "one prompt per request"),
    ({"prompt": [1, 999999]}, "outside the vocabulary"),
])
def test_bad_requests_get_400_with_one_line_and_the_server_serves_on(served, body, reason):
    url, _, _, _ = served
    reply = complete(url, **body)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert reason in message and "\n" not in message
    assert complete(url, prompt="ok", max_tokens=2, temperature=0).status_code == 200


def test_malformed_json_and_chat_without_messages_are_400(served):
    url, _, _, _ = served
    assert httpx.post(url + "/v1/completions", content=b"{nope", timeout=30).status_code == 400
    reply = httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert reply.status_code == 400 and "messages" in reply.json()["error"]["message"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_a_step_that_fails_ends_its_requests_with_an_error_and_the_server_serves_on(served, monkeypatch):
    url, _, _, app = served
    engine = app.state.loop.engine
    real_decode, calls = engine.decode, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(engine, "decode", fails_once)
    reply = complete(url, prompt="abc", max_tokens=4, temperature=0)
    assert reply.status_code == 500 and reply.json()["error"]["message"] == (
        "RuntimeError: CUDA error: an illegal memory access was encountered")
    again = complete(url, prompt="abc", max_tokens=4, temperature=0, ignore_eos=True)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(url + "/metrics").json()["failed_steps"] == 1


def test_shutdown_stops_the_server_and_the_serving_thread(served):
    url, _, server, app = served
    loop = app.state.loop
    server.should_exit = True
    for _ in range(200):
        if not loop._thread.is_alive():
            break
        time.sleep(0.05)
    assert not loop._thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
