#!/usr/bin/env node
// Streams a completion from tessera's front door, tessera.tokenizer.v1.TextGeneration/Generate, in Node.js.
//
//   node generate.js ADDRESS TEXT [--max-tokens N] [--temperature T] [--stop S]... [--chat] [--timeout SECONDS]
//   node generate.js 127.0.0.1:50051 "def fibonacci(n):" --max-tokens 12
//
// The .proto files are loaded at run time from ../../protos (or --protos DIR) with @grpc/proto-loader: no
// generated code. Text deltas go to stdout as they arrive; after the stream ends, a newline and one JSON line
// {"request_id", "finish_reason", "usage"}. A gRPC error prints its code and details to stderr and exits 1;
// bad arguments exit 2. The default temperature is 0 (greedy), as in `tessera generate`.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const USAGE = "usage: node generate.js ADDRESS TEXT [--max-tokens N] [--temperature T] [--stop S]... [--chat] " +
  "[--timeout SECONDS] [--protos DIR]";

function parseArgs(argv) {
  const args = { positional: [], maxTokens: 128, temperature: 0, stop: [], chat: false, timeout: null,
    protos: path.join(__dirname, "..", "..", "protos") };
  const number = (flag, text) => {
    const value = Number(text);
    if (text === undefined || text === "" || !Number.isFinite(value)) throw new Error(`${flag}: not a number: ${text}`);
    return value;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const [flag, inline] = arg.startsWith("--") && arg.includes("=") ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)] : [arg, undefined];
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === "--max-tokens") args.maxTokens = number(flag, value());
    else if (flag === "--temperature") args.temperature = number(flag, value());
    else if (flag === "--timeout") args.timeout = number(flag, value());
    else if (flag === "--stop") args.stop.push(String(value() ?? ""));
    else if (flag === "--protos") args.protos = value();
    else if (flag === "--chat") args.chat = true;
    else if (flag === "-h" || flag === "--help") { console.log(USAGE); process.exit(0); }
    else if (flag.startsWith("--")) throw new Error(`unknown option ${flag}`);
    else args.positional.push(arg);
  }
  if (args.positional.length !== 2) throw new Error("expected ADDRESS and TEXT");
  if (!Number.isInteger(args.maxTokens) || args.maxTokens < 1) throw new Error("--max-tokens: must be an integer >= 1");
  return args;
}

function protoFiles(root) {
  const found = [];
  for (const entry of fs.readdirSync(root, { withFileTypes: true })) {
    const full = path.join(root, entry.name);
    if (entry.isDirectory()) found.push(...protoFiles(full));
    else if (entry.name.endsWith(".proto")) found.push(full);
  }
  return found;
}

function loadTextGeneration(protosDir) {
  // Import paths in the .proto files are relative to protos/ ("tessera/engine/v1/engine.proto").
  const files = protoFiles(protosDir).map((file) => path.relative(protosDir, file));
  const definition = protoLoader.loadSync(files, {
    includeDirs: [protosDir],
    keepCase: true, // field names as in the .proto: finish_reason, prompt_tokens
    longs: String,
    enums: String, // FINISH_REASON_LENGTH rather than 2
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).tessera.tokenizer.v1.TextGeneration;
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (error) {
    console.error(`generate.js: ${error.message}\n${USAGE}`);
    process.exitCode = 2;
    return;
  }
  const [address, text] = args.positional;
  const TextGeneration = loadTextGeneration(args.protos);
  const client = new TextGeneration(address, grpc.credentials.createInsecure());

  // temperature and max_tokens are proto3 `optional`: setting them (even to 0) sends them.
  const request = {
    sampling: { temperature: args.temperature },
    stopping: { max_tokens: args.maxTokens, stop: args.stop },
  };
  if (args.chat) request.messages = [{ role: "user", content: text }];
  else request.text = text;
  const options = args.timeout === null ? {} : { deadline: new Date(Date.now() + args.timeout * 1000) };

  const call = client.Generate(request, new grpc.Metadata(), options);
  let last = null;
  let wrote = false;
  let failed = false;
  call.on("data", (response) => {
    process.stdout.write(response.text);
    wrote = wrote || response.text.length > 0;
    if (response.finish_reason !== "FINISH_REASON_UNSPECIFIED") last = response;
  });
  call.on("error", (error) => {
    failed = true;
    const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code) || "UNKNOWN";
    if (wrote) process.stdout.write("\n");
    console.error(`generate.js: ${name} (${error.code}): ${error.details}`);
    process.exitCode = 1;
    client.close();
  });
  call.on("end", () => { // grpc-js also emits "end" after "error"
    if (failed) return;
    const summary = last === null ? { finish_reason: null, usage: null } : {
      request_id: last.request_id,
      finish_reason: last.finish_reason,
      matched_stop: last.matched_stop,
      usage: last.usage,
    };
    process.stdout.write("\n" + JSON.stringify(summary) + "\n");
    client.close();
  });
}

main();
