#!/usr/bin/env node
// Checks an edge-siamese bundle from Node, as an app would (docs/app-integration.md, steps 1 and 7):
// the sha256 of every file manifest.json lists, then each ONNX model run with onnxruntime-node on
// golden.npz's inputs against PyTorch's embeddings. Prints one JSON object; exits 1 when the bundle
// is invalid or any model fails, 2 on a usage mistake.
//
//   node verify.mjs BUNDLE

import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { inflateRawSync } from "node:zlib";

const SCHEMA_VERSION = 1;
const GOLDEN_SLACK = 1e-3; // as device_bench.bench: a file may fall this far below the min cosine export measured
const EPS = 1e-12; // as device_bench.metrics: guards the cosine of an all-zero row

class BundleError extends Error {}

function readManifest(bundle) {
  const path = join(bundle, "manifest.json");
  if (!existsSync(path)) throw new BundleError(`${bundle} is not a bundle (no manifest.json): pass the folder 'edge-siamese export' wrote`);
  let manifest;
  try {
    manifest = JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw new BundleError(`${path} is not valid JSON (${err.message}): export the bundle again`);
  }
  if (manifest?.schema_version !== SCHEMA_VERSION) {
    throw new BundleError(`bundle schema version ${manifest?.schema_version} is not ${SCHEMA_VERSION}: use a matching client`);
  }
  if (!Array.isArray(manifest.files) || manifest.files.length === 0) throw new BundleError("manifest lists no model files");
  for (const key of ["eval", "golden"]) {
    if (typeof manifest[key]?.path !== "string") throw new BundleError(`manifest is missing ${key}.path: export the bundle again`);
  }
  return manifest;
}

function checkFiles(bundle, manifest) {
  for (const entry of [...manifest.files, manifest.eval, manifest.golden]) {
    const path = join(bundle, entry.path);
    if (!existsSync(path)) throw new BundleError(`${entry.path} is missing from ${bundle}: copy the whole bundle folder`);
    const digest = createHash("sha256").update(readFileSync(path)).digest("hex");
    if (digest !== entry.sha256) {
      throw new BundleError(
        `${entry.path} in ${bundle} does not match its sha256 in manifest.json (changed or truncated): copy or export the bundle again`,
      );
    }
  }
}

// --- .npz: a zip (numpy.savez_compressed) of .npy files ---------------------------------------------

/** Every member of a zip archive, by name, read through its central directory. */
function readZip(buffer) {
  const EOCD = 0x06054b50, CENTRAL = 0x02014b50, LOCAL = 0x04034b50, ZIP64_EXTRA = 0x0001;
  let end = buffer.length - 22;
  while (end >= 0 && buffer.readUInt32LE(end) !== EOCD) end--;
  if (end < 0) throw new BundleError("not a zip archive (no end of central directory)");
  const count = buffer.readUInt16LE(end + 10);
  let at = buffer.readUInt32LE(end + 16);
  const members = {};
  for (let i = 0; i < count; i++) {
    if (buffer.readUInt32LE(at) !== CENTRAL) throw new BundleError("corrupt zip central directory");
    const method = buffer.readUInt16LE(at + 10);
    let compressedSize = buffer.readUInt32LE(at + 20);
    let size = buffer.readUInt32LE(at + 24);
    const nameLength = buffer.readUInt16LE(at + 28);
    const extraLength = buffer.readUInt16LE(at + 30);
    const commentLength = buffer.readUInt16LE(at + 32);
    let offset = buffer.readUInt32LE(at + 42);
    const name = buffer.toString("utf8", at + 46, at + 46 + nameLength);
    // zip64: the 32-bit fields that overflowed are 0xFFFFFFFF and their values follow, in order, in the extra field
    for (let x = at + 46 + nameLength; x < at + 46 + nameLength + extraLength; ) {
      const id = buffer.readUInt16LE(x), length = buffer.readUInt16LE(x + 2);
      if (id === ZIP64_EXTRA) {
        let field = x + 4;
        const next = () => Number(buffer.readBigUInt64LE((field += 8) - 8));
        if (size === 0xffffffff) size = next();
        if (compressedSize === 0xffffffff) compressedSize = next();
        if (offset === 0xffffffff) offset = next();
      }
      x += 4 + length;
    }
    if (buffer.readUInt32LE(offset) !== LOCAL) throw new BundleError(`corrupt zip member ${name}`);
    const start = offset + 30 + buffer.readUInt16LE(offset + 26) + buffer.readUInt16LE(offset + 28);
    const raw = buffer.subarray(start, start + compressedSize);
    if (method === 8) members[name] = inflateRawSync(raw);
    else if (method === 0) members[name] = raw;
    else throw new BundleError(`zip member ${name} uses compression method ${method}; only stored and deflate are read`);
    if (members[name].length !== size) throw new BundleError(`zip member ${name} is truncated`);
    at += 46 + nameLength + extraLength + commentLength;
  }
  return members;
}

