// callward console: live call list over server-sent events. No inline script (the CSP
// forbids it); rows are built with textContent, never HTML from the server.
"use strict";

(function () {
  const table = document.getElementById("calls");
  if (!table) {
    return;
  }
  const status = document.getElementById("live-status");
  const body = table.tBodies[0];
  const filters = JSON.parse(table.dataset.filters || "{}");
  const params = new URLSearchParams();
  params.set("after", table.dataset.after || "0");
  for (const [name, value] of Object.entries(filters)) {
    if (value) {
      params.set(name, value);
    }
  }

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    return td;
  }

  function addRow(row) {
    if (body.querySelector(`tr[data-seq="${Number(row.seq)}"]`)) {
      return;
    }
    const tr = document.createElement("tr");
    tr.dataset.seq = String(Number(row.seq));
    tr.className = "kind-" + String(row.kind).replace(/\./g, "-") + " fresh";
    const first = document.createElement("td");
    const link = document.createElement("a");
    link.href = "/calls/" + Number(row.seq);
    link.textContent = String(Number(row.seq));
    first.appendChild(link);
    tr.appendChild(first);
    tr.appendChild(cell(row.ts));
    tr.appendChild(cell(row.kind));
    tr.appendChild(cell(row.principal));
    tr.appendChild(cell(row.tool));
    tr.appendChild(cell(row.outcome));
    tr.appendChild(cell((row.reasons || []).join(", ")));
    tr.appendChild(cell(row.session_id));
    body.insertBefore(tr, body.firstChild);
    const empty = document.getElementById("no-calls");
    if (empty) {
      empty.remove();
    }
  }

  const source = new EventSource("/calls/events?" + params.toString());
  source.addEventListener("open", () => setStatus("live", "live: new calls appear here"));
  source.addEventListener("call", (event) => addRow(JSON.parse(event.data)));
  source.addEventListener("ended", () => {
    source.close();
    setStatus("ended", "live: the session ended; sign in again");
  });
  source.addEventListener("error", () => setStatus("reconnecting", "live: reconnecting…"));
})();
