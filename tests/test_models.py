"""Several models behind one gateway, through the real OpenAI Python client: `pdgate up` with two
[[models]] entries starts a prefill and a decode reference engine for each, and the client sees
both models listed, each answering as itself (the engine that served names its own model), an
alias answering as the model it names, and an unknown model as a NotFoundError."""

import json
import urllib.request

import openai
import pytest

from conftest import _free_port, _plain_ready, start_up, stop_up

SMALL, LARGE = "pdgate-sim-8b", "pdgate-sim-70b"

CONFIG = f"""
[up]
prefill = 1
decode = 1

[[models]]
name = "{SMALL}"
aliases = ["sim-small"]

[[models]]
name = "{LARGE}"

[models.scheduler]
policy = "least_load"
"""


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("models") / "two-models.toml"
    cfg.write_text(CONFIG)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_up(["--config", str(cfg), "--port", str(port), "--time-scale", "0.01"], base, _both_ready)
    yield base
    stop_up(proc)


def _both_ready(base):
    """Ready for this test: every model has a healthy pair (the gateway is ready with one)."""
    if not _plain_ready(base):
        return False
    with urllib.request.urlopen(f"{base}/ready", timeout=1) as r:
        return all(m["ready"] for m in json.load(r)["models"].values())


@pytest.fixture()
def client(two_models):
    return openai.OpenAI(base_url=f"{two_models}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_lists_both(client):
    models = client.models.list().data
    assert [m.id for m in models] == [SMALL, LARGE]
    assert models[0].model_extra.get("aliases") == ["sim-small"]


@pytest.mark.parametrize("asked, served", [(SMALL, SMALL), (LARGE, LARGE), ("sim-small", SMALL)])
def test_each_model_answers_as_itself(client, asked, served):
    r = client.chat.completions.create(model=asked, messages=[{"role": "user", "content": "who are you?"}], max_tokens=4)
    # The reference engine refuses a model it does not serve, and names its own in the answer.
    assert r.model == served
    assert r.usage.completion_tokens == 4


def test_streamed_completions_reach_the_model_named(client):
    stream = client.completions.create(model=LARGE, prompt="count to three", max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks and all(c.model == LARGE for c in chunks)


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
