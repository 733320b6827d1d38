"""The server's contract with programs we did not write: its OpenAPI document holds under a
fuzzer (schemathesis, every check), 405s say what is allowed, and /metrics stays bounded."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from minigpt.engine import Engine
from minigpt.model import GPT
from minigpt.serve.metrics import UNMATCHED
from tests.conftest import REPO, tiny_config
from tests.test_serve import N_VOCAB, LiveServer

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def live():
    """A server with an API key, whose context (32) keeps every fuzzed generation short."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    engine = Engine(GPT(tiny_config(block_size=32)).eval(), N_VOCAB)
    server = LiveServer(engine, max_batch=4, max_queue=16, api_keys=(KEY,))
    yield server
    server.close()


def series(live, name: str) -> list[str]:
    text = httpx.get(live.url + "/metrics").text
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_schemathesis_with_every_check_finds_no_failure(live, tmp_path):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [schemathesis, "--config-file", REPO / "tests" / "data" / "schemathesis.toml", "run",
         live.url + "/openapi.json", "--checks", "all", "--seed", "0", "--max-examples", "20",
         "--workers", "1", "--request-timeout", "30", "-H", f"Authorization: Bearer {KEY}",
         "--report", "junit", "--report-dir", tmp_path],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    generated = re.search(r"(\d+) generated, (\d+) passed", summary)
    assert generated and generated[1] == generated[2] and int(generated[1]) >= 200, summary
    # each documented operation was exercised, the protected ones with and without the key
    assert len(series(live, "minigpt_requests_total")) <= 40


def test_the_document_declares_bodies_errors_and_the_metrics_text(live):
    document = httpx.get(live.url + "/openapi.json").json()
    chat = document["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert "messages" in body["required"] and body["properties"]["n"]["maximum"] == 4
    assert {"400", "401", "404", "405", "413", "415", "503"} <= set(chat["responses"])
    error = chat["responses"]["401"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {
        "text/plain"
    }
    assert "401" not in document["paths"]["/health"]["get"]["responses"]  # open to all


def test_405_answers_carry_allow(live):
    r = httpx.delete(live.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"] == "Method Not Allowed"
    r = httpx.post(live.url + "/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_metrics_label_requests_by_route_template_not_raw_path(live):
    headers = {"Authorization": f"Bearer {KEY}"}
    for i in range(30):
        httpx.get(f"{live.url}/probe-{i}%5C")
        httpx.get(f"{live.url}/v1/models/other-{i}", headers=headers)
    lines = series(live, "minigpt_requests_total")
    endpoints = {re.search(r'endpoint="([^"]*)"', line)[1] for line in lines}
    assert UNMATCHED in endpoints and "/v1/models/{name}" in endpoints
    assert not any("probe" in e or "other-" in e for e in endpoints)
    unmatched = next(line for line in lines if f'"{UNMATCHED}"' in line and '"404"' in line)
    assert float(unmatched.split()[-1]) >= 30


def test_a_short_soak_keeps_answers_exact_memory_flat_and_slots_free():
    """bench/serve_soak.py shortened: 64 clients for 8 s against a `minigpt serve` process."""
    sys.path.insert(0, str(REPO / "bench"))
    import serve_soak

    result = serve_soak.soak_server(clients=64, seconds=8, rss_bound_mib=32)
    assert result["failures"] == [], result
    assert set(result["by_kind"]) == set(serve_soak.KINDS)  # every misbehaviour was tried
    assert not any(int(status) >= 500 for status in result["statuses"])
    assert result["greedy_compared"] >= 50 and result["greedy_mismatches"] == 0
    assert result["queue_depth_end"] == result["batch_size_end"] == 0
    assert result["request_series"] <= 20
