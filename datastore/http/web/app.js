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
let currentIdentity = null;

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
  currentIdentity = who;
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
  await Promise.all([
    loadJobs(currentIdentity),
    loadInvites(currentIdentity).catch((error) => sayInvites(`Could not list the invitations: ${error.message}`)),
  ]);
}

async function signOut() {
  await fetch("/_api/v1/session", { method: "DELETE" });
  showIdentity({ kind: "anonymous" });
  hideJobs();
  hideInvites();
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
        file.sha256 || "pending",
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
  // A digest computed after publishing replaces "pending" in the list.
  events.addEventListener("file.digested", () => refreshSoon());
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

// -- transfer jobs ----------------------------------------------------------------------------
// The signed-in identity's jobs (GET /_api/v1/jobs), newest first, at most JOBS_SHOWN of them;
// the section shows only when the store answers that list (401/403: no jobs for this client).
// They stay current from the stream of all the identity's job events (no polling): a state
// event refetches the job at once, a progress event moves its bar at once and refetches it (for
// its rate) at most once a second. The buttons are those the job's state allows
// (jobs/states.py's transition table); a refused step shows the store's message.

const JOBS_SHOWN = 50;
const JOBS_PAGE = 500;
const JOBS_PAGES = 20; // the list is oldest first: at most this many pages are read to find the newest
const JOB_REFETCH_MS = 1000;
const JOB_EVENTS = [
  "job.submitted",
  "job.queued",
  "job.awaiting_acceptance",
  "job.active",
  "job.paused",
  "job.user_stopped",
  "job.finished",
  "job.finished_dirty",
  "job.failed",
  "job.expired",
  "job.declined",
  "job.invite_not_accepted_on_time",
  "job.priority",
  "job.file.started",
  "job.file.retrying",
  "job.file.interrupted",
  "job.file.finished",
  "job.file.failed",
];
// The steps each job state allows (JOB_TRANSITIONS and CLEARABLE_JOB_STATES in jobs/states.py).
const JOB_STEPS = {
  pause: ["QUEUED", "ACTIVE"],
  resume: ["PAUSED", "USER_STOPPED"],
  stop: ["QUEUED", "AWAITING_ACCEPTANCE", "ACTIVE", "PAUSED"],
  retry: ["FINISHED_DIRTY", "FAILED", "EXPIRED"],
  clear: [
    "SUBMITTED",
    "USER_STOPPED",
    "FINISHED",
    "FINISHED_DIRTY",
    "FAILED",
    "INVITE_NOT_ACCEPTED_ON_TIME",
    "DECLINED",
    "EXPIRED",
  ],
};
const STEP_LABELS = { pause: "Pause", resume: "Resume", stop: "Stop", retry: "Retry", clear: "Clear" };

let jobEvents = null;
let jobsGeneration = 0; // a sign-in or sign-out starts again; answers for an older one are dropped
const jobs = new Map(); // id -> { doc, row, fetching, again, timer, fetchedAt }
const olderJobs = new Set(); // ids known to be older than the jobs shown: their events are ignored
const addingJobs = new Map(); // id -> whether another event came while its first fetch was out

function sayJobs(message) {
  $("#jobs-message").textContent = message;
}

function hideJobs() {
  jobsGeneration += 1;
  if (jobEvents) jobEvents.close();
  jobEvents = null;
  for (const entry of jobs.values()) clearTimeout(entry.timer);
  jobs.clear();
  olderJobs.clear();
  addingJobs.clear();
  $("#jobs tbody").replaceChildren();
  $("#jobs-section").hidden = true;
  sayJobs("");
}

async function loadJobs(who) {
  hideJobs();
  if (who && who.kind === "anonymous") return;
  const generation = jobsGeneration;
  let summaries = [];
  let after = 0;
  for (let page = 0; page < JOBS_PAGES; page += 1) {
    const response = await fetch(`/_api/v1/jobs?limit=${JOBS_PAGE}&after=${after}`, {
      headers: { Accept: "application/json" },
      cache: "no-store",
    });
    if (generation !== jobsGeneration) return;
    if (response.status === 401 || response.status === 403) return; // this client has no jobs
    if (!response.ok) {
      $("#jobs-section").hidden = false;
      sayJobs(`Could not list the transfer jobs: ${await errorMessage(response)}`);
      return;
    }
    const body = await response.json();
    summaries = summaries.concat(body.jobs).slice(-JOBS_SHOWN);
    if (body.next === null || body.next === undefined) break;
    after = body.next;
  }
  if (generation !== jobsGeneration) return;
  $("#jobs-section").hidden = false;
  followJobs(generation);
  for (const summary of summaries.reverse()) placeJob(summary);
  showJobsEmpty();
  // The list carries no progress: each job's own document does.
  await Promise.all(Array.from(jobs.keys(), (id) => refetchJob(id)));
}

function followJobs(generation) {
  jobEvents = new EventSource("/_api/v1/jobs/events");
  for (const type of JOB_EVENTS) {
    jobEvents.addEventListener(type, (message) => {
      if (generation === jobsGeneration) jobEvent(type, JSON.parse(message.data));
    });
  }
  jobEvents.addEventListener("job.file.progress", (message) => {
    if (generation === jobsGeneration) jobProgress(JSON.parse(message.data));
  });
}

function jobEvent(type, event) {
  if (olderJobs.has(event.job)) return;
  if (jobs.has(event.job)) refetchJob(event.job);
  // A job this page has not seen (just submitted, or while the page was not listening).
  else addJob(event.job).catch((error) => sayJobs(`Could not read job ${shortId(event.job)}: ${error.message}`));
}

function jobProgress(event) {
  const entry = jobs.get(event.job);
  if (!entry) return;
  if (entry.doc.files) {
    const file = entry.doc.files.find((f) => f.index === event.file);
    // Not for a file the page already knows ended: an event older than the document read last.
    if (file && typeof event.bytes === "number" && !["FINISHED", "FAILED"].includes(file.state)) {
      file.bytes = event.bytes;
      if (typeof event.size === "number" && file.size === null) file.size = event.size;
      entry.doc.bytes = entry.doc.files.reduce((sum, f) => sum + (f.bytes || 0), 0);
      const sizes = entry.doc.files.map((f) => f.size);
      entry.doc.size = sizes.includes(null) ? null : sizes.reduce((sum, size) => sum + size, 0);
      showJob(entry);
    }
  }
  scheduleJob(event.job);
}

async function addJob(id) {
  if (addingJobs.has(id)) {
    addingJobs.set(id, true);
    return;
  }
  const generation = jobsGeneration;
  addingJobs.set(id, false);
  let doc;
  let again = false;
  try {
    doc = await fetchJob(id);
  } finally {
    if (generation === jobsGeneration) {
      again = addingJobs.get(id);
      addingJobs.delete(id);
    }
  }
  if (!doc || generation !== jobsGeneration) return;
  if (jobs.has(id)) refetchJob(id);
  else placeJob(doc);
  if (again) refetchJob(id);
  showJobsEmpty();
}

async function fetchJob(id) {
  const response = await fetch(`/_api/v1/jobs/${encodeURIComponent(id)}`, {
    headers: { Accept: "application/json" },
    cache: "no-store",
  });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function newest(a, b) {
  // Newest first: by creation time, then by id for the same instant.
  const when = (doc) => Date.parse(doc.created_at) || 0;
  return when(b) - when(a) || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0);
}

function placeJob(doc) {
  const entry = { doc, row: makeJobRow(doc.id), fetching: false, again: false, timer: null, fetchedAt: 0 };
  jobs.set(doc.id, entry);
  const body = $("#jobs tbody");
  const before = Array.from(body.rows).find((other) => newest(doc, jobs.get(other.dataset.job).doc) < 0);
  body.insertBefore(entry.row, before || null);
  showJob(entry);
  // Only the newest JOBS_SHOWN stay.
  while (body.rows.length > JOBS_SHOWN) {
    const last = body.rows[body.rows.length - 1];
    const id = last.dataset.job;
    const dropped = jobs.get(id);
    if (dropped) clearTimeout(dropped.timer);
    jobs.delete(id);
    olderJobs.add(id);
    last.remove();
  }
}

function scheduleJob(id) {
  // A progress event: refetch, but not more than once a JOB_REFETCH_MS.
  const entry = jobs.get(id);
  if (!entry || entry.timer) return;
  const wait = Math.max(0, entry.fetchedAt + JOB_REFETCH_MS - Date.now());
  entry.timer = setTimeout(() => {
    entry.timer = null;
    refetchJob(id);
  }, wait);
}

async function refetchJob(id) {
  const entry = jobs.get(id);
  if (!entry) return;
  clearTimeout(entry.timer);
  entry.timer = null;
  if (entry.fetching) {
    entry.again = true; // one more when this answer is in: an event came after the request left
    return;
  }
  const generation = jobsGeneration;
  entry.fetching = true;
  entry.fetchedAt = Date.now();
  try {
    const doc = await fetchJob(id);
    if (generation !== jobsGeneration || jobs.get(id) !== entry) return;
    if (doc === null) {
      dropJob(id);
      return;
    }
    entry.doc = doc;
    showJob(entry);
  } catch (error) {
    sayJobs(`Could not read job ${shortId(id)}: ${error.message}`);
  } finally {
    entry.fetching = false;
    if (entry.again && jobs.get(id) === entry) {
      entry.again = false;
      refetchJob(id);
    }
  }
}

function dropJob(id) {
  const entry = jobs.get(id);
  if (!entry) return;
  clearTimeout(entry.timer);
  entry.row.remove();
  jobs.delete(id);
  showJobsEmpty();
}

function showJobsEmpty() {
  $("#jobs-empty").hidden = jobs.size > 0;
  $("#jobs").hidden = jobs.size === 0;
}

function shortId(id) {
  return id.slice(0, 8);
}

function makeJobRow(id) {
  const row = $("#job-row").content.firstElementChild.cloneNode(true);
  row.dataset.job = id;
  const code = row.querySelector(".job code");
  code.textContent = shortId(id);
  code.title = id;
  row.querySelector("progress").setAttribute("aria-label", `Progress of job ${shortId(id)}`);
  for (const button of row.querySelectorAll("button[data-step]")) {
    const step = button.dataset.step;
    button.setAttribute("aria-label", `${STEP_LABELS[step]} job ${shortId(id)}`);
    button.addEventListener("click", () => {
      jobStep(id, step, button).catch((error) => sayJobs(`${STEP_LABELS[step]} failed: ${error.message}`));
    });
  }
  return row;
}

function showJob(entry) {
  const { doc, row } = entry;
  row.dataset.state = doc.state;
  row.querySelector(".state .name").textContent = doc.state;
  // Its files by state ("1 ACTIVE, 2 QUEUED"): a job's state does not say all (a resumed job is
  // QUEUED while a file a runner still holds goes on).
  const counts = Object.entries(doc.files_by_state || {});
  row.querySelector(".state .files").textContent = counts.length
    ? `files: ${counts.map(([state, count]) => `${count} ${state}`).join(", ")}`
    : "";
  const bar = row.querySelector("progress");
  const numbers = row.querySelector(".progress .numbers");
  const bytes = doc.bytes;
  const size = doc.size;
  if (typeof bytes !== "number") {
    // A summary, before its document arrives.
    bar.removeAttribute("value");
    numbers.textContent = "";
  } else if (typeof size === "number" && size > 0) {
    const percent = doc.state === "FINISHED" ? 100 : Math.min(100, Math.floor((bytes / size) * 100));
    bar.max = size;
    bar.value = Math.min(bytes, size);
    numbers.textContent = `${percent} % (${human(bytes)} of ${human(size)})`;
  } else if (size === 0) {
    bar.max = 1;
    bar.value = doc.state === "FINISHED" ? 1 : 0;
    numbers.textContent = `${doc.state === "FINISHED" ? 100 : 0} % (0 bytes)`;
  } else {
    bar.removeAttribute("value"); // the size is not known yet
    numbers.textContent = human(bytes);
  }
  const rate = row.querySelector(".rate");
  rate.textContent = doc.state === "ACTIVE" && doc.rate > 0 ? `${human(Math.round(doc.rate))}/s` : "—";
  const error = row.querySelector(".error");
  const last = doc.last_error;
  const text = last ? [last.reason, last.message].filter(Boolean).join(": ") : doc.reason || "";
  error.textContent = (text.split("\n")[0] || "").trim();
  error.title = text;
  for (const button of row.querySelectorAll("button[data-step]")) {
    button.hidden = !JOB_STEPS[button.dataset.step].includes(doc.state);
  }
}

async function jobStep(id, step, button) {
  button.disabled = true;
  try {
    const clear = step === "clear";
    const response = await fetch(clear ? `/_api/v1/jobs/${encodeURIComponent(id)}` : `/_api/v1/jobs/${encodeURIComponent(id)}/${step}`, {
      method: clear ? "DELETE" : "POST",
      headers: { Accept: "application/json" },
    });
    if (!response.ok) {
      sayJobs(`${STEP_LABELS[step]} refused for job ${shortId(id)}: ${await errorMessage(response)}`);
      refetchJob(id);
      return;
    }
    sayJobs("");
    if (clear) {
      dropJob(id);
      return;
    }
    const entry = jobs.get(id);
    if (entry) {
      entry.doc = await response.json();
      showJob(entry);
    }
  } finally {
    button.disabled = false;
  }
}

// -- invitations ------------------------------------------------------------------------------
// The invitations the signed-in identity may answer (GET /_api/v1/invitations: administrators, and
// whoever may upload to an invitation's prefix); the section shows only when the store answers that
// list (401/403: this client answers none). Pending ones first, with Accept (a budget in MiB, the
// size asked unless changed, and a lifetime in days) and Decline; answered ones below, with Extend
// (more bytes) for an accepted voucher with a budget, and Revoke. The store has no event stream for
// invitations and the page does not poll: it reads the list when the section opens, after each
// answer, on Refresh, and whenever the page becomes visible again.

const MIB = 1024 * 1024;
const DAY = 24 * 3600;
const NAMES_SHOWN = 3; // names in the row itself; all of them under "All N names"
const NAMES_TITLED = 100; // names in the row's tooltip
const ANSWERED_SHOWN = 100;
const INVITE_VERBS = { accept: "Accept", decline: "Decline", extend: "Extend", revoke: "Revoke" };
const INVITE_DONE = { accept: "Accepted", decline: "Declined", extend: "Extended", revoke: "Revoked" };

let invitesGeneration = 0; // a sign-in or sign-out starts again; answers for an older one are dropped
let invitesRead = 0; // the latest list asked for: an older answer is dropped
let invitesShown = false;
const invites = new Map(); // id -> { doc, row, kind ("pending" or "answered") }

function sayInvites(message) {
  $("#invites-message").textContent = message;
}

function hideInvites() {
  invitesGeneration += 1;
  invitesShown = false;
  invites.clear();
  $("#invites-pending tbody").replaceChildren();
  $("#invites-answered tbody").replaceChildren();
  $("#invites-section").hidden = true;
  sayInvites("");
}

async function loadInvites(who) {
  hideInvites();
  if (who && who.kind === "anonymous") return;
  await refreshInvites();
}

async function refreshInvites() {
  const generation = invitesGeneration;
  invitesRead += 1;
  const read = invitesRead;
  const current = () => generation === invitesGeneration && read === invitesRead;
  const response = await fetch("/_api/v1/invitations", { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!current()) return;
  if (response.status === 401 || response.status === 403) {
    hideInvites(); // this client answers no invitations (or no longer)
    return;
  }
  if (!response.ok) {
    const message = await errorMessage(response);
    if (!current()) return;
    $("#invites-section").hidden = false;
    invitesShown = true;
    sayInvites(`Could not list the invitations: ${message}`);
    return;
  }
  const { invitations } = await response.json();
  if (!current()) return;
  $("#invites-section").hidden = false;
  invitesShown = true;
  showInvites(invitations);
}

function showInvites(list) {
  const pending = list.filter((doc) => doc.state === "PENDING");
  const answered = list.filter((doc) => doc.state !== "PENDING").slice(0, ANSWERED_SHOWN);
  const wanted = new Map([...pending.map((doc) => [doc.id, "pending"]), ...answered.map((doc) => [doc.id, "answered"])]);
  for (const [id, entry] of invites) {
    if (wanted.get(id) !== entry.kind) {
      entry.row.remove();
      invites.delete(id);
    }
  }
  placeInvites($("#invites-pending tbody"), pending, "pending");
  placeInvites($("#invites-answered tbody"), answered, "answered");
  $("#invites-pending").hidden = pending.length === 0;
  $("#invites-pending-empty").hidden = pending.length > 0;
  $("#invites-answered").hidden = answered.length === 0;
  $("#invites-answered-empty").hidden = answered.length > 0;
}

function placeInvites(body, docs, kind) {
  // Rows are kept (not rebuilt), so that a refresh leaves what is being typed in them alone.
  docs.forEach((doc, index) => {
    let entry = invites.get(doc.id);
    if (!entry) {
      entry = { doc, kind, row: makeInviteRow(doc, kind) };
      invites.set(doc.id, entry);
    }
    entry.doc = doc;
    showInvite(entry);
    if (body.children[index] !== entry.row) body.insertBefore(entry.row, body.children[index] || null);
  });
}

function describeInvite(doc) {
  return `invitation ${shortId(doc.id)} from ${doc.requester || "an unnamed store"}`;
}

function localTime(iso) {
  const when = iso ? new Date(iso) : null;
  return when && !Number.isNaN(when.getTime()) ? when.toLocaleString() : "—";
}

function exactBytes(bytes) {
  return `${bytes.toLocaleString("en")} bytes`;
}

function makeInviteRow(doc, kind) {
  const row = $(`#invite-${kind}-row`).content.firstElementChild.cloneNode(true);
  const id = doc.id;
  const described = describeInvite(doc);
  row.dataset.invitation = id;
  // What does not change: who asks, for which files.
  row.querySelector(".requester .who").textContent = doc.requester || "—";
  row.querySelector(".requester .when").textContent = `asked ${localTime(doc.created_at)}`;
  const into = doc.direction === "push" ? "into" : "out of";
  row.querySelector(".files .where").textContent = `${doc.direction} ${into} /${doc.prefix}/:`;
  const names = doc.names || [];
  const shown = row.querySelector(".files .names");
  const more = names.length - NAMES_SHOWN;
  shown.textContent = names.slice(0, NAMES_SHOWN).join(", ") + (more > 0 ? ` and ${more} more` : "");
  shown.title = names.slice(0, NAMES_TITLED).join("\n") + (names.length > NAMES_TITLED ? "\n…" : "");
  if (more > 0) {
    const details = row.querySelector(".files details");
    details.hidden = false;
    details.querySelector("summary").textContent = `All ${names.length} names`;
    details.querySelector("ul").replaceChildren(
      ...names.map((name) => {
        const item = document.createElement("li");
        item.textContent = name;
        return item;
      }),
    );
  }
  for (const input of row.querySelectorAll("input")) {
    const label = input.closest("label").querySelector("span").textContent;
    input.setAttribute("aria-label", `${label} for ${described}`);
  }
  for (const button of row.querySelectorAll("button[data-verb]")) {
    const verb = button.dataset.verb;
    button.setAttribute("aria-label", `${INVITE_VERBS[verb]} ${described}`);
    if (button.type === "button") button.addEventListener("click", () => answerInvite(id, verb, button, null));
  }
  for (const form of row.querySelectorAll("form")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      const verb = button.dataset.verb;
      const body = verb === "accept" ? acceptance(form) : extension(form);
      if (body) answerInvite(id, verb, button, body);
    });
  }
  return row;
}

