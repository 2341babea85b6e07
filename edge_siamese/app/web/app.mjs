// The page: load the bundle served beside it (edge-siamese demo), check every file's sha256, run the
// golden self-check in this browser (ONNX with onnxruntime-web, TFLite with LiteRT.js, both WASM),
// then embed two images the user picks and give the verdict at the manifest's threshold.
// `?selfcheck=1` also writes the self-check JSON (the Node verifier's fields) into #self-check;
// `?bundle=URL` reads the bundle from another folder of the same server.

import {
  BundleError, checkInputShape, checkManifest, checkSha256, decodeImage, distance, embed, listedFiles,
  oneLine, onnxRunner, preprocessRgba, readNpz, requireOnnx, selfCheck, verdict,
} from "./bundle.mjs";

const params = new URLSearchParams(location.search);
const bundleUrl = new URL(params.get("bundle") ?? "/bundle/", location.href);
const $ = (id) => document.getElementById(id);

async function fetchBytes(path) {
  const response = await fetch(new URL(path, bundleUrl), { cache: "no-store" });
  if (!response.ok) throw new BundleError(`${path}: the server answered ${response.status}: serve the whole bundle folder (edge-siamese demo BUNDLE)`);
  return new Uint8Array(await response.arrayBuffer());
}

async function loadBundle() {
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(await fetchBytes("manifest.json")));
  } catch (err) {
    throw err instanceof BundleError ? err : new BundleError(`manifest.json is not valid JSON (${err.message}): export the bundle again`);
  }
  checkManifest(manifest);
  requireOnnx(manifest);
  const files = {};
  for (const [, entry] of listedFiles(manifest)) {
    files[entry.path] = await fetchBytes(entry.path);
    await checkSha256(entry, files[entry.path]);
  }
  const golden = await readNpz(files[manifest.golden.path], manifest.golden.path, ["images", "inputs", "embeddings"]);
  return { manifest, files, golden };
}

