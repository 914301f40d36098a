// The console's page: polls /console/overview about every 2 s and redraws, asks for a token
// when the node wants one (401), and looks keys up on their replicas.

import { CallFailed, SignInNeeded, forgetToken, get, keepToken, token } from "./api.js";
import { el, relativeTime } from "./format.js";
import { renderLookup } from "./lookup.js";
import { memberRow, repairTable } from "./members.js";
import { drawOwners, drawRisk, legend } from "./ring.js";

const $ = (selector) => document.querySelector(selector);
const DEFAULT_POLL_MS = 2000;
const RETRY_MS = 2000;

const state = {
  pollMs: DEFAULT_POLL_MS,
  timer: null,
  ringFingerprint: null,
  ringMembers: [],
  lookupKey: null,
  lookupSeq: 0,
};

function show(view) {
  $("#login").hidden = view !== "login";
  $("#console").hidden = view !== "console";
  $("#sign-out").hidden = view !== "console" || !token();
}

function status(text) {
  $("#status").textContent = text;
}

function renderVerdict(overview) {
  const section = $("#verdict");
  section.dataset.verdict = overview.verdict;
  $("#verdict-word").textContent = overview.verdict;
  const reasons = overview.reasons.length ? overview.reasons
    : [`every member is up and ready, and every arc has its ${overview.replication_factor} replicas reachable`];
  $("#reasons").replaceChildren(...reasons.map((reason) => el("li", {}, reason)));
}

async function renderRing(overview) {
  const ring = overview.ring;
  if (ring.fingerprint !== state.ringFingerprint) {
    const owners = await get("/console/ring");
    drawOwners($("#ring"), owners);
    state.ringFingerprint = owners.fingerprint;
    state.ringMembers = owners.members;
  }
  drawRisk($("#ring"), ring);
  $("#ring-counts").textContent =
    `${ring.arcs} arcs, N = ${overview.replication_factor}, quorum ${overview.quorum}: ` +
    `${ring.below_n} below N, ${ring.below_quorum} below quorum`;
  legend($("#ring-legend"), ring, overview.members);
}

async function render(overview) {
  state.pollMs = overview.poll_ms || DEFAULT_POLL_MS;
  $("#serving").textContent = `served by ${overview.node_id} · ring epoch ${overview.epoch}`;
  renderVerdict(overview);
  $("#members tbody").replaceChildren(...overview.members.map(memberRow));
  $("#repair").replaceChildren(repairTable(overview.members, overview.wall_ms));
  await renderRing(overview);
  $("#updated").replaceChildren("updated ", relativeTime(overview.wall_ms, overview.wall_ms));
}

async function refreshLookup() {
  if (!state.lookupKey) return;
  const seq = ++state.lookupSeq;
  const container = $("#lookup");
  try {
    const answer = await get(`/console/key?key=${encodeURIComponent(state.lookupKey)}`);
    if (seq === state.lookupSeq) renderLookup(container, answer, state.ringMembers);
  } catch (error) {
    if (error instanceof SignInNeeded) throw error;
    if (seq !== state.lookupSeq) return;
    delete container.dataset.agree;
    const message = error instanceof CallFailed && error.status === 403
      ? `not allowed to read this key: ${error.message}` : `lookup failed: ${error.message}`;
    container.replaceChildren(el("p", { className: "error" }, message));
  }
}

function schedule(delay) {
  clearTimeout(state.timer);
  state.timer = setTimeout(tick, delay);
}

async function tick() {
  try {
    const overview = await get("/console/overview");
    show("console");
    await render(overview);
    await refreshLookup();
    status("");
    schedule(state.pollMs);
  } catch (error) {
    if (error instanceof SignInNeeded) {
      signIn(token() ? "the token kept for this tab was refused; sign in again" : "");
      return;
    }
    status(`no answer from this node (${error.message}); retrying every ${RETRY_MS / 1000} s`);
    $("#updated").textContent = "stale";
    schedule(RETRY_MS);
  }
}

function signIn(message) {
  clearTimeout(state.timer);
  forgetToken();
  show("login");
  $("#login-error").textContent = message;
  $("#token-input").focus();
}

async function trySignIn(event) {
  event.preventDefault();
  const candidate = $("#token-input").value.trim();
  if (!candidate) return;
  try {
    await get("/console/overview", candidate);
  } catch (error) {
    $("#login-error").textContent = error instanceof SignInNeeded
      ? "that token was refused" : `could not sign in: ${error.message}`;
    return;
  }
  keepToken(candidate);
  $("#token-input").value = "";
  $("#login-error").textContent = "";
  tick();
}

function lookUp(event) {
  event.preventDefault();
  const key = $("#key-input").value;
  if (!key) return;
  state.lookupKey = key;
  $("#lookup").replaceChildren(el("p", { className: "muted" }, "looking up…"));
  refreshLookup().catch(() => tick());
}

$("#login-form").addEventListener("submit", trySignIn);
$("#lookup-form").addEventListener("submit", lookUp);
$("#sign-out").addEventListener("click", () => signIn("signed out"));
tick();
