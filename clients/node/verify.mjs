#!/usr/bin/env node
// Checks an edge-siamese bundle from Node, as an app team's CI would (docs/app-integration.md): the
// sha256 of every file manifest.json lists, the preprocessing (golden.npz's raw images against its
// inputs), then each ONNX model run with onnxruntime-node on
// golden.npz's inputs against PyTorch's embeddings. Prints one JSON object; exits 1 when the bundle
// is invalid or any model fails, 2 on a usage mistake.
//
//   node verify.mjs BUNDLE

import { existsSync, readFileSync, realpathSync } from "node:fs";
import { isAbsolute, join, relative, sep } from "node:path";

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

/** The bytes of the file manifest.json lists as `field`, read only once its real path (symlinks resolved) is inside the bundle folder. */
function readFile(bundle, field, entry) {
  const path = join(bundle, entry.path);
  if (!existsSync(path)) throw new BundleError(`${entry.path} is missing from ${bundle}: copy the whole bundle folder`);
  const real = realpathSync(path);
  const inside = relative(realpathSync(bundle), real);
  if (inside === "" || inside === ".." || inside.startsWith(`..${sep}`) || isAbsolute(inside)) {
    throw new BundleError(
      `manifest.json's ${field}.path ${JSON.stringify(entry.path)} resolves to ${real}, outside the bundle folder: copy the file into the bundle instead of linking to it`,
    );
  }
  return new Uint8Array(readFileSync(real));
}

async function verify(bundle, report) {
  const manifest = readManifest(bundle);
  requireOnnx(manifest);
  const files = {};
  for (const [field, entry] of listedFiles(manifest)) {
    files[entry.path] = readFile(bundle, field, entry);
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
