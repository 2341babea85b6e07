// An edge-siamese bundle as an app reads it (docs/app-integration.md): the manifest, the sha256 of
// every file, golden.npz, the preprocessing of a photo (as device_bench.preprocessing, bit for bit),
// int8 input/output, the distance and the verdict, and the golden self-check. Web-platform APIs only
// (crypto.subtle, DecompressionStream, typed arrays; decodeImage also createImageBitmap and
// OffscreenCanvas, which only browsers have), so that the Node verifier (clients/node) and the web
// page (this folder) share this one copy. Callers bring the bytes and a `run(data, shape)` function
// for their runtime.

export const SCHEMA_VERSION = 1;
export const GOLDEN_SLACK = 1e-3; // as device_bench.bench: a file may fall this far below the min cosine export measured
const EPS = 1e-12; // as device_bench.metrics: guards the norm of an all-zero row
const PREPROCESSING_TOLERANCE = 1e-6; // relative to the largest input: float64 here against numpy's float32

export class BundleError extends Error {}

// What the clients read (tests/test_docs.py checks that these cover every field they use, and
// that each is in device_bench.manifest's schema); `files[]` fields are checked in every entry.
const REQUIRED = [
  "input.shape", "preprocessing.raw_range", "preprocessing.resize", "preprocessing.channels", "preprocessing.scale",
  "preprocessing.mean", "preprocessing.std", "embedding.dim", "embedding.distance", "embedding.distance_weights",
  "thresholds.far_1e-3", "thresholds.measured_on", "training.loss", "training.backbone", "training.dataset",
  "eval.path", "eval.sha256", "golden.path", "golden.sha256",
];
const FILE_REQUIRED = [
  "path", "sha256", "format", "precision", "status", "input.name", "input.dtype", "input.shape", "input.scale",
  "input.zero_point", "output.name", "output.dtype", "output.shape", "output.scale", "output.zero_point", "fidelity.min_cosine",
];

const missingFields = (object, paths) => paths.filter((path) => path.split(".").reduce((value, part) => value?.[part], object) === undefined);

const shown = (value) => (typeof value === "number" ? String(value) : JSON.stringify(value)); // Infinity and NaN as such

/**
 * What is wrong with the manifest numbers that a gate compares or that feed one (the preprocessing,
 * the distance's weights, the thresholds, each file's min cosine and int8/uint8 scales): each must
 * be a finite number, as NaN fails every comparison silently. JSON has no NaN, but 1e999 parses to Infinity.
 */
function numberProblems(manifest) {
  const { preprocessing: pre, embedding, thresholds } = manifest;
  const numbers = [["preprocessing.scale", pre.scale]];
  const problems = [];
  const list = (field, values, length) => {
    if (Array.isArray(values) && values.length === length) numbers.push(...values.map((v, i) => [`${field}[${i}]`, v]));
    else problems.push(`${field} is ${shown(values)}, not a list of ${length} finite numbers`);
  };
  list("preprocessing.raw_range", pre.raw_range, 2);
  list("preprocessing.mean", pre.mean, pre.channels);
  list("preprocessing.std", pre.std, pre.channels);
  if (embedding.distance === "weighted_l1") list("embedding.distance_weights", embedding.distance_weights, embedding.dim);
  for (const key of Object.keys(thresholds).filter((key) => key.startsWith("far_"))) numbers.push([`thresholds.${key}`, thresholds[key]]);
  manifest.files.forEach((entry, i) => {
    numbers.push([`files[${i}].fidelity.min_cosine`, entry.fidelity.min_cosine]);
    for (const io of ["input", "output"].filter((io) => entry[io].dtype in INT_RANGES)) {
      numbers.push([`files[${i}].${io}.scale`, entry[io].scale], [`files[${i}].${io}.zero_point`, entry[io].zero_point]);
    }
  });
  return [...problems, ...numbers.filter(([, v]) => !Number.isFinite(v)).map(([field, v]) => `${field} is ${shown(v)}, not a finite number`)];
}

