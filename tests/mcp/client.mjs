// The npm MCP SDK (@modelcontextprotocol/sdk, pinned by package-lock.json)
// as a test client of `custody mcp` over stdio.
// Usage: node client.mjs COMMAND ARGS...   with MCP_CALLS='[{"name":..., "arguments":...}]'
// Prints {"tools": [...], "results": [...]} as one JSON line.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const [command, ...args] = process.argv.slice(2);
const calls = JSON.parse(process.env.MCP_CALLS ?? "[]");
const transport = new StdioClientTransport({ command, args, env: process.env, stderr: "inherit" });
const client = new Client({ name: "custody-e2e-npm", version: "1.0.0" });
await client.connect(transport);
const tools = await client.listTools();
const results = [];
for (const c of calls) {
  const r = await client.callTool({ name: c.name, arguments: c.arguments });
  results.push({
    is_error: Boolean(r.isError),
    text: r.content.filter((x) => x.type === "text").map((x) => x.text).join(""),
    structured: r.structuredContent ?? null,
  });
}
console.log(JSON.stringify({ tools: tools.tools.map((t) => ({ name: t.name, annotations: t.annotations ?? null })), results }));
await client.close();
