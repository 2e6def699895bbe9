// The datastore page: list the prefix's files, upload by drag and drop or a file picker.
// The server renders the list as plain links (the page works without this script); the script
// replaces it with its own, richer one (local times, download links) and keeps it current from
// the store's event stream (Server-Sent Events: no polling), which also shows the uploads of
// others while they arrive.
// Uploads post a JSON manifest, then send each file by tus PATCH in chunks (with a SHA-256
// Upload-Checksum where the browser can compute it); after a network failure they ask the
// server for its offset (HEAD) and go on from there, with growing pauses between tries.
"use strict";

const CHUNK = 8 * 1024 * 1024;
const HASH_LIMIT = 64 * 1024 * 1024; // whole-file SHA-256 declared in the manifest up to this size
const RETRY_DELAYS = [500, 1000, 2000, 4000, 8000, 15000, 30000];

const prefix = decodeURIComponent(location.pathname.split("/").filter(Boolean)[0] || "");
const base = `/${encodeURIComponent(prefix)}/`;
const $ = (selector) => document.querySelector(selector);

class UploadError extends Error {
  constructor(message, retryable) {
    super(message);
    this.retryable = retryable;
  }
}

// -- who you are ----------------------------------------------------------------------------
// A token is exchanged once for a session cookie (HttpOnly: this script never keeps it), so
// that every request of the page, links to downloads included, carries it. Over https the
// browser's client certificate is the identity instead.

function showIdentity(who) {
  const signedIn = who.kind === "token";
  const text = {
    anonymous: "Not signed in.",
    token: `Signed in as ${who.subject}${who.admin ? " (administrator)" : ""}.`,
    certificate: `Signed in with your certificate: ${who.dn}.`,
    asserted: `Identified as ${who.dn} (X-Client-DN).`,
  }[who.kind];
  $("#whoami").textContent = text || `Signed in as ${who.subject}.`;
  $("#signout").hidden = !signedIn;
  $("#signin").hidden = who.kind !== "anonymous";
}

async function whoAmI() {
  const response = await fetch("/_api/v1/identity", { headers: { Accept: "application/json" }, cache: "no-store" });
  if (response.ok) {
    showIdentity(await response.json());
    return;
  }
  // A session whose token was revoked or expired: sign out, then ask again.
  if (response.status === 401) {
    await fetch("/_api/v1/session", { method: "DELETE" });
    showIdentity({ kind: "anonymous" });
    return;
  }
  say(`Could not tell who you are: ${await errorMessage(response)}`);
}

async function signIn(token) {
  const response = await fetch("/_api/v1/session", {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
  });
  if (!response.ok) {
    say(`Sign-in failed: ${await errorMessage(response)}`);
    return;
  }
  showIdentity(await response.json());
  say("");
  await refreshList();
  follow();
}

async function signOut() {
  await fetch("/_api/v1/session", { method: "DELETE" });
  showIdentity({ kind: "anonymous" });
  await refreshList();
  follow();
}