/**
 * Why `path` cannot name a file inside the bundle folder, or null when it can: it must be relative
 * and normalised, and mean the same file to a file system and to a URL (no %, ? or #, no backslash).
 * Checked before anything is read; verify.mjs also resolves symlinks.
 */
function pathProblem(path) {
  if (typeof path !== "string" || path === "") return "is not a file name";
  if (/[\x00-\x1f\x7f]/.test(path)) return "holds a control character";
  if (path.startsWith("/")) return "is absolute";
  if (/^[^/]*:/.test(path)) return "starts with a drive letter or URL scheme";
  if (/[\\%?#]/.test(path)) return "holds a backslash, %, ? or #";
  if (path.split("/").some((part) => part === "" || part === "." || part === "..")) return "has an empty, . or .. part";
  return null;
}

/** The parsed manifest.json, checked for what the clients use; throws a BundleError that says how to fix it. */
export function checkManifest(manifest) {
  if (manifest?.schema_version !== SCHEMA_VERSION) {
    throw new BundleError(
      `bundle schema version ${manifest?.schema_version} is not ${SCHEMA_VERSION}: use the client of the edge-siamese that exported it, or export again`,
    );
  }
  if (!Array.isArray(manifest.files) || manifest.files.length === 0) throw new BundleError("manifest.json lists no model files: export the bundle again");
  const missing = [
    ...missingFields(manifest, REQUIRED),
    ...manifest.files.flatMap((entry, i) => missingFields(entry, FILE_REQUIRED).map((path) => `files[${i}].${path}`)),
  ];
  if (missing.length) throw new BundleError(`manifest.json lacks ${missing.join(", ")}: export the bundle again`);
  const problems = numberProblems(manifest);
  if (problems.length) throw new BundleError(`manifest.json's ${problems.join("; ")}: export the bundle again`);
  const modeProblem = resizeModeProblem(manifest.preprocessing);
  if (modeProblem) throw new BundleError(`manifest.json's ${modeProblem}: update this client`);
  for (const [field, entry] of listedFiles(manifest)) {
    const problem = pathProblem(entry.path);
    if (problem) {
      throw new BundleError(
        `manifest.json's ${field}.path ${shown(entry.path)} ${problem}: a bundle's paths are relative, plain names inside its folder; export the bundle again`,
      );
    }
  }
  return manifest;
}

/** Throws unless the bundle has an ONNX file, which both clients run (the page's TFLite support is extra). */
export function requireOnnx(manifest) {
  if (!manifest.files.some((entry) => entry.format === "onnx")) {
    const formats = [...new Set(manifest.files.map((entry) => entry.format))].join(", ");
    throw new BundleError(`the bundle has no ONNX file (only ${formats}): export it with --format onnx`);
  }
}

/** Every file manifest.json lists (models, eval, golden), each as `[field, { path, sha256 }]`, the field naming it in messages. */
export function listedFiles(manifest) {
  return [...manifest.files.map((entry, i) => [`files[${i}]`, entry]), ["eval", manifest.eval], ["golden", manifest.golden]];
}

export async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Throws unless `bytes` are the file manifest.json lists as `entry`. */
export async function checkSha256(entry, bytes) {
  if ((await sha256Hex(bytes)) !== entry.sha256) {
    throw new BundleError(`${entry.path} does not match its sha256 in manifest.json (changed or truncated): copy or export the bundle again`);
  }
}

// --- .npz: a zip (numpy.savez[_compressed]) of .npy arrays --------------------------------------------

const NPY_TYPES = {
  "<f4": Float32Array, "<f8": Float64Array, "|u1": Uint8Array, "|i1": Int8Array, "<u2": Uint16Array, "<i2": Int16Array,
  "<i4": Int32Array, "<i8": BigInt64Array,
};

async function inflateRaw(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** Every member of a zip archive, by name, read through its central directory (zip64 included). */
async function readZip(bytes, name) {
  const EOCD = 0x06054b50, CENTRAL = 0x02014b50, LOCAL = 0x04034b50, ZIP64_EXTRA = 0x0001;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const u16 = (at) => view.getUint16(at, true), u32 = (at) => view.getUint32(at, true);
  let end = bytes.length - 22;
  while (end >= 0 && u32(end) !== EOCD) end--;
  if (end < 0) throw new BundleError(`${name} is not a zip archive: export the bundle again`);
  const members = {};
  let at = u32(end + 16);
  for (let i = 0, count = u16(end + 10); i < count; i++) {
    if (u32(at) !== CENTRAL) throw new BundleError(`${name} has a corrupt zip directory: export the bundle again`);
    const method = u16(at + 10), nameLength = u16(at + 28), extraLength = u16(at + 30), commentLength = u16(at + 32);
    let compressedSize = u32(at + 20), size = u32(at + 24), offset = u32(at + 42);
    const member = new TextDecoder().decode(bytes.subarray(at + 46, at + 46 + nameLength));
    // zip64: the 32-bit fields that overflowed read 0xFFFFFFFF and their values follow, in order, in the extra field
    for (let x = at + 46 + nameLength; x < at + 46 + nameLength + extraLength; x += 4 + u16(x + 2)) {
      if (u16(x) !== ZIP64_EXTRA) continue;
      let field = x + 4;
      const next = () => Number(view.getBigUint64((field += 8) - 8, true));
      if (size === 0xffffffff) size = next();
      if (compressedSize === 0xffffffff) compressedSize = next();
      if (offset === 0xffffffff) offset = next();
    }
    if (u32(offset) !== LOCAL) throw new BundleError(`${name}: corrupt zip member ${member}`);
    const start = offset + 30 + u16(offset + 26) + u16(offset + 28);
    const raw = bytes.subarray(start, start + compressedSize);
    if (method === 8) members[member] = await inflateRaw(raw);
    else if (method === 0) members[member] = raw;
    else throw new BundleError(`${name}: zip member ${member} uses compression method ${method}; only stored and deflate are read`);
    if (members[member].length !== size) throw new BundleError(`${name}: zip member ${member} is truncated`);
    at += 46 + nameLength + extraLength + commentLength;
  }
  return members;
}

/** A C-order .npy array of float32, uint8 or int8: `{ shape, data }`. */
function readNpy(bytes, name) {
  if (String.fromCharCode(...bytes.subarray(0, 6)) !== "\x93NUMPY") throw new BundleError(`${name} is not a .npy array`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const [headerStart, headerLength] = bytes[6] === 1 ? [10, view.getUint16(8, true)] : [12, view.getUint32(8, true)];
  const header = new TextDecoder("latin1").decode(bytes.subarray(headerStart, headerStart + headerLength));
  const descr = /'descr':\s*'([^']*)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  const Type = NPY_TYPES[descr];
  if (!Type || fortran !== "False" || shapeText === undefined) {
    throw new BundleError(`${name} must be a C-order ${Object.keys(NPY_TYPES).join(", ")} array (header: ${header.trim()})`);
  }
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const body = bytes.subarray(headerStart + headerLength, headerStart + headerLength + count * Type.BYTES_PER_ELEMENT);
  if (body.length < count * Type.BYTES_PER_ELEMENT) throw new BundleError(`${name} is truncated`);
  const data = new Type(body.slice().buffer); // little-endian, as every platform these clients run on
  return { shape, data: Type === BigInt64Array ? Float64Array.from(data, Number) : data };
}

/** The named arrays of an .npz file. */
export async function readNpz(bytes, name, keys) {
  const members = await readZip(bytes, name);
  const arrays = {};
  for (const key of keys) {
    if (!members[`${key}.npy`]) throw new BundleError(`${name} has no ${key} array: export the bundle again`);
    arrays[key] = readNpy(members[`${key}.npy`], `${name}:${key}`);
  }
  return arrays;
}

// --- preprocessing, as device_bench.preprocessing ----------------------------------------------------
// A photo's 8-bit RGBA pixels -> the model's float32 NCHW input, each step computing what Python's
// read_image, Preprocessing.resized and Preprocessing.__call__ compute, bit for bit on 8-bit values.

const LUMA = [0.299, 0.587, 0.114]; // ITU-R 601-2, the manifest's grey_conversion, for float raw values
const LUMA_16 = [19595, 38470, 7471]; // Pillow's integer form, for 8-bit values: (19595 R + 38470 G + 7471 B + 2**15) >> 16
const ALPHA_BACKGROUND = 255; // transparent pixels are composited onto white
const RESIZE_MODES = ["crop", "stretch"]; // device_bench.preprocessing.RESIZE_MODES
const PRECISION_BITS = 32 - 8 - 2; // Pillow's fixed-point coefficients for 8-bit resampling

const resizeMode = (pre) => pre.resize_mode ?? "crop"; // bundles exported before resize_mode always cropped

/** What is wrong with the preprocessing's resize mode, or null. */
function resizeModeProblem(pre) {
  const mode = resizeMode(pre);
  return RESIZE_MODES.includes(mode) ? null : `preprocessing.resize_mode ${shown(mode)} is unknown (this client knows ${RESIZE_MODES.join(", ")})`;
}

/** R, G and B planes -> one grey plane: Pillow's integer luma for 8-bit values, LUMA for others. */
function grey([r, g, b]) {
  const eightBit = r instanceof Uint8Array;
  const out = new (eightBit ? Uint8Array : Float64Array)(r.length);
  for (let p = 0; p < r.length; p++) {
    out[p] = eightBit ? (LUMA_16[0] * r[p] + LUMA_16[1] * g[p] + LUMA_16[2] * b[p] + 0x8000) >>> 16 : LUMA[0] * r[p] + LUMA[1] * g[p] + LUMA[2] * b[p];
  }
  return out;
}

/** One or three planes -> the model's channels: colour made grey, grey repeated; as Preprocessing.with_channels. */
function withChannels(planes, channels) {
  if (planes.length === 3 && channels === 1) return [grey(planes)];
  return planes.length === 1 && channels === 3 ? [planes[0], planes[0], planes[0]] : planes;
}

/** The source region [left, top, right, bottom] that `mode` scales onto `[outHeight, outWidth]`; as device_bench.preprocessing.crop_box. */
function cropBox(height, width, [outHeight, outWidth], mode) {
  if (mode === "stretch") return [0, 0, width, height];
  if (width * outHeight > height * outWidth) { // wider than the input: keep the full height
    const kept = (height * outWidth) / outHeight;
    return [(width - kept) / 2, 0, (width + kept) / 2, height];
  }
  const kept = (width * outHeight) / outWidth;
  return [0, (height - kept) / 2, width, (height + kept) / 2];
}

/**
 * Pillow's bilinear weights (Resample.c precompute_coeffs, then normalize_coeffs_8bpc) for
 * `outSize` outputs from `[in0, in1)` of `inSize` inputs: the filter's support widens by the
 * scale when shrinking (antialiasing), each output's weights sum to 1 and become fixed-point
 * integers of PRECISION_BITS. Pillow holds the box in float32 and the rest in doubles, as here.
 */
function coefficients(inSize, in0, in1, outSize) {
  const scale = Math.fround(in1 - in0) / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale; // the bilinear filter's support is 1
  const ksize = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize), count = new Int32Array(outSize), weights = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  const ss = 1 / filterScale;
  for (let out = 0; out < outSize; out++) {
    const center = in0 + (out + 0.5) * scale;
    const min = Math.max(Math.trunc(center - support + 0.5), 0);
    const n = Math.min(Math.trunc(center + support + 0.5), inSize) - min;
    let sum = 0;
    for (let x = 0; x < n; x++) {
      w[x] = Math.max(1 - Math.abs((x + min - center + 0.5) * ss), 0);
      sum += w[x];
    }
    for (let x = 0; x < n; x++) {
      const k = sum !== 0 ? w[x] / sum : w[x];
      weights[out * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
    }
    first[out] = min;
    count[out] = n;
  }
  return { first, count, weights, ksize };
}

/** One pass of Pillow's 8-bit resampling along x (`step` 1) or y (`step` the row length): rounded, clipped to 0..255. */
function resamplePass(src, at, step, k, out) {
  let sum = 1 << (PRECISION_BITS - 1);
  for (let i = 0, n = k.count[out]; i < n; i++) sum += src[at + (k.first[out] + i) * step] * k.weights[out * k.ksize + i];
  return Math.min(Math.max(sum >> PRECISION_BITS, 0), 255);
}

/**
 * One 8-bit plane (`height` rows of `width`) -> `outHeight` x `outWidth` from the source `box`,
 * exactly as Pillow's `Image.resize(size, BILINEAR, box=box)` of an ``L`` image (Resample.c
 * ImagingResampleInner): two passes, each rounded to 8 bits, skipping one that would change
 * nothing (same size, whole span). The order matters to the rounding: Pillow 13 resamples along
 * y first when the height shrinks by more than twice as many pixels as the width does, else
 * along x first, over only the rows the vertical pass reads (found by comparing with Pillow
 * 13.0.0; older releases always went along x first).
 */
function resizePlane(plane, width, height, box, outHeight, outWidth) {
  const [x0, y0, x1, y1] = box.map(Math.fround);
  const horizontal = coefficients(width, x0, x1, outWidth), vertical = coefficients(height, y0, y1, outHeight);
  let src = plane, srcWidth = width, top = 0; // src's first row is the source's row `top`
  const alongX = (first, rows) => {
    const out = new Uint8Array(outWidth * rows);
    for (let y = 0; y < rows; y++) {
      for (let x = 0; x < outWidth; x++) out[y * outWidth + x] = resamplePass(src, (first + y) * srcWidth, 1, horizontal, x);
    }
    [src, srcWidth, top] = [out, outWidth, first];
  };
  const alongY = () => {
    const out = new Uint8Array(srcWidth * outHeight);
    for (let y = 0; y < outHeight; y++) {
      for (let x = 0; x < srcWidth; x++) out[y * srcWidth + x] = resamplePass(src, x - top * srcWidth, srcWidth, vertical, y);
    }
    [src, top] = [out, 0];
  };
  const needHorizontal = outWidth !== width || x0 !== 0 || x1 !== outWidth;
  const needVertical = outHeight !== height || y0 !== 0 || y1 !== outHeight;
  if (height > outHeight && height - outHeight > 2 * (width - outWidth)) {
    if (needVertical) alongY();
    if (needHorizontal) alongX(0, outHeight);
  } else {
    const first = vertical.first[0], last = vertical.first[outHeight - 1] + vertical.count[outHeight - 1];
    if (needHorizontal) alongX(first, last - first);
    if (needVertical) alongY();
  }
  return src;
}

/**
 * One image's raw planes (one per model channel, at the input size) -> its float32 NCHW input:
 * (raw * scale - mean) / std per channel, as Preprocessing.__call__.
 */
function normalise(planes, pre) {
  const [height, width] = pre.resize;
  const { channels, scale, mean, std } = pre;
  const plane = height * width;
  const x = new Float32Array(channels * plane);
  for (let k = 0; k < channels; k++) {
    for (let p = 0; p < plane; p++) x[k * plane + p] = (planes[k][p] * scale - mean[k]) / std[k];
  }
  return x;
}

/**
 * A decoded image's 8-bit RGBA pixels (`width` x `height`, not premultiplied) -> its model input,
 * as device_bench computes it from the same file: alpha composited onto white, rounded; grey by
 * Pillow's integer luma when the model takes one channel; resized by `resize_mode` with Pillow's
 * 8-bit bilinear filter; the 0..255 values mapped onto the training data's raw range
 * (`raw_range`: 0..16 for scikit-learn's digits, 0..255 for 8-bit images, where this changes
 * nothing); then normalised.
 */
export function preprocessRgba(rgba, width, height, pre) {
  if (rgba.length !== 4 * width * height) throw new BundleError(`the image has ${rgba.length} RGBA values, not 4 x ${width} x ${height}`);
  const problem = resizeModeProblem(pre);
  if (problem) throw new BundleError(`manifest.json's ${problem}: update this client`);
  const rgb = [0, 1, 2].map(() => new Uint8Array(width * height));
  for (let p = 0; p < width * height; p++) {
    const a = rgba[4 * p + 3];
    for (let k = 0; k < 3; k++) rgb[k][p] = Math.floor((rgba[4 * p + k] * a + ALPHA_BACKGROUND * (255 - a) + 127) / 255);
  }
  const [outHeight, outWidth] = pre.resize;
  const box = cropBox(height, width, pre.resize, resizeMode(pre));
  const same = width === outWidth && height === outHeight; // as Python, which leaves an image of the input size as it is
  const [lo, hi] = pre.raw_range;
  const planes = withChannels(rgb, pre.channels).map((plane) => {
    const resized = same ? plane : resizePlane(plane, width, height, box, outHeight, outWidth);
    return Float64Array.from(resized, (v) => lo + (v * (hi - lo)) / 255);
  });
  return normalise(planes, pre);
}

/** golden.npz's raw images (N, H, W, C), at the input size and already in the raw range -> their NCHW input, to check against Python's. */
export function preprocessRaw(images, pre) {
  const [n, height, width, c] = images.shape;
  const per = pre.channels * height * width;
  const out = new Float32Array(n * per);
  const plane = height * width;
  for (let i = 0; i < n; i++) {
    const pixels = images.data.subarray(i * plane * c, (i + 1) * plane * c);
    const planes = Array.from({ length: c }, (_, k) => {
      const values = new pixels.constructor(plane);
      for (let p = 0; p < plane; p++) values[p] = pixels[c * p + k];
      return values;
    });
    out.set(normalise(withChannels(planes, pre.channels), pre), i * per);
  }
  return { shape: [n, pre.channels, height, width], data: out };
}

/**
 * An image file (a File or Blob) -> `{ rgba, width, height }`: its 8-bit RGBA pixels, not
 * premultiplied, at its natural size and upright by its EXIF orientation, with no colour
 * management (Pillow applies none). The browser decodes; preprocessRgba does the rest, so that
 * no browser-specific canvas smoothing enters. The canvas stores pixels premultiplied, rounded;
 * composited onto white a pixel is that premultiplied value + 255 - alpha, which preprocessRgba's
 * formula gives back exactly from getImageData's un-premultiplied values.
 */
export async function decodeImage(file, name = file.name) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    throw new BundleError(`${name} could not be decoded as an image: pick a PNG, JPEG, WebP, GIF or BMP file`);
  }
  const { width, height } = bitmap;
  const context = new OffscreenCanvas(width, height).getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  bitmap.close();
  return { rgba: context.getImageData(0, 0, width, height).data, width, height };
}