function showInvite(entry) {
  const { doc, row, kind } = entry;
  row.dataset.state = doc.state;
  if (kind === "pending") {
    const size = row.querySelector(".size");
    size.textContent = doc.budget === null ? "—" : human(doc.budget);
    size.title = doc.budget === null ? "" : exactBytes(doc.budget);
    row.querySelector(".answer-by").textContent = localTime(doc.answer_by);
    // The budget field starts at the size asked (in MiB); what someone typed stays.
    const field = row.querySelector("input[name=budget]");
    const asked = doc.budget === null ? "" : String(doc.budget);
    if (field.dataset.asked !== asked) {
      field.dataset.asked = asked;
      field.dataset.prefilled = asked === "" ? "" : String(Number((doc.budget / MIB).toPrecision(6)));
      field.value = field.dataset.prefilled;
    }
    return;
  }
  row.querySelector(".state .name").textContent = doc.state;
  const until = { ACCEPTED: "until", EXPIRED: "since" }[doc.state];
  row.querySelector(".state .until").textContent = until ? `${until} ${localTime(doc.expires_at)}` : "";
  const budget = row.querySelector(".budget");
  if (doc.state === "DECLINED") {
    // Never a voucher: what was asked, nothing used.
    budget.textContent = doc.budget === null ? "—" : `${human(doc.budget)} asked`;
    budget.title = doc.budget === null ? "" : exactBytes(doc.budget);
  } else if (doc.budget === null) {
    budget.textContent = `no limit; ${human(doc.used || 0)} used`;
    budget.title = "";
  } else {
    budget.textContent = `${human(doc.used)} used of ${human(doc.budget)}; ${human(doc.left)} left`;
    budget.title = `${exactBytes(doc.used)} used of ${exactBytes(doc.budget)}; ${exactBytes(doc.left)} left`;
  }
  row.querySelector(".answered-by .who").textContent = doc.answered_by || "—";
  row.querySelector(".answered-by .when").textContent = doc.answered_at ? localTime(doc.answered_at) : "";
  row.querySelector("form.extend").hidden = !(doc.state === "ACCEPTED" && doc.budget !== null);
  row.querySelector(".actions > button[data-verb=revoke]").hidden = doc.state !== "ACCEPTED";
}

