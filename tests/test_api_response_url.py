"""responseUrl follows each request's own scheme and Host, also now that the shim remembers the
base URL it built for them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from engine.api.client import InProcessClient
from engine.api.rest import create_app
from harness.api_fakes import open_stack

pytestmark = pytest.mark.anyio


async def test_response_url_follows_each_requests_host_and_scheme(tmp_path: Path) -> None:
    body = {"prompt": "hello", "params": {}}
    async with open_stack(str(tmp_path / "keys.db")) as stack:
        app = create_app(InProcessClient(stack.servicer), stack.metrics)
        for base, host in (
            ("http://a.example:8080", None),
            ("http://a.example:8080", "b.example:9000"),
            ("https://a.example", None),
            ("http://a.example:8080", None),  # the first one again, remembered
            ("http://a.example:8080", "b.example:9000"),
        ):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base) as http:
                headers = {"apiKey": stack.alice}
                if host is not None:
                    headers["Host"] = host
                r = await http.post("/v1/submit", json=body, headers=headers)
                assert r.status_code == 200, r.text
                data = r.json()["data"]
                scheme = base.split("://")[0]
                where = host or base.split("://")[1]
                assert data["responseUrl"] == f"{scheme}://{where}/v1/response/{data['id']}"
