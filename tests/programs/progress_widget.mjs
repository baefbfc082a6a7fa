// Runs twistedlrp/static/twistedlrp/progress.js in Node against a real
// server, with just enough of a DOM for one widget and an EventSource made
// of fetch (Node has fetch, not EventSource). tests/test_progress.py starts it:
//
//   node progress_widget.mjs SCRIPT BASE_URL WIDGET_JSON [--no-eventsource]
//
// WIDGET_JSON holds the widget's data- attributes as the page rendered them
// (events, status, state, lrpJob). Each "lrp:job" update is printed as one
// JSON line {"event": job, "widget": what the widget shows}; a stream refused
// as {"stream": status}; then, 1.5 s after the finished state, {"done": true,
// "later_fetches": N}: the requests the script made after it (none, if it stopped).
import {readFileSync} from "node:fs";

const [scriptPath, base, widgetJson, flag] = process.argv.slice(2);
const nativeFetch = globalThis.fetch;
let fetches = 0;
let finishedAt = null;  // fetches made until the finished state arrived
globalThis.fetch = (url, options) => {
  fetches += 1;
  return nativeFetch(new URL(url, base), options);
};

class Element extends EventTarget {
  constructor(className) {
    super();
    this.className = className;
    this.dataset = {};
    this.textContent = "";
    this.hidden = false;
    this.attributes = {};
    this.children = [];
  }
  querySelector(selector) {
    return this.children.find((child) => `.${child.className}` === selector) || null;
  }
  removeAttribute(name) {
    delete this[name];
  }
}

const widget = new Element("lrp-job");
Object.assign(widget.dataset, JSON.parse(widgetJson));
for (const name of ["lrp-job-bar", "lrp-job-state", "lrp-job-percent", "lrp-job-message", "lrp-job-error"]) {
  widget.children.push(new Element(name));
}
const shown = () => {
  const get = (name) => widget.querySelector(`.${name}`);
  const bar = get("lrp-job-bar");
  return {
    state: get("lrp-job-state").textContent,
    message: get("lrp-job-message").textContent,
    percent: get("lrp-job-percent").textContent,
    bar: {value: bar.value ?? null, max: bar.max ?? null},
  };
};

globalThis.window = globalThis;
globalThis.document = {
  readyState: "complete",
  querySelectorAll: (selector) => (selector === ".lrp-job[data-lrp-job]" ? [widget] : []),
  addEventListener: () => {},
};

class FetchEventSource extends EventTarget {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;
  constructor(url) {
    super();
    this.readyState = FetchEventSource.CONNECTING;
    this.controller = new AbortController();
    this.run(url).catch(() => {});
  }
  async run(url) {
    const response = await fetch(url, {signal: this.controller.signal});
    if (response.status !== 200) {
      this.readyState = FetchEventSource.CLOSED;
      process.stdout.write(JSON.stringify({stream: response.status}) + "\n");
      this.dispatchEvent(new Event("error"));
      return;
    }
    this.readyState = FetchEventSource.OPEN;
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of response.body) {
      buffer += decoder.decode(chunk, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
        }
        if (data.length) {
          const event = new Event(name);
          event.data = data.join("\n");
          this.dispatchEvent(event);
        }
      }
    }
    if (this.readyState !== FetchEventSource.CLOSED) {
      this.readyState = FetchEventSource.CONNECTING;  // a browser would reconnect
      this.dispatchEvent(new Event("error"));
    }
  }
  close() {
    this.readyState = FetchEventSource.CLOSED;
    this.controller.abort();
  }
}
if (flag !== "--no-eventsource") globalThis.EventSource = FetchEventSource;

widget.addEventListener("lrp:job", (event) => {
  process.stdout.write(JSON.stringify({event: event.detail, widget: shown()}) + "\n");
  if (event.detail.finished && finishedAt === null) {
    finishedAt = fetches;
    // The script must let go of everything: no stream, no further poll.
    setTimeout(() => {
      process.stdout.write(JSON.stringify({done: true, later_fetches: fetches - finishedAt}) + "\n");
      process.exit(0);
    }, 1500);
  }
});

// The script, as a browser runs a classic <script>.
(0, eval)(readFileSync(scriptPath, "utf8"));
