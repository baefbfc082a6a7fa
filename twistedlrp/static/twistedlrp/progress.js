// The live side of {% lrp_job_progress %} (docs/jobs.md, "Showing progress").
// Each .lrp-job widget follows its job over Server-Sent Events from the
// server's reactor (data-events); when EventSource is missing or the stream
// cannot be opened it polls the JSON status view (data-status) instead. It
// stops once the job is finished. Every update also fires a bubbling
// "lrp:job" event on the widget, its detail the job, for the page's own use.
(() => {
  "use strict";
  if (window.lrpJobProgress) {
    window.lrpJobProgress.scan();  // the tag's script is on the page again
    return;
  }
  const POLL_MS = 1000;

  function text(widget, selector, value) {
    const node = widget.querySelector(selector);
    if (node) node.textContent = value;
    return node;
  }

  function show(widget, job) {
    const bar = widget.querySelector(".lrp-job-bar");
    const p = job.progress;
    if (bar && p.total) {
      bar.max = p.total;
      bar.value = Math.min(p.current, p.total);
      bar.textContent = `${p.percent} %`;
    } else if (bar) {
      bar.removeAttribute("value");  // indeterminate
    }
    text(widget, ".lrp-job-state", job.state);
    text(widget, ".lrp-job-percent", p.percent === null ? "" : `${p.percent} %`);
    text(widget, ".lrp-job-message", p.message);
    const error = text(widget, ".lrp-job-error", job.error);
    if (error) error.hidden = !job.error;
    const cancel = widget.querySelector(".lrp-job-cancel");
    if (cancel) cancel.hidden = job.finished;
    widget.dataset.state = job.state;
    widget.dispatchEvent(new CustomEvent("lrp:job", {detail: job, bubbles: true}));
  }

  function poll(widget) {
    const tick = async () => {
      try {
        const response = await fetch(widget.dataset.status, {
          headers: {Accept: "application/json"},
          credentials: "same-origin",
        });
        if (response.status === 403 || response.status === 404) return;  // for good
        if (response.ok) {
          const job = await response.json();
          show(widget, job);
          if (job.finished) return;
        }
      } catch (e) {
        // The server is away for a moment: try again.
      }
      setTimeout(tick, POLL_MS);
    };
    tick();
  }

  function stream(widget) {
    let source;
    try {
      source = new EventSource(widget.dataset.events);
    } catch (e) {
      return poll(widget);
    }
    source.addEventListener("progress", (event) => {
      const job = JSON.parse(event.data);
      show(widget, job);
      if (job.finished) source.close();
    });
    source.addEventListener("refused", () => source.close());  // no such job
    source.addEventListener("error", () => {
      // CLOSED: refused (403, 503, not an event stream): poll instead. Else
      // the browser reconnects by itself.
      if (source.readyState === EventSource.CLOSED) poll(widget);
    });
  }

  function cancelling(widget) {
    const form = widget.querySelector(".lrp-job-cancel");
    if (!form || !window.fetch) return;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const response = await fetch(form.action, {
          method: "POST",
          body: new FormData(form),
          headers: {Accept: "application/json"},
          credentials: "same-origin",
        });
        if (response.ok) show(widget, await response.json());
      } catch (e) {
        form.submit();  // the way without JavaScript
      }
    });
  }

  function follow(widget) {
    if (widget.dataset.lrpFollowed) return;
    widget.dataset.lrpFollowed = "1";
    cancelling(widget);
    if (["succeeded", "failed", "cancelled"].includes(widget.dataset.state)) return;
    if (window.EventSource && widget.dataset.events) stream(widget);
    else if (window.fetch) poll(widget);
  }

  function scan() {
    document.querySelectorAll(".lrp-job[data-lrp-job]").forEach(follow);
  }

  window.lrpJobProgress = {scan, follow, show};
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", scan);
  else scan();
})();