// --- running a model ----------------------------------------------------------------------------------

const INT_RANGES = { int8: [-128, 127, Int8Array], uint8: [0, 255, Uint8Array] };

/** numpy's round: halves to even. */
function rint(v) {
  const floor = Math.floor(v), frac = v - floor;
  return frac < 0.5 ? floor : frac > 0.5 ? floor + 1 : floor + (floor % 2 !== 0);
}

const f32 = Math.fround;

/** float32 -> the file's input dtype, with the scale and zero point the manifest records for it, in float32 as numpy. */
function quantize(x, io) {
  if (io.dtype === "float32") return x;
  const [lo, hi, Type] = INT_RANGES[io.dtype];
  return Type.from(x, (v) => Math.min(hi, Math.max(lo, rint(f32(f32(v / f32(io.scale)) + io.zero_point)))));
}

function dequantize(y, io) {
  if (io.dtype === "float32") return Float32Array.from(y);
  return Float32Array.from(y, (v) => f32(f32(v - io.zero_point) * f32(io.scale)));
}

/** Throws unless `shape` is the input shape manifest.json lists for `entry`; `what` names whose shape it is. */
export function checkInputShape(entry, shape, what) {
  const expected = entry.input.shape;
  const differs = (d, i) => i > 0 && typeof d === "number" && typeof expected[i] === "number" && d !== expected[i];
  if (shape.length !== expected.length || shape.some(differs)) {
    throw new BundleError(`${entry.path}: ${what} shape [${shape}] but manifest.json says [${expected}]: export the bundle again`);
  }
}

