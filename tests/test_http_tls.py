"""HTTPS with certificates made in the test (trustme): HTTP/2 and HTTP/1.1 with httpx."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
import trustme

from tests.support.http import ApiServer
from tests.test_http_api import packet

Factory = Callable[..., AbstractAsyncContextManager[ApiServer]]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return cert_file, key_file, client


@pytest.mark.parametrize("http2", [True, False])
async def test_https_serves_http2_and_http1(
    api_factory: Factory, tls_files: tuple[Path, Path, ssl.SSLContext], http2: bool
) -> None:
    cert_file, key_file, client_ctx = tls_files
    env = {"HTTP_CERT_FILE": str(cert_file), "HTTP_KEY_FILE": str(key_file)}
    async with api_factory(env=env, verify=client_ctx) as server:
        assert server.url.startswith("https://localhost:")
        async with server.client("write", http2=http2, http1=not http2) as c:
            r = await c.get("/api/v1/ping")
            assert r.status_code == 200
            assert r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert r.headers["strict-transport-security"] == "max-age=31536000"
            assert "strict-transport-security" in (await c.get("/api/v1/nothing")).headers  # errors too
            r = await c.post("/api/v1/packets", json=packet())
            assert r.status_code == 201
            # SSE over TLS as well: the retry frame arrives.
            async with c.stream("GET", "/api/v1/events") as stream:
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    assert line.startswith("retry:")
                    break


async def test_client_without_the_ca_refuses_the_certificate(
    api_factory: Factory, tls_files: tuple[Path, Path, ssl.SSLContext]
) -> None:
    cert_file, key_file, client_ctx = tls_files
    env = {"HTTP_CERT_FILE": str(cert_file), "HTTP_KEY_FILE": str(key_file)}
    async with api_factory(env=env, verify=client_ctx) as server:
        async with httpx.AsyncClient(verify=ssl.create_default_context(), timeout=5) as stranger:
            with pytest.raises(httpx.ConnectError):
                await stranger.get(server.url + "/api/v1/ping")
        # ...while the trusting client still gets through afterwards.
        async with server.client() as c:
            assert (await c.get("/api/v1/ping")).status_code == 200


async def test_no_hsts_over_plain_http(api: ApiServer) -> None:
    async with api.client() as c:
        assert "strict-transport-security" not in (await c.get("/api/v1/ping")).headers
