// Numbers with units, and times as relative times with the absolute time on hover.

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
const grouped = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

export function count(value, unit) {
  if (value === null || value === undefined) return "?";
  const text = grouped.format(value);
  return unit ? `${text} ${value === 1 ? unit : unit + "s"}` : text;
}

export function bytes(value) {
  if (value === null || value === undefined) return "?";
  let unit = 0;
  let scaled = value;
  while (scaled >= 1024 && unit < BYTE_UNITS.length - 1) {
    scaled /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? scaled : scaled.toFixed(scaled < 10 ? 1 : 0)} ${BYTE_UNITS[unit]}`;
}

export function percent(fraction, digits = 1) {
  if (fraction === null || fraction === undefined) return "?";
  return `${(fraction * 100).toFixed(digits)} %`;
}

export function millis(value) {
  if (value === null || value === undefined) return "?";
  const magnitude = Math.abs(value);
  if (magnitude >= 1000) return `${(value / 1000).toFixed(2)} s`;
  return `${value.toFixed(magnitude < 10 ? 1 : 0)} ms`;
}

export function seconds(value) {
  if (value === null || value === undefined) return "?";
  if (value < 60) return `${Math.round(value)} s`;
  if (value < 3600) return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
  if (value < 86400) return `${Math.floor(value / 3600)} h ${Math.round((value % 3600) / 60)} min`;
  return `${Math.floor(value / 86400)} d ${Math.round((value % 86400) / 3600)} h`;
}

// A <time> element: "12 s ago" (or "in 3 min"), the absolute time as its tooltip.
export function relativeTime(epochMs, nowMs = Date.now()) {
  const element = document.createElement("time");
  if (epochMs === null || epochMs === undefined) {
    element.textContent = "never";
    return element;
  }
  const when = new Date(epochMs);
  element.dateTime = when.toISOString();
  element.title = when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
  const delta = (nowMs - epochMs) / 1000;
  element.textContent = delta >= 0 ? `${seconds(delta)} ago` : `in ${seconds(-delta)}`;
  return element;
}

// A small DOM builder: el("td", { className: "num", title: "x" }, "text", child, ...).
export function el(tag, properties = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(properties)) {
    if (value === undefined || value === null) continue;
    if (name === "dataset") Object.assign(element.dataset, value);
    else element[name] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

export function badge(text, kind, title) {
  return el("span", { className: `badge ${kind}`, title }, text);
}
