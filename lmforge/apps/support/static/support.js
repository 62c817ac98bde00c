// Shared by the customer page and the agent page; the server inlines it into each (app.py), so
// every request still goes through the same key rules and the pages need no extra route.

// A JSON client for this server: GET without a body, POST with one; errors become exceptions
// carrying the server's message.
function makeApi(key, extraHeaders) {
  return async function api(path, body) {
    const headers = {"Content-Type": "application/json", ...(extraHeaders ? extraHeaders() : {})};
    if (key) headers["Authorization"] = "Bearer " + key;
    const r = await fetch(path, body !== undefined ? {method: "POST", headers, body: JSON.stringify(body)} : {headers});
    const data = await r.json();
    if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
    return data;
  };
}

// Append one message to a conversation log, under a label saying who wrote it.
function appendMessage(log, m, label) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  div.dataset.seq = m.seq;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  div.append(who, document.createTextNode(m.text));
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
}