function acceptance(form) {
  // {budget (bytes), lifetime (seconds)}, or null (and why) for a field that is not a number.
  const body = {};
  const field = form.elements.budget;
  const text = field.value.trim();
  if (text !== "" && text === field.dataset.prefilled) {
    body.budget = Number(field.dataset.asked); // the size asked, to the byte
  } else if (text !== "") {
    const mib = Number(text);
    if (!Number.isFinite(mib) || mib < 0) {
      sayInvites("The budget must be a number of MiB (0 or more), or empty for the size asked.");
      return null;
    }
    body.budget = Math.round(mib * MIB);
  }
  const days = Number(form.elements.lifetime.value.trim() || "30");
  if (!Number.isFinite(days) || days <= 0) {
    sayInvites("The lifetime must be a number of days, more than 0.");
    return null;
  }
  body.lifetime = Math.max(1, Math.round(days * DAY));
  return body;
}

function extension(form) {
  const text = form.elements.bytes.value.trim();
  const bytes = Number(text);
  if (text === "" || !Number.isSafeInteger(bytes) || bytes <= 0) {
    sayInvites("Extend by a whole number of bytes, more than 0.");
    return null;
  }
  return { bytes };
}

async function answerInvite(id, verb, button, body) {
  const generation = invitesGeneration;
  const entry = invites.get(id);
  const described = entry ? describeInvite(entry.doc) : `invitation ${shortId(id)}`;
  const url = `/_api/v1/invitations/${encodeURIComponent(id)}`;
  const buttons = entry ? Array.from(entry.row.querySelectorAll("button")) : [button];
  for (const each of buttons) each.disabled = true;
  try {
    const headers = { Accept: "application/json" };
    if (body) headers["Content-Type"] = "application/json";
    const response = await fetch(verb === "revoke" ? url : `${url}/${verb}`, {
      method: verb === "revoke" ? "DELETE" : "POST",
      headers,
      body: body ? JSON.stringify(body) : undefined,
    });
    const message = response.ok ? "" : await errorMessage(response);
    if (generation !== invitesGeneration) return;
    if (!response.ok) {
      sayInvites(`${INVITE_VERBS[verb]} refused for ${described}: ${message}`);
    } else {
      const extra = verb === "extend" ? ` by ${exactBytes(body.bytes)}` : "";
      sayInvites(`${INVITE_DONE[verb]} ${described}${extra}.`);
      if (verb === "extend" && entry) entry.row.querySelector("input[name=bytes]").value = "";
    }
  } catch (error) {
    if (generation === invitesGeneration) sayInvites(`${INVITE_VERBS[verb]} failed for ${described}: ${error.message}`);
  } finally {
    for (const each of buttons) each.disabled = false;
  }
  if (generation === invitesGeneration) await refreshInvites();
}

function refreshInvitesNow() {
  refreshInvites().catch((error) => sayInvites(`Could not list the invitations: ${error.message}`));
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
  $("#invites-refresh").addEventListener("click", refreshInvitesNow);
  // No event stream tells of new invitations: read them again whenever the page is shown again.
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && invitesShown) refreshInvitesNow();
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
      loadJobs(currentIdentity).catch((error) => sayJobs(`Could not list the transfer jobs: ${error.message}`));
      loadInvites(currentIdentity).catch((error) => sayInvites(`Could not list the invitations: ${error.message}`));
      if (!fromLink) return refreshList();
      $("#signin").hidden = false;
      $("#token").value = fromLink;
      say("This link carries a token: press Sign in to use it.");
      return undefined;
    })
    .catch((error) => say(`Could not list the files: ${error.message}`));
}

document.addEventListener("DOMContentLoaded", start);
