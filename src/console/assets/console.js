// sked console: progressive enhancement only (every page reads without it).
// The run page's log follows the run over Server-Sent Events; the browser's
// EventSource reconnects by itself and sends the last event id (the run
// event's seq), so the server resumes after it: nothing lost, nothing twice.
"use strict";
(function () {
  const log = document.getElementById("log");
  if (!log || log.dataset.live !== "true") return;
  const status = document.getElementById("tail-status");
  const state = document.getElementById("run-state");
  const timeline = document.getElementById("timeline");
  let last = Number(log.dataset.lastSeq || "0");
  const es = new EventSource(log.dataset.tail + "?after=" + last);
  status.textContent = "Following the run live.";
  const seen = (e) => {
    const seq = Number(e.lastEventId || "0");
    if (seq && seq <= last) return false; // already shown
    if (seq) last = seq;
    return true;
  };
  es.addEventListener("log", (e) => {
    if (!seen(e)) return;
    const d = JSON.parse(e.data);
    const span = document.createElement("span");
    span.className = "line " + String(d.stream || "").toLowerCase();
    span.dataset.seq = d.seq;
    span.textContent = d.message + "\n";
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(span);
    if (atEnd) log.scrollTop = log.scrollHeight;
  });
  const badge = (to) => {
    const b = document.createElement("span");
    b.className = "badge";
    b.dataset.state = to;
    b.textContent = to;
    return b;
  };
  es.addEventListener("state", (e) => {
    if (!seen(e)) return;
    const d = JSON.parse(e.data);
    if (state) {
      state.innerHTML = "";
      state.appendChild(badge(d.to));
    }
    if (timeline) {
      // As the server writes it: "2026-12-02 16:52:28 UTC FROM → [TO]".
      const li = document.createElement("li");
      const when = String(d.time).replace("T", " ").slice(0, 19) + " UTC ";
      li.appendChild(document.createTextNode(when + (d.from ? d.from + " → " : "")));
      li.appendChild(badge(d.to));
      if (d.reason) li.appendChild(document.createTextNode(" (" + d.reason + ")"));
      timeline.appendChild(li);
    }
  });
  es.addEventListener("other", seen);
  es.addEventListener("end", () => {
    es.close();
    status.textContent = "The run has ended. Reload for its final details.";
  });
  es.addEventListener("error", () => {
    if (es.readyState !== EventSource.CLOSED) status.textContent = "Connection lost; reconnecting…";
  });
  es.addEventListener("open", () => { status.textContent = "Following the run live."; });
})();