/**
 * Embed float32 NCHW inputs `{ shape, data }` with one model file: quantized when its input is int8,
 * all at once or one image per run when its batch is fixed at 1. `run(data, shape)` is the runtime's
 * call and returns the output's typed array.
 */
export async function embed(entry, inputs, run) {
  if (![entry.input.dtype, entry.output.dtype].every((dtype) => dtype === "float32" || dtype in INT_RANGES)) {
    throw new BundleError(`${entry.path} has ${entry.input.dtype} input and ${entry.output.dtype} output; float32, int8 and uint8 are supported`);
  }
  const [n, ...sample] = inputs.shape;
  checkInputShape(entry, inputs.shape, "the images have");
  const per = sample.reduce((a, b) => a * b, 1);
  const dim = entry.output.shape.at(-1);
  const batch = entry.input.shape[0] === 1 ? 1 : n;
  const out = new Float32Array(n * dim);
  for (let i = 0; i < n; i += batch) {
    const rows = Math.min(batch, n - i);
    const y = dequantize(await run(quantize(inputs.data.subarray(i * per, (i + rows) * per), entry.input), [rows, ...sample]), entry.output);
    if (y.length !== rows * dim) throw new BundleError(`${entry.path} gave ${y.length} values for ${rows} image(s); manifest.json says ${dim} each`);
    out.set(y, i * dim);
  }
  return out;
}