/** A little-endian float32, C-order .npy array: { shape, data } with data a Float32Array. */
function readNpy(buffer, name) {
  if (buffer.toString("latin1", 0, 6) !== "\x93NUMPY") throw new BundleError(`${name} is not a .npy array`);
  const major = buffer[6];
  const headerLength = major === 1 ? buffer.readUInt16LE(8) : buffer.readUInt32LE(8);
  const headerStart = major === 1 ? 10 : 12;
  const header = buffer.toString("latin1", headerStart, headerStart + headerLength);
  const descr = /'descr':\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr !== "<f4" || fortran !== "False" || shapeText === undefined) {
    throw new BundleError(`${name} must be a C-order float32 array (header: ${header.trim()})`);
  }
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const body = headerStart + headerLength;
  if (buffer.length < body + 4 * count) throw new BundleError(`${name} is truncated`);
  const view = new DataView(buffer.buffer, buffer.byteOffset + body, 4 * count);
  const data = new Float32Array(count);
  for (let i = 0; i < count; i++) data[i] = view.getFloat32(4 * i, true);
  return { shape, data };
}

function readGolden(bundle, manifest) {
  const members = readZip(readFileSync(join(bundle, manifest.golden.path)));
  const arrays = {};
  for (const key of ["inputs", "embeddings"]) {
    if (!members[`${key}.npy`]) throw new BundleError(`${manifest.golden.path} has no ${key} array: export the bundle again`);
    arrays[key] = readNpy(members[`${key}.npy`], `${manifest.golden.path}:${key}`);
  }
  return arrays;
}

// --- models -----------------------------------------------------------------------------------------

/** Run one ONNX file on the golden inputs: all at once, or one per run when its batch is fixed at 1. */
async function embed(ort, path, entry, inputs) {
  if (entry.input.dtype !== "float32" || entry.output.dtype !== "float32") {
    throw new BundleError(`${entry.path} has ${entry.input.dtype} input or ${entry.output.dtype} output; this client feeds float32 only`);
  }
  const session = await ort.InferenceSession.create(path, { executionProviders: ["cpu"] });
  const [n, ...sample] = inputs.shape;
  const per = sample.reduce((a, b) => a * b, 1);
  const batch = entry.input.shape[0] === 1 ? 1 : n;
  const outputs = [];
  for (let i = 0; i < n; i += batch) {
    const rows = Math.min(batch, n - i);
    const x = new ort.Tensor("float32", inputs.data.slice(i * per, (i + rows) * per), [rows, ...sample]);
    const result = await session.run({ [entry.input.name]: x });
    const y = result[entry.output.name];
    if (!y) throw new BundleError(`${entry.path} has no output named ${entry.output.name}`);
    outputs.push(y.data);
  }
  await session.release();
  const data = new Float32Array(outputs.reduce((a, o) => a + o.length, 0));
  outputs.reduce((at, o) => (data.set(o, at), at + o.length), 0);
  return data;
}

/** Per-row cosine (in double precision) and largest absolute difference, as device_bench.metrics.embedding_agreement. */
function agreement(output, reference) {
  const [n, dim] = reference.shape;
  if (output.length !== n * dim) throw new BundleError(`the model gave ${output.length} values for ${n} x ${dim} golden embeddings`);
  let minCosine = Infinity, maxAbsDiff = 0;
  for (let r = 0; r < n; r++) {
    let dot = 0, aa = 0, bb = 0;
    for (let j = r * dim; j < (r + 1) * dim; j++) {
      const a = output[j], b = reference.data[j];
      dot += a * b; aa += a * a; bb += b * b;
      maxAbsDiff = Math.max(maxAbsDiff, Math.abs(a - b));
    }
    minCosine = Math.min(minCosine, dot / Math.max(Math.sqrt(aa) * Math.sqrt(bb), EPS));
  }
  return { min_cosine: minCosine, max_abs_diff: maxAbsDiff };
}

async function verify(bundle, report) {
  const manifest = readManifest(bundle);
  checkFiles(bundle, manifest);
  const golden = readGolden(bundle, manifest);
  let ort;
  try {
    ort = (await import("onnxruntime-node")).default;
  } catch {
    throw new BundleError("onnxruntime-node is not installed: run npm ci --prefix clients/node");
  }
  const failures = [];
  for (const entry of manifest.files) {
    if (entry.format !== "onnx") {
      report.skipped.push({ path: entry.path, reason: entry.format === "tflite" ? "needs LiteRT" : `no runtime for ${entry.format}` });
      continue;
    }
    const bar = entry.fidelity.min_cosine - GOLDEN_SLACK;
    const check = agreement(await embed(ort, join(bundle, entry.path), entry, golden.inputs), golden.embeddings);
    const ok = check.min_cosine >= bar;
    report.files[entry.path] = { ...check, required_min_cosine: bar, ok };
    if (!ok) failures.push(`${entry.path}: golden min cosine ${check.min_cosine.toFixed(6)} < ${bar.toFixed(6)}`);
  }
  if (failures.length) report.error = `golden check failed: ${failures.join("; ")}`;
  report.ok = failures.length === 0;
}

async function main() {
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
    report.error = String(err?.message ?? err).replace(/\s+/g, " ").trim();
  }
  console.log(JSON.stringify(report));
  return report.ok ? 0 : 1;
}

process.exitCode = await main();
