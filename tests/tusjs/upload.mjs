// Upload a file to a datastore server with tus-js-client, as a browser or Node app would.
// Usage: node upload.mjs ENDPOINT FILE [--stop-after BYTES] [--resume URL] [--chunk BYTES] [--header K:V]
//        [--override-patch true] (PATCH sent as POST with X-HTTP-Method-Override, as for old browsers)
// Prints one JSON line: {"url": ..., "offset": ..., "state": "finished" | "stopped"}; exit 1 on error.
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { Upload } from "tus-js-client";

const [endpoint, file, ...rest] = process.argv.slice(2);
const options = { chunk: 64 * 1024, stopAfter: null, resume: null, headers: {}, overridePatch: false };
for (let i = 0; i < rest.length; i += 2) {
  const [flag, value] = [rest[i], rest[i + 1]];
  if (flag === "--stop-after") options.stopAfter = Number(value);
  else if (flag === "--resume") options.resume = value;
  else if (flag === "--chunk") options.chunk = Number(value);
  else if (flag === "--override-patch") options.overridePatch = value === "true";
  else if (flag === "--header") {
    const at = value.indexOf(":");
    options.headers[value.slice(0, at)] = value.slice(at + 1);
  } else throw new Error(`unknown option ${flag}`);
}

const data = readFileSync(file);
const report = (state, upload, offset) =>
  console.log(JSON.stringify({ url: upload.url, offset, state }));

const upload = new Upload(data, {
  endpoint,
  uploadUrl: options.resume,
  chunkSize: options.chunk,
  retryDelays: [0, 100, 300],
  headers: options.headers,
  overridePatchMethod: options.overridePatch,
  metadata: { filename: basename(file) },
  onProgress(sent) {
    if (options.stopAfter !== null && sent >= options.stopAfter) {
      upload.abort().then(() => report("stopped", upload, sent));
      options.stopAfter = null;
    }
  },
  onSuccess() {
    report("finished", upload, data.length);
  },
  onError(error) {
    console.error(String(error));
    process.exit(1);
  },
});
upload.start();