/** Per-row cosine (double precision) and largest absolute difference, as device_bench.metrics.embedding_agreement. */
export function agreement(output, reference) {
  const [n, dim] = reference.shape;
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

/**
 * A selfCheck runner for ONNX files: `ort` is onnxruntime-node or onnxruntime-web (one API),
 * `files` the bundle's bytes by path, `provider` the execution provider ("cpu", "wasm").
 */
export function onnxRunner(ort, files, provider, runtime) {
  return async (entry) => {
    const session = await ort.InferenceSession.create(files[entry.path], { executionProviders: [provider] });
    checkInputShape(entry, session.inputMetadata[0].shape, "the model file's input has");
    const run = async (data, shape) => {
      const result = await session.run({ [entry.input.name]: new ort.Tensor(entry.input.dtype, data, shape) });
      if (!result[entry.output.name]) throw new BundleError(`${entry.path} has no output named ${entry.output.name}`);
      return result[entry.output.name].data;
    };
    return { run, runtime };
  };
}

/**
 * The golden self-check. First this client's preprocessing of golden.npz's raw `images` against
 * Python's `inputs`; then every model file: `runners[format]` is `async (entry) => ({ run, runtime })`,
 * or a string saying why this client cannot run the format (the file is skipped). Fills
 * `report.preprocessing`, `report.files`, `report.skipped` and `report.ok`; a file fails below its
 * export-time min cosine - GOLDEN_SLACK, or when its min cosine is not a finite number. The bundle
 * is ok only when the preprocessing and every file checked are, and at least one file was.
 */
export async function selfCheck(manifest, golden, runners, report) {
  for (const [key, array] of Object.entries(golden)) {
    if (!array.data.every(Number.isFinite)) throw new BundleError(`golden.npz's ${key} hold non-finite values: export the bundle again`);
  }
  const failures = [];
  const inputs = preprocessRaw(golden.images, manifest.preprocessing);
  if (`${inputs.shape}` !== `${golden.inputs.shape}`) {
    throw new BundleError(`golden.npz's images preprocess to [${inputs.shape}] but its inputs are [${golden.inputs.shape}]: export the bundle again`);
  }
  let maxAbsDiff = 0, largest = 1;
  inputs.data.forEach((v, i) => {
    maxAbsDiff = Math.max(maxAbsDiff, Math.abs(v - golden.inputs.data[i]));
    largest = Math.max(largest, Math.abs(v));
  });
  const preprocessingFailure = !Number.isFinite(maxAbsDiff)
    ? `preprocessing max abs diff is ${maxAbsDiff}: this client's preprocessing computes non-finite inputs`
    : maxAbsDiff > PREPROCESSING_TOLERANCE * largest ? `preprocessing differs from Python's by ${maxAbsDiff.toExponential(2)}` : null;
  report.preprocessing = { max_abs_diff: maxAbsDiff, ok: preprocessingFailure === null };
  if (preprocessingFailure) failures.push(preprocessingFailure);
  for (const entry of manifest.files) {
    const runner = runners[entry.format];
    if (typeof runner !== "function") {
      report.skipped.push({ path: entry.path, reason: runner ?? `this client has no runtime for ${entry.format}` });
      continue;
    }
    const bar = entry.fidelity.min_cosine - GOLDEN_SLACK; // checkManifest has made sure it is there
    try {
      const { run, runtime } = await runner(entry);
      const check = agreement(await embed(entry, golden.inputs, run), golden.embeddings);
      const failure = !Number.isFinite(check.min_cosine)
        ? `min cosine is ${check.min_cosine}: the model computes non-finite embeddings`
        : check.min_cosine < bar ? `golden min cosine ${check.min_cosine.toFixed(6)} < ${bar.toFixed(6)}` : null;
      report.files[entry.path] = { ...check, required_min_cosine: bar, runtime, ok: failure === null, ...(failure && { error: failure }) };
      if (failure) failures.push(`${entry.path}: ${failure}`);
    } catch (err) {
      report.files[entry.path] = { required_min_cosine: bar, ok: false, error: oneLine(err) };
      failures.push(`${entry.path}: ${oneLine(err)}`);
    }
  }
  const checked = Object.values(report.files);
  if (checked.length === 0) failures.push("this client could run none of the model files");
  report.ok = report.preprocessing.ok && checked.length > 0 && checked.every((row) => row.ok);
  if (!report.ok) report.error = `golden check failed: ${failures.join("; ")}`;
}

export function oneLine(err) {
  return String(err?.message ?? err).replace(/\s+/g, " ").trim();
}

// --- comparing two embeddings, as device_bench.metrics.rowwise_distances -------------------------------

/** The manifest's distance between two embeddings (float64 arithmetic). */
export function distance(a, b, embedding) {
  const { distance: name, distance_weights: weights } = embedding;
  let sum = 0, dot = 0, aa = 0, bb = 0;
  for (let j = 0; j < a.length; j++) {
    const d = a[j] - b[j];
    if (name === "euclidean" || name === "squared_euclidean") sum += d * d;
    else if (name === "l1") sum += Math.abs(d);
    else if (name === "weighted_l1") sum += weights[j] * Math.abs(d);
    dot += a[j] * b[j]; aa += a[j] * a[j]; bb += b[j] * b[j];
  }
  switch (name) {
    case "euclidean": return Math.sqrt(sum);
    case "squared_euclidean": case "l1": case "weighted_l1": return sum;
    case "cosine": return 1 - dot / Math.max(Math.sqrt(aa) * Math.sqrt(bb), EPS);
    case "shadow": {
      const norm = Math.max(Math.sqrt(aa), EPS);
      return Math.abs(norm - dot / norm);
    }
    default: throw new BundleError(`unknown distance ${name} in manifest.json: update this client`);
  }
}

/** Same identity? `{ accept, distance, threshold }` at the manifest's threshold for that FAR. */
export function verdict(d, thresholds, far = "1e-3") {
  const threshold = thresholds[`far_${far}`];
  if (!Number.isFinite(threshold)) throw new BundleError(`manifest.json has no finite threshold for FAR ${far}`);
  if (!Number.isFinite(d)) throw new BundleError(`the distance is ${d}: the model computes non-finite embeddings`);
  return { accept: d < threshold, distance: d, threshold };
}
