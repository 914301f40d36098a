// One key's copy on each of its replicas, in preference order, from /console/key.

import { badge, bytes, count, el, relativeTime } from "./format.js";
import { colourOf } from "./ring.js";

function newest(copies) {
  return copies.filter((c) => c.version).map((c) => c.version)
    .sort((a, b) => {
      const [ha, na] = [BigInt(a.split(".")[0]), a.slice(a.indexOf(".") + 1)];
      const [hb, nb] = [BigInt(b.split(".")[0]), b.slice(b.indexOf(".") + 1)];
      return ha === hb ? (na < nb ? -1 : na > nb ? 1 : 0) : ha < hb ? -1 : 1;
    }).pop() ?? null;
}

function copyItem(copy, index, latest, members, nowMs) {
  const answered = copy.state !== "unreachable";
  const matches = answered ? String(copy.version === latest) : "unknown";
  const swatch = el("span", { className: "swatch" });
  swatch.style.backgroundColor = colourOf(members, copy.node_id);
  const details = [];
  if (!answered) {
    details.push(el("span", { className: "muted" }, copy.error || "no answer"));
  } else if (copy.version) {
    details.push(el("code", { title: "hybrid-logical-clock version" }, copy.version), " written ",
      relativeTime(copy.version_wall_ms, nowMs));
    if (copy.value_bytes !== null) details.push(` · ${bytes(copy.value_bytes)}`);
    details.push(" · ", copy.expires_at_ms ? el("span", {}, "expires ", relativeTime(copy.expires_at_ms, nowMs))
      : "never expires");
  } else {
    details.push(el("span", { className: "muted" }, "holds no copy"));
  }
  if (copy.syncing) details.push(el("span", { className: "muted small" }, " · still syncing this arc"));
  const kind = copy.state === "live" ? "up" : copy.state === "unreachable" ? "unknown" : "down";
  return el("li", { dataset: { replica: copy.node_id, state: copy.state, version: copy.version ?? "", matches } },
    el("span", { className: "rank", title: "position in the preference list" }, `#${index + 1}`),
    el("span", {}, swatch, el("strong", {}, copy.node_id), " ", badge(copy.state, kind)),
    el("span", {}, ...details));
}

export function renderLookup(container, answer, members) {
  const latest = newest(answer.copies);
  const summary = answer.agree
    ? `${answer.answered === answer.replicas ? `all ${answer.replicas}` : `${answer.answered} of ${answer.replicas}`} replicas agree`
    : `replicas disagree: ${count(answer.copies.filter((c) => c.state !== "unreachable" && c.version !== latest).length, "replica")} behind`;
  container.dataset.agree = String(answer.agree);
  container.dataset.key = answer.key;
  container.replaceChildren(
    el("p", {}, badge(answer.agree ? "agree" : "disagree", answer.agree ? "agree" : "disagree"), " ",
      el("strong", {}, summary), el("span", { className: "muted" }, ` · key `), el("code", {}, answer.key),
      answer.answered < answer.replicas ? el("span", { className: "muted" }, " · unreachable replicas not compared") : null),
    el("ol", { id: "replicas" }, ...answer.copies.map((copy, i) => copyItem(copy, i, latest, members, answer.now_ms))),
  );
}
