#!/usr/bin/env node
// Checks an edge-siamese bundle from Node, as an app team's CI would (docs/app-integration.md): the
// sha256 of every file manifest.json lists, the preprocessing (golden.npz's raw images against its
// inputs), then each ONNX model run with onnxruntime-node on
// golden.npz's inputs against PyTorch's embeddings. Prints one JSON object; exits 1 when the bundle
// is invalid or any model fails, 2 on a usage mistake.
//
//   node verify.mjs BUNDLE

import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

import { BundleError, checkManifest, checkSha256, listedFiles, oneLine, onnxRunner, readNpz, requireOnnx, selfCheck } from "../../edge_siamese/app/web/bundle.mjs";

function readManifest(bundle) {
  const path = join(bundle, "manifest.json");
  if (!existsSync(path)) throw new BundleError(`${bundle} is not a bundle (no manifest.json): pass the folder 'edge-siamese export' wrote`);
  try {
    return checkManifest(JSON.parse(readFileSync(path, "utf8")));
  } catch (err) {
    if (err instanceof BundleError) throw err;
    throw new BundleError(`${path} is not valid JSON (${err.message}): export the bundle again`);
  }
}

function readFile(bundle, entry) {
  const path = join(bundle, entry.path);
  if (!existsSync(path)) throw new BundleError(`${entry.path} is missing from ${bundle}: copy the whole bundle folder`);
  return new Uint8Array(readFileSync(path));
}

async function verify(bundle, report) {
  const manifest = readManifest(bundle);
  requireOnnx(manifest);
  const files = {};
  for (const entry of listedFiles(manifest)) {
    files[entry.path] = readFile(bundle, entry);
    await checkSha256(entry, files[entry.path]);
  }
  const golden = await readNpz(files[manifest.golden.path], manifest.golden.path, ["images", "inputs", "embeddings"]);
  let ort;
  try {
    ort = (await import("onnxruntime-node")).default;
  } catch (err) {
    throw new BundleError(`onnxruntime-node did not load (${oneLine(err)}): run npm ci --prefix clients/node`);
  }
  const onnx = onnxRunner(ort, files, "cpu", `onnxruntime-node ${ort.env.versions.node}`);
  await selfCheck(manifest, golden, { onnx, tflite: "Node has no LiteRT runtime: the web page (edge-siamese demo) or device_bench checks TFLite files" }, report);
}

async function main() {
  const [major, minor] = process.versions.node.split(".").map(Number);
  if (major < 20 || (major === 20 && minor < 12)) {
    console.error(`Node ${process.versions.node} is too old: this client needs Node >= 20.12 (web crypto and deflate-raw streams)`);
    return 2;
  }
  const args = process.argv.slice(2);
  if (args.length !== 1 || args[0].startsWith("-")) {
    console.error("usage: node verify.mjs BUNDLE   (the folder 'edge-siamese export' wrote)");
    return 2;
  }
  const report = { bundle: args[0], ok: false, files: {}, skipped: [] };
  try {
    await verify(args[0], report);
  } catch (err) {
    report.ok = false;
    report.error = oneLine(err);
  }
  console.log(JSON.stringify(report));
  return report.ok ? 0 : 1;
}

process.exitCode = await main();
