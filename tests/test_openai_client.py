"""The real OpenAI Python client against `pdgate up`, unchanged: chat and completions, streaming
and not, include_usage, and the error cases it must see as proper OpenAI errors."""

import httpx
import openai
import pytest

MODEL = "pdgate-sim-8b"


@pytest.fixture()
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_non_streaming(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=6,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    again = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=6,
    )
    assert again.choices[0].message.content == r.choices[0].message.content


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream a reply"}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert len(content_chunks) == 9
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text.strip()
    final = chunks[-1]
    assert final.choices == []
    assert final.usage.completion_tokens == 9


def test_completions_non_streaming_and_streaming(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 4
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, stream=True)]
    assert len(pieces) == 4
    assert "".join(pieces) == r.choices[0].text


def test_completions_batched_prompts(client):
    prompts = ["Once upon a time", "In a galaxy far away"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=3) for p in prompts]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert r.usage.total_tokens == sum(s.usage.total_tokens for s in singles)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=3)
    assert e.value.body["param"] == "prompt"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found"


def test_empty_messages_is_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[])
    assert e.value.body["param"] == "messages"


def test_missing_messages_and_bad_json_are_400(gateway):
    r = httpx.post(f"{gateway}/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{gateway}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"


def test_request_id_is_echoed(gateway):
    r = httpx.post(
        f"{gateway}/v1/completions",
        json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
        headers={"x-request-id": "py-e2e-1"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "py-e2e-1"
    assert r.json()["id"] == "cmpl-py-e2e-1"


def test_kv_really_moved(gateway, client):
    before = httpx.get(f"{gateway}/metrics").text
    client.completions.create(model=MODEL, prompt="a prompt long enough to fill blocks " * 20, max_tokens=2)
    after = httpx.get(f"{gateway}/metrics").text

    def value(text, name):
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    moved = value(after, "pdgate_kv_transfer_bytes_total") - value(before, "pdgate_kv_transfer_bytes_total")
    assert moved >= 8 * 16 * 8192, f"only {moved} KV bytes moved"
