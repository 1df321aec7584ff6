"""The Python MCP SDK (pinned in requirements.txt) as a test client of Custody.

Over stdio (the command after the options, e.g. `custody mcp`) or Streamable
HTTP (--url, with --token and the cluster CA), in --mode legacy (the
initialize handshake) or auto (2026-07-28 `server/discover`). Lists the tools,
makes the calls in --calls-file (JSON), and prints one JSON object.
"""

import argparse
import asyncio
import json
import os

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import Implementation


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="auto")
    p.add_argument("--url")
    p.add_argument("--token")
    p.add_argument("--ca")
    p.add_argument("--calls-file", help="a JSON list of calls")
    p.add_argument("--traceparent")
    p.add_argument("command", nargs="*")
    a = p.parse_args()
    if a.url:
        http = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {a.token}"}, verify=a.ca, timeout=60
        )
        server = streamable_http_client(a.url, http_client=http)
    else:
        server = StdioServerParameters(
            command=a.command[0], args=a.command[1:], env=dict(os.environ)
        )
    out = {"tools": [], "results": []}
    info = Implementation(name="custody-e2e-python", version="2.3.0")
    async with Client(server, mode=a.mode, client_info=info) as c:
        tools = await c.list_tools()
        out["tools"] = [
            {
                "name": t.name,
                "annotations": t.annotations.model_dump(exclude_none=True, by_alias=True)
                if t.annotations
                else None,
            }
            for t in tools.tools
        ]
        calls = []
        if a.calls_file:
            with open(a.calls_file) as f:
                calls = json.load(f)
        for call in calls:
            meta = {"traceparent": a.traceparent} if a.traceparent else None
            try:
                r = await c.call_tool(call["name"], call["arguments"], meta=meta)
                text = "".join(
                    x.text for x in r.content if getattr(x, "type", "") == "text"
                )
                out["results"].append(
                    {
                        "is_error": bool(r.is_error),
                        "text": text,
                        "structured": r.structured_content,
                    }
                )
            except Exception as e:  # a JSON-RPC error: reported, not raised
                out["results"].append({"protocol_error": str(e)})
    print(json.dumps(out))


asyncio.run(main())
