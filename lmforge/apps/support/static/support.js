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

// FAQ answers are often Markdown. A small subset is rendered — paragraphs, "- " / "1. " lists,
// ``` code blocks, `code`, **bold**, *emphasis* and [links](https://...) — by building DOM nodes
// from text, never by assigning HTML: markup in an answer (a <script>, an onerror=) shows as the
// characters it is. Links open only http(s) addresses.
const INLINE = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\(https?:\/\/[^)\s]+\))/;

function renderInline(parent, text) {
  while (text) {
    const m = text.match(INLINE);
    if (!m) { parent.append(document.createTextNode(text)); return; }
    if (m.index) parent.append(document.createTextNode(text.slice(0, m.index)));
    const t = m[0];
    let node;
    if (m[1]) { node = document.createElement("code"); node.textContent = t.slice(1, -1); }
    else if (m[2]) { node = document.createElement("strong"); renderInline(node, t.slice(2, -2)); }
    else if (m[3]) { node = document.createElement("em"); renderInline(node, t.slice(1, -1)); }
    else {
      const [, label, href] = t.match(/^\[([^\]]+)\]\((.+)\)$/);
      node = document.createElement("a");
      node.href = href; node.rel = "noopener noreferrer"; node.target = "_blank"; node.textContent = label;
    }
    parent.append(node);
    text = text.slice(m.index + t.length);
  }
}

function renderMarkdown(parent, text) {
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.startsWith("```")) {  // a fenced code block, shown as written
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      i++;
      const pre = document.createElement("pre");
      pre.textContent = code.join("\n");
      parent.append(pre);
    } else if (/^\s*([-*]|\d+\.)\s+/.test(line)) {
      const list = document.createElement(/^\s*\d+\./.test(line) ? "ol" : "ul");
      for (; i < lines.length && /^\s*([-*]|\d+\.)\s+/.test(lines[i]); i++) {
        const li = document.createElement("li");
        renderInline(li, lines[i].replace(/^\s*([-*]|\d+\.)\s+/, ""));
        list.append(li);
      }
      parent.append(list);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !lines[i].startsWith("```") &&
             !/^\s*([-*]|\d+\.)\s+/.test(lines[i]); i++) para.push(lines[i]);
      const p = document.createElement("p");
      renderInline(p, para.join(" "));
      parent.append(p);
    }
  }
}

// Append one message to a conversation log, under a label saying who wrote it. The assistant's
// and the agents' messages are rendered as Markdown; the customer's are shown as typed.
function appendMessage(log, m, label) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  div.dataset.seq = m.seq;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  div.append(who);
  if (m.role === "customer") div.append(document.createTextNode(m.text));
  else { const body = document.createElement("div"); body.className = "body"; renderMarkdown(body, m.text); div.append(body); }
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}
