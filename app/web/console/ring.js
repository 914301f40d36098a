// The ring picture: an outer band coloured by each arc's owner, an inner band marking the arcs
// with fewer than N (amber) or fewer than a quorum (red) of replicas reachable.

import { count, el, percent } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
const OWNER_OUTER = 110;
const OWNER_INNER = 86;
const RISK_OUTER = 80;
const RISK_INNER = 68;
// Distinct in light and dark themes alike; a ring of more members reuses them in turn.
export const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
  "#bab0ac", "#e15759"];

export function colourOf(members, nodeId) {
  const index = members.indexOf(nodeId);
  return index < 0 ? "#888888" : PALETTE[index % PALETTE.length];
}

function svg(tag, attributes = {}) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

function point(fraction, radius) {
  const angle = fraction * 2 * Math.PI - Math.PI / 2; // 0 at the top, clockwise
  return `${(radius * Math.cos(angle)).toFixed(3)} ${(radius * Math.sin(angle)).toFixed(3)}`;
}

// The band between two radii from fraction a to b of the circle (b - a < 1: a whole circle is two halves).
function bandPath(a, b, outer, inner) {
  if (b - a >= 0.999999) return bandPath(a, a + 0.5, outer, inner) + bandPath(a + 0.5, b, outer, inner);
  const large = b - a > 0.5 ? 1 : 0;
  return `M${point(a, outer)}A${outer} ${outer} 0 ${large} 1 ${point(b, outer)}` +
    `L${point(b, inner)}A${inner} ${inner} 0 ${large} 0 ${point(a, inner)}Z`;
}

// Owners change only with the membership: the page redraws this band when the fingerprint changes.
export function drawOwners(svgElement, owners) {
  let group = svgElement.querySelector("g.band-owner");
  if (!group) {
    group = svg("g", { class: "band-owner" });
    svgElement.prepend(group);
  }
  const paths = owners.members.map((member) => ({ member, d: [] }));
  for (const [a, b, index] of owners.runs) paths[index].d.push(bandPath(a, b, OWNER_OUTER, OWNER_INNER));
  group.replaceChildren(...paths.map(({ member, d }) => {
    const path = svg("path", { d: d.join(""), fill: colourOf(owners.members, member) });
    path.append(Object.assign(svg("title"), { textContent: `arcs ${member} owns` }));
    return path;
  }));
}

export function drawRisk(svgElement, ring) {
  let group = svgElement.querySelector("g.band-risk");
  if (!group) {
    group = svg("g", { class: "band-risk" });
    svgElement.append(group);
  }
  const track = svg("path", { d: bandPath(0, 1, RISK_OUTER, RISK_INNER), class: "risk-track" });
  const byKind = { below_n: [], below_quorum: [] };
  for (const [a, b, kind] of ring.runs) byKind[kind].push(bandPath(a, b, RISK_OUTER, RISK_INNER));
  const marks = Object.entries(byKind)
    .filter(([, d]) => d.length)
    .map(([kind, d]) => svg("path", { d: d.join(""), class: `risk-${kind}`, "data-risk": kind }));
  const atRisk = ring.below_n + ring.below_quorum;
  const lines = atRisk
    ? [[`${count(atRisk)} of ${count(ring.arcs)}`, ""], ["arcs at risk", ""],
      [`${count(ring.below_quorum)} below quorum`, "sub"], [`${count(ring.below_n)} below N`, "sub"]]
    : [[`${count(ring.arcs)} arcs`, ""], ["all replicas", "sub"], ["reachable", "sub"]];
  const texts = lines.map(([text, kind], i) => {
    const line = svg("text", { y: (i - (lines.length - 1) / 2) * 12 + 4, class: kind });
    line.textContent = text;
    return line;
  });
  group.replaceChildren(track, ...marks, ...texts);
}

function swatch(colour, kind) {
  const element = el("span", { className: kind ? `swatch ${kind}` : "swatch" });
  if (colour) element.style.backgroundColor = colour; // CSSOM, which the page's CSP allows (a style attribute it refuses)
  return element;
}

export function legend(listElement, ring, rows) {
  const shares = Object.fromEntries(rows.map((row) => [row.node_id, row.share]));
  listElement.replaceChildren(
    ...ring.members.map((member) =>
      el("li", {}, swatch(colourOf(ring.members, member)), `${member} owns ${percent(shares[member])}`)),
    el("li", {}, swatch(null, "below-n"), `below N: ${count(ring.below_n)} arcs (${percent(ring.below_n_share)})`),
    el("li", {}, swatch(null, "below-quorum"),
      `below quorum: ${count(ring.below_quorum)} arcs (${percent(ring.below_quorum_share)})`),
  );
}
