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
  es.addEventListener("state", (e) => {
    if (!seen(e)) return;
    const d = JSON.parse(e.data);
    if (state) {
      state.innerHTML = "";
      const b = document.createElement("span");
      b.className = "badge";
      b.dataset.state = d.to;
      b.textContent = d.to;
      state.appendChild(b);
    }
    if (timeline) {
      const li = document.createElement("li");
      li.textContent = d.time + " " + (d.from ? d.from + " → " : "") + d.to + (d.reason ? " (" + d.reason + ")" : "");
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
