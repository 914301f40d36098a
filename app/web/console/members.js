// The member rows, and the rebalancing and anti-entropy table, from /console/overview.

import { badge, bytes, count, el, millis, percent, relativeTime, seconds } from "./format.js";

function memberCell(row) {
  return el("td", {},
    el("strong", {}, row.node_id), row.self ? el("span", { className: "muted small" }, " (this node)") : null,
    el("br"), el("span", { className: "muted small" }, row.url));
}

function hereCell(row) {
  const since = row.since_s === null ? null : `for ${seconds(row.since_s)}`;
  const title = row.state === "down" ? row.last_error || "unreachable" : "reachable";
  return el("td", {}, badge(row.state, row.state, title), since ? el("span", { className: "muted small" }, ` ${since}`) : null);
}

function othersCell(row) {
  const observers = Object.entries(row.seen_by);
  if (!observers.length) return el("td", { className: "muted" }, "—");
  return el("td", { className: "small" }, ...observers.flatMap(([observer, state], i) => [
    i ? " " : null,
    badge(`${observer}: ${state ?? "?"}`, state ?? "unknown", `${row.node_id} as ${observer} sees it`),
  ]));
}

function readyCell(row) {
  if (row.ready === null) return el("td", {}, badge("?", "unknown", row.answer_error || "no answer from it"));
  if (row.ready) return el("td", {}, badge("ready", "ready"));
  return el("td", {}, badge("not ready", "unready"), el("br"), el("span", { className: "small" }, row.not_ready_reason));
}

function clockCell(row) {
  if (row.self) return el("td", { className: "muted small" }, "reference");
  if (row.clock_offset_ms === null) return el("td", { className: "muted" }, "?");
  const sign = row.clock_offset_ms > 0 ? "+" : "";
  return el("td", { className: "num", title: "its wall clock minus this node's, measured every second" },
    `${sign}${millis(row.clock_offset_ms)}`);
}

function meter(fraction) {
  const clamped = Math.max(0, Math.min(1, fraction));
  const bar = el("span");
  bar.style.width = `${(clamped * 100).toFixed(1)}%`;
  return el("span", { className: `meter${fraction >= 0.95 ? " full" : fraction >= 0.8 ? " high" : ""}` }, bar);
}

function storageCell(row) {
  if (row.storage_used_bytes === null || row.storage_used_bytes === undefined) {
    return el("td", { className: "muted", title: row.answer_error || "" }, row.ready === null ? "?" : "in memory");
  }
  const limit = row.storage_limit_bytes;
  return el("td", { className: "num" },
    limit ? meter(row.storage_used_bytes / limit) : null,
    `${bytes(row.storage_used_bytes)} of ${limit ? bytes(limit) : "no limit"}`);
}

function syncingCell(row) {
  if (row.syncing === null || row.syncing === undefined) return el("td", { className: "muted" }, "?");
  const pending = row.rebalance ? row.rebalance.pending_ranges : 0;
  return el("td", {}, row.syncing ? `yes (${count(pending, "range")})` : "no");
}

export function memberRow(row) {
  return el("tr", { dataset: { nodeId: row.node_id, state: row.state } },
    memberCell(row),
    el("td", {}, row.version || "?", row.incompatible ? " " : null,
      row.incompatible ? badge("incompatible", "down", row.incompatible) : null),
    hereCell(row),
    othersCell(row),
    readyCell(row),
    clockCell(row),
    el("td", { className: "num" }, `${percent(row.share)} · ${percent(row.replica_share)}`),
    el("td", { className: "num" }, count(row.live_keys)),
    storageCell(row),
    el("td", { className: "num" }, count(row.hints_pending)),
    syncingCell(row),
  );
}

function rebalanceCell(rebalance) {
  if (!rebalance) return el("td", { className: "muted" }, "?");
  const { records_pulled: pulled, records_needed: needed } = rebalance;
  if (!needed && !rebalance.syncing) return el("td", { className: "muted" }, "nothing to pull");
  const fraction = needed ? pulled / needed : 1;
  return el("td", { className: "num", title: "records received by the last (or current) sync, of those it needs" },
    meter(fraction), `${count(pulled)} of ${count(needed, "record")} pulled`,
    rebalance.syncing ? el("span", { className: "muted small" }, ` · ${count(rebalance.pending_ranges, "range")} to go`) : null);
}

function surplusCell(rebalance) {
  if (!rebalance) return el("td", { className: "muted" }, "?");
  if (!rebalance.surplus_keys) return el("td", { className: "muted" }, "none");
  return el("td", { className: "num" },
    `${count(rebalance.surplus_keys, "record")} in ${count(rebalance.surplus_ranges, "arc")}`);
}

function antiEntropyCell(ae, nowMs) {
  if (!ae) return el("td", { className: "muted" }, "?");
  const last = ae.last_round;
  const every = el("span", { className: "muted small" }, ` · every ${seconds(ae.interval_s)}`);
  if (!last) return el("td", { className: "muted" }, "no round yet", every);
  return el("td", {},
    relativeTime(last.finished_ms, nowMs),
    last.reached === false ? ` with ${last.peer}: it stopped answering`
      : ` with ${last.peer}: repaired ${count(last.repaired, "record")}`,
    el("br"),
    el("span", { className: "muted small" }, `${count(ae.rounds, "round")}, ${count(ae.repaired_total, "record")} repaired in all`),
    every);
}

export function repairTable(rows, nowMs) {
  return el("table", {},
    el("thead", {}, el("tr", {},
      el("th", {}, "Member"), el("th", {}, "Rebalancing"), el("th", {}, "Surplus awaiting hand-off"),
      el("th", {}, "Last anti-entropy round"))),
    el("tbody", {}, ...rows.map((row) => el("tr", { dataset: { repairNode: row.node_id } },
      el("td", {}, el("strong", {}, row.node_id)),
      rebalanceCell(row.rebalance),
      surplusCell(row.rebalance),
      antiEntropyCell(row.anti_entropy, nowMs)))));
}
