// Calls to the node's /console/ routes, with the token kept for this tab.

const TOKEN_KEY = "kvstore.console.token";

export class SignInNeeded extends Error {}

export class CallFailed extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function keepToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

// GET a /console/ route as JSON. `withToken` overrides the kept token (a sign-in attempt).
// 401: SignInNeeded; another error status: CallFailed with the node's {"error": ...}.
export async function get(path, withToken = token()) {
  const headers = { accept: "application/json" };
  if (withToken) headers.authorization = `Bearer ${withToken}`;
  const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  if (response.status === 401) throw new SignInNeeded("this node asks for a token");
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const reason = body && typeof body.error === "string" ? body.error : `${response.status} ${response.statusText}`;
    throw new CallFailed(response.status, reason);
  }
  return body;
}