function human(bytes) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} bytes` : `${value.toFixed(1)} ${units[unit]}`;
}

function say(message) {
  $("#status").textContent = message;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.message) return body.message;
  } catch (_) {
    // not JSON: the first line of the text body
  }
  return (text.split("\n")[0] || response.statusText || `HTTP ${response.status}`).trim();
}

// -- the file list ------------------------------------------------------------------------

async function refreshList() {
  const response = await fetch(base, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!response.ok) {
    if (response.status === 401) $("#files tbody").replaceChildren();
    say(
      response.status === 401
        ? "Sign in to see the files."
        : `Could not list the files: ${await errorMessage(response)}`,
    );
    return;
  }
  const { files } = await response.json();
  const body = $("#files tbody");
  body.replaceChildren(
    ...files.map((file) => {
      const row = document.createElement("tr");
      const link = document.createElement("a");
      link.href = base + encodeURIComponent(file.name);
      link.textContent = file.name;
      link.setAttribute("download", file.name);
      const cells = [
        link,
        human(file.size),
        file.yours ? "you" : file.owner || "—",
        new Date(file.uploaded_at * 1000).toLocaleString(),
        file.sha256,
      ];
      const classes = ["name", "size", "owner", "time", "digest"];
      cells.forEach((content, index) => {
        const cell = document.createElement("td");
        cell.className = classes[index];
        if (typeof content === "string") cell.textContent = content;
        else cell.append(content);
        row.append(cell);
      });
      return row;
    }),
  );
  $("#empty").hidden = files.length > 0;
}

// -- following the store live ---------------------------------------------------------------
// The prefix's events: a file published or deleted (by anyone) refreshes the list; the uploads
// under way show as they progress. EventSource reconnects by itself, sending the last event's
// id, so the store replays what the page missed meanwhile.

let events = null;
let refreshing = null;
const arriving = new Map(); // "transfer/file" -> its <li>

function follow() {
  if (events) events.close();
  arriving.clear();
  $("#live").replaceChildren();
  showArriving();
  events = new EventSource(`/_api/v1/events?prefix=${encodeURIComponent(prefix)}`);
  for (const type of ["file.started", "file.progress"]) {
    events.addEventListener(type, (message) => showProgress(JSON.parse(message.data)));
  }
  for (const type of ["file.completed", "file.failed", "file.interrupted", "file.cancelled", "file.deleted"]) {
    events.addEventListener(type, (message) => {
      const event = JSON.parse(message.data);
      forget(event);
      if (type === "file.completed" || type === "file.deleted") refreshSoon();
    });
  }
  for (const type of ["transfer.cancelled", "transfer.expired"]) {
    events.addEventListener(type, (message) => {
      const { transfer } = JSON.parse(message.data);
      for (const [place, item] of arriving) {
        if (place.startsWith(`${transfer}/`)) {
          item.remove();
          arriving.delete(place);
        }
      }
      showArriving();
    });
  }
}

function refreshSoon() {
  // Several files landing at once make one request for the list.
  if (refreshing) return;
  refreshing = setTimeout(() => {
    refreshing = null;
    refreshList().catch((error) => say(`Could not list the files: ${error.message}`));
  }, 100);
}

function showProgress(event) {
  const place = `${event.transfer}/${event.file}`;
  let item = arriving.get(place);
  if (!item) {
    item = document.createElement("li");
    item.append(document.createElement("span"), document.createElement("progress"), document.createElement("span"));
    item.children[0].className = "name";
    item.children[2].className = "numbers";
    arriving.set(place, item);
    $("#live").append(item);
  }
  const [name, bar, numbers] = item.children;
  name.textContent = event.name;
  bar.max = event.size || 1;
  bar.value = event.bytes || 0;
  numbers.textContent = `${human(event.bytes || 0)} of ${human(event.size || 0)}${event.owner ? ` by ${event.owner}` : ""}`;
  showArriving();
}

function forget(event) {
  const place = `${event.transfer}/${event.file}`;
  const item = arriving.get(place);
  if (item) item.remove();
  arriving.delete(place);
  showArriving();
}

function showArriving() {
  const any = arriving.size > 0;
  $("#live").hidden = !any;
  $("#live-heading").hidden = !any;
}

// -- uploads --------------------------------------------------------------------------------

function makeRow(file) {
  const item = $("#upload-row").content.firstElementChild.cloneNode(true);
  item.querySelector(".name").textContent = file.name;
  const bar = item.querySelector("progress");
  bar.max = Math.max(file.size, 1);
  bar.setAttribute("aria-label", `Upload of ${file.name}`);
  $("#uploads").append(item);
  return {
    item,
    progress(sent) {
      bar.value = sent;
      item.querySelector(".numbers").textContent = `${human(sent)} of ${human(file.size)}`;
    },
    message(text, state) {
      item.querySelector(".message").textContent = text;
      if (state) item.classList.add(state);
    },
  };
}

async function sha256Base64(buffer) {
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return btoa(String.fromCharCode(...new Uint8Array(digest)));
}

async function sha256Hex(file) {
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function uploadFiles(list) {
  const files = Array.from(list);
  if (files.length === 0) return;
  const rows = files.map(makeRow);
  const sent = files.map(() => 0);
  const total = files.reduce((sum, file) => sum + file.size, 0);
  const overall = $("#overall-progress");
  $("#overall").hidden = files.length < 2;
  overall.max = Math.max(total, 1);
  const update = () => {
    const done = sent.reduce((a, b) => a + b, 0);
    overall.value = done;
    $("#overall-text").textContent = `${human(done)} of ${human(total)}`;
  };
  rows.forEach((row, index) => row.progress(0));

  say(`Preparing ${files.length} file(s)…`);
  const canHash = Boolean(globalThis.crypto && crypto.subtle);
  const entries = [];
  for (const file of files) {
    const entry = { name: file.name, size: file.size };
    if (canHash && file.size <= HASH_LIMIT) entry.sha256 = await sha256Hex(file);
    entries.push(entry);
  }
  const response = await fetch(base + "manifest", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify({ files: entries }),
  });
  if (response.status !== 201) {
    const text = await response.text();
    let body = {};
    try {
      body = JSON.parse(text);
    } catch (_) {
      body = { message: text.trim() };
    }
    const refused = new Set((body.files || []).map((entry) => entry.name));
    rows.forEach((row, index) => {
      const reason = refused.has(files[index].name)
        ? "Refused by the store: a file of this name exists or is being uploaded."
        : body.message || `The store answered ${response.status}.`;
      row.message(reason, "failed");
    });
    say(`Upload refused: ${body.message || response.statusText}`);
    return;
  }
  const manifest = await response.json();
  let failures = 0;
  for (const [index, file] of files.entries()) {
    const row = rows[index];
    try {
      // On this page's own origin, whatever address the store names in upload_url.
      const url = `${base}${manifest.transfer_key}/${manifest.files[index].num}`;
      await sendFile(file, url, row, (bytes) => {
        sent[index] = bytes;
        row.progress(bytes);
        update();
      });
      row.message("Uploaded and verified.", "done");
    } catch (error) {
      failures += 1;
      row.message(error.message, "failed");
    }
  }
  say(failures ? `${failures} of ${files.length} file(s) failed.` : `${files.length} file(s) uploaded.`);
  await refreshList();
}

async function sendFile(file, url, row, progress) {
  let offset = await withRetries(() => headOffset(url), row);
  progress(offset);
  if (file.size === 0) {
    // Nothing to append, but an empty file is published by an (empty) PATCH too.
    await withRetries(() => patch(url, 0, new ArrayBuffer(0), null, () => {}).catch((error) => {
      if (!error.message.includes(" 409 ")) throw error; // 409: it was published already
    }), row);
    return;
  }
  let attempt = 0;
  while (offset < file.size) {
    const buffer = await file.slice(offset, offset + CHUNK).arrayBuffer();
    const checksum = globalThis.crypto && crypto.subtle ? await sha256Base64(buffer) : null;
    try {
      const start = offset;
      offset = await patch(url, offset, buffer, checksum, (loaded) => progress(start + loaded));
      attempt = 0;
      row.message("");
    } catch (error) {
      if (!error.retryable) throw error;
      if (attempt >= RETRY_DELAYS.length) throw new UploadError(`Gave up after repeated failures: ${error.message}`);
      const delay = RETRY_DELAYS[attempt];
      attempt += 1;
      row.message(`${error.message} — resuming in ${delay / 1000} s…`);
      await new Promise((resolve) => setTimeout(resolve, delay));
      offset = await withRetries(() => headOffset(url), row);
    }
    progress(offset);
  }
}

async function withRetries(call, row) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await call();
    } catch (error) {
      if (!error.retryable || attempt >= RETRY_DELAYS.length) throw error;
      row.message(`${error.message} — retrying…`);
      await new Promise((resolve) => setTimeout(resolve, RETRY_DELAYS[attempt]));
    }
  }
}

async function headOffset(url) {
  let response;
  try {
    response = await fetch(url, { method: "HEAD", headers: { "Tus-Resumable": "1.0.0" }, cache: "no-store" });
  } catch (error) {
    throw new UploadError("The connection failed", true);
  }
  if (response.status === 200) return Number(response.headers.get("Upload-Offset"));
  if (response.status === 410) throw new UploadError("The upload expired or was cancelled.", false);
  if (response.status >= 500) throw new UploadError(`The store answered ${response.status}`, true);
  throw new UploadError(`The store answered ${response.status} ${response.statusText}`, false);
}

function patch(url, offset, buffer, checksum, progress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("PATCH", url);
    const headers = {
      "Tus-Resumable": "1.0.0",
      "Content-Type": "application/offset+octet-stream",
      "Upload-Offset": String(offset),
    };
    if (checksum) headers["Upload-Checksum"] = `sha256 ${checksum}`;
    for (const [name, value] of Object.entries(headers)) request.setRequestHeader(name, value);
    request.upload.onprogress = (event) => progress(event.loaded);
    request.onerror = () => reject(new UploadError("The connection failed", true));
    request.ontimeout = () => reject(new UploadError("The connection timed out", true));
    request.onload = () => {
      const status = request.status;
      if (status === 204) {
        resolve(Number(request.getResponseHeader("Upload-Offset")));
        return;
      }
      const message = (request.responseText.split("\n")[0] || request.statusText).trim();
      if (status === 460 && message.includes("whole file")) {
        reject(new UploadError("Checksum mismatch: the file does not match what was announced; it was discarded.", false));
      } else if (status === 409 || status === 423 || status === 460 || status >= 500) {
        reject(new UploadError(`The store answered ${status} ${message}`, true));
      } else if (status === 410) {
        reject(new UploadError("The upload expired or was cancelled.", false));
      } else {
        reject(new UploadError(`The store answered ${status}: ${message}`, false));
      }
    };
    request.send(buffer);
  });
}

// -- wiring ---------------------------------------------------------------------------------

function start() {
  $("#needs-script").hidden = true;
  $("#whoami").textContent = "Checking who you are…";
  $("#prefix-name").textContent = `/${prefix}/`;
  document.title = `datastore /${prefix}/`;
  $("#signin").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#token").value.trim();
    $("#token").value = "";
    if (token) signIn(token).catch((error) => say(`Sign-in failed: ${error.message}`));
  });
  $("#signout").addEventListener("click", () => signOut().catch((error) => say(`Sign-out failed: ${error.message}`)));

  const zone = $("#drop-zone");
  const input = $("#file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    uploadFiles(event.dataTransfer.files).catch((error) => say(`Upload failed: ${error.message}`));
  });
  input.addEventListener("change", () => {
    const files = Array.from(input.files);
    input.value = "";
    uploadFiles(files).catch((error) => say(`Upload failed: ${error.message}`));
  });
  // A link such as /files/#token=dst_… fills in the token (the fragment never reaches a server or a
  // log); signing in with it stays the person's own act, so that no link swaps a session silently.
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) history.replaceState(null, "", location.pathname + location.search);
  whoAmI()
    .then(() => {
      follow();
      if (!fromLink) return refreshList();
      $("#signin").hidden = false;
      $("#token").value = fromLink;
      say("This link carries a token: press Sign in to use it.");
      return undefined;
    })
    .catch((error) => say(`Could not list the files: ${error.message}`));
}

document.addEventListener("DOMContentLoaded", start);