/** The runners of selfCheck; each model it opens is kept in `opened` for the compare section. */
async function makeRunners(files, opened) {
  const keep = (entry, runner) => (opened[entry.path] = runner);
  let ort;
  try {
    ort = await import("onnxruntime-web");
  } catch (err) {
    throw new BundleError(`onnxruntime-web did not load (${oneLine(err)}): run npm ci --prefix edge_siamese/app/web and serve the page with edge-siamese demo`);
  }
  ort.env.wasm.wasmPaths = "/node_modules/onnxruntime-web/dist/";
  ort.env.wasm.numThreads = 1; // threads need a cross-origin-isolated page; one is plenty for these models
  const onnx = onnxRunner(ort, files, "wasm", `onnxruntime-web ${ort.env.versions.web}`);
  const runners = { onnx: async (entry) => keep(entry, await onnx(entry)) };
  try {
    const litert = await import("@litertjs/core");
    await litert.loadLiteRt("/node_modules/@litertjs/core/wasm/");
    runners.tflite = async (entry) => {
      if (entry.input.dtype === "int8" || entry.output.dtype === "int8") {
        throw new BundleError("LiteRT.js has no int8 tensors (float32, int32 and uint8 only): device_bench checks this file");
      }
      const model = await litert.loadAndCompile(files[entry.path], { accelerator: "wasm" });
      checkInputShape(entry, Array.from(model.getInputDetails()[0].shape), "the model file's input has");
      const run = async (data, shape) => {
        const input = new litert.Tensor(data, shape);
        let outputs = [];
        try {
          outputs = await model.run([input]);
          return (await outputs[0].data()).slice();
        } finally {
          input.delete();
          outputs.forEach((output) => output.delete());
        }
      };
      return keep(entry, { run, runtime: "LiteRT.js (wasm)" });
    };
  } catch (err) {
    runners.tflite = `LiteRT.js did not load (${oneLine(err)}): device_bench checks TFLite files`;
  }
  return runners;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function showSummary(manifest) {
  const { training, embedding, thresholds } = manifest;
  $("summary").textContent =
    `${training.loss} loss, ${training.backbone} on ${training.dataset}, dim ${embedding.dim}, ${embedding.distance} distance; ` +
    `accept a pair when distance < ${thresholds["far_1e-3"].toFixed(4)} (FAR 1e-3, ${thresholds.measured_on}).`;
}

function showReport(report) {
  const rows = [...Object.entries(report.files), ...report.skipped.map((s) => [s.path, { skipped: s.reason }])];
  $("files").tBodies[0].replaceChildren(...rows.map(([path, row]) => {
    const tr = document.createElement("tr");
    const cells = row.skipped
      ? [path, `skipped: ${row.skipped}`, "", "", "", ""]
      : [path, row.error ?? row.runtime, row.min_cosine?.toFixed(6) ?? "", row.required_min_cosine.toFixed(6), row.max_abs_diff?.toExponential(2) ?? "", row.ok ? "✓" : "✗"];
    cells.forEach((text, i) => {
      const td = tr.insertCell();
      td.textContent = text;
      if (i >= 2 && i <= 4) td.className = "num";
      if (i === 5) td.className = row.ok ? "ok" : "fail";
    });
    return tr;
  }));
  const checked = Object.keys(report.files).length;
  $("status").className = report.ok ? "ok" : "fail";
  $("status").textContent = report.ok
    ? `passed: ${checked} file(s) agree with PyTorch; preprocessing within ${report.preprocessing.max_abs_diff.toExponential(1)} of Python's`
    : `failed: ${report.error}`;
}

function writeSelfCheck(report) {
  if (params.get("selfcheck") !== "1") return;
  $("self-check").textContent = JSON.stringify(report, null, 1);
  $("self-check").hidden = false;
  $("self-check").dataset.state = "done";
}

/** An image file -> its model input: decoded by the browser, then preprocessed as device_bench does (bundle.mjs). */
async function imageInput(file, pre) {
  const { rgba, width, height } = await decodeImage(file);
  return preprocessRgba(rgba, width, height, pre);
}

/** What the model sees: the input drawn into `canvas`, its values stretched from min to max. */
function drawInput(input, pre, canvas) {
  const [height, width] = pre.resize;
  const plane = height * width;
  let lo = Infinity, hi = -Infinity;
  input.forEach((v) => ((lo = Math.min(lo, v)), (hi = Math.max(hi, v))));
  const pixels = new ImageData(width, height);
  for (let p = 0; p < plane; p++) {
    for (let k = 0; k < 3; k++) pixels.data[4 * p + k] = (255 * (input[(pre.channels === 1 ? 0 : k) * plane + p] - lo)) / Math.max(hi - lo, 1e-12);
    pixels.data[4 * p + 3] = 255;
  }
  const small = new OffscreenCanvas(width, height);
  small.getContext("2d").putImageData(pixels, 0, 0);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(small, 0, 0, canvas.width, canvas.height);
}

/** The compare section, with the files that passed the self-check. */
function setupCompare(manifest, opened, report) {
  const usable = manifest.files.filter((entry) => opened[entry.path] && report.files[entry.path].ok);
  $("model").replaceChildren(...usable.map((entry) => new Option(`${entry.path} (${entry.status})`, entry.path)));
  $("model").value = (usable.find((entry) => entry.format === "onnx" && entry.precision === "fp32") ?? usable[0])?.path ?? "";
  const show = (state, text, result) => {
    Object.assign($("verdict").dataset, { state, accept: result?.accept ?? "", distance: result?.distance ?? "" });
    $("verdict").textContent = text;
  };
  // One run at a time on a model (runtimes are not re-entrant), and only the newest choice is shown.
  let latest = 0, queue = Promise.resolve();
  const compare = async (ticket) => {
    const [a, b] = [$("image-a").files[0], $("image-b").files[0]];
    if (ticket !== latest) return;
    if (!a || !b) return show("waiting", "Pick two images.");
    show("running", "Embedding…");
    try {
      const pre = manifest.preprocessing;
      const inputs = [await imageInput(a, pre), await imageInput(b, pre)];
      const entry = manifest.files.find((entry) => entry.path === $("model").value);
      const data = new Float32Array(inputs[0].length * 2);
      data.set(inputs[0]);
      data.set(inputs[1], inputs[0].length);
      const embeddings = await embed(entry, { shape: [2, pre.channels, ...pre.resize], data }, opened[entry.path].run);
      if (ticket !== latest) return;
      drawInput(inputs[0], pre, $("preview-a"));
      drawInput(inputs[1], pre, $("preview-b"));
      const dim = manifest.embedding.dim;
      const result = verdict(distance(embeddings.subarray(0, dim), embeddings.subarray(dim), manifest.embedding), manifest.thresholds);
      show("done", `${result.accept ? "Same" : "Different"}: ${manifest.embedding.distance} distance ${result.distance.toFixed(4)} ` +
        `${result.accept ? "<" : "≥"} threshold ${result.threshold.toFixed(4)} (FAR 1e-3), with ${entry.path}.`, result);
    } catch (err) {
      if (ticket === latest) show("error", oneLine(err));
    }
  };
  const update = () => {
    const ticket = ++latest;
    queue = queue.then(() => compare(ticket));
  };
  for (const id of ["model", "image-a", "image-b"]) {
    $(id).addEventListener("change", update);
    $(id).disabled = usable.length === 0;
  }
  if (usable.length === 0) show("error", "No model file passed the self-check above, so none is offered here.");
}

async function main() {
  const report = { bundle: bundleUrl.href, ok: false, files: {}, skipped: [] };
  try {
    const { manifest, files, golden } = await loadBundle();
    showSummary(manifest);
    const opened = {};
    await selfCheck(manifest, golden, await makeRunners(files, opened), report);
    showReport(report);
    setupCompare(manifest, opened, report);
  } catch (err) {
    report.ok = false;
    report.error = oneLine(err);
    if ($("status").classList.contains("pending")) {
      $("summary").textContent = "";
      $("status").className = "fail";
      $("status").textContent = "not run";
    }
    showError(report.error);
  }
  writeSelfCheck(report);
}

main();
