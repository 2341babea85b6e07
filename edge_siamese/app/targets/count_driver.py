"""Run in the aarch64 guest by ``instructions.count_instructions``: open one model file as
device_bench does, check it on the golden vectors, then run it ITERATIONS more times at batch 1.
Prints one JSON line about the file. Argv: BUNDLE FILE RUNTIME ITERATIONS."""

import json, sys
import numpy as np
from device_bench.manifest import read_bundle
from device_bench.metrics import embedding_agreement
from device_bench.runtimes import open_runtime

bundle_path, file, runtime, iterations = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
bundle = read_bundle(bundle_path)
entry = next(e for e in bundle.files if e["path"] == file)
model = open_runtime(bundle.path / file, entry["format"], runtime, threads=1)
golden = bundle.golden()
embedding = bundle.manifest["embedding"]
check = embedding_agreement(model.run(golden["inputs"]), golden["embeddings"], None, embedding["distance"], embedding["distance_weights"])
x = np.ascontiguousarray(golden["inputs"][:1])
for _ in range(iterations):
    model.run(x)
print(json.dumps({"format": entry["format"], "precision": entry["precision"], "runtime": model.name, "runtime_version": model.version, "golden_min_cosine": check["min_cosine"]}))
